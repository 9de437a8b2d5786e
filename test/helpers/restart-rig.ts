import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { api } from './api.js'
import { killGatewayProcess, restartGatewayProcess, startGatewayProcess, type GatewayProcess } from './gateway-process.js'
import { sandboxAccount, startOpenSshd, type OpenSshd } from './openssh.js'
import { startSupervisorProcess, type SupervisorProcess } from './supervisor-process.js'
import { waitFor } from './wait.js'
import { loadDataDir } from '../../src/data-dir.js'

// A gateway process on a data dir the rig owns, and one supervisor process dialling it, so a
// test can SIGKILL the gateway and start a new one on the same data dir and ports: the
// supervisor finds it again by itself, as it would after a crash in production.

export interface RestartRigOptions {
  sandboxId: string
  /** Bridge to a real OpenSSH sshd instead of the embedded daemon. */
  openssh?: boolean
  /** More `serve` flags. */
  serveArgs?: string[]
  /** Bound on the supervisor's (re)connection; its backoff is at most 5 s. Default 15000. */
  connectTimeoutMs?: number
}

export interface RestartRig {
  readonly sandboxId: string
  /** The gateway now running (a new object after each restart). */
  readonly gw: GatewayProcess
  readonly sup: SupervisorProcess
  /** performance.now() when the current gateway printed its "listening" line. */
  readonly listeningAt: number
  /** SIGKILL the gateway and wait for its exit. */
  kill: () => Promise<void>
  /** A new gateway on the same data dir and ports (the old one must be dead). */
  restart: () => Promise<GatewayProcess>
  /** Until GET /v1/sandboxes/{id} says connected, bounded. */
  waitConnected: () => Promise<void>
  /** Gateway and supervisor output tails, for a failing test's message. */
  diagnostics: () => string
  /** Stops every process the rig started and removes the data dir. Idempotent. */
  close: () => Promise<void>
}

export async function startRestartRig (opts: RestartRigOptions): Promise<RestartRig> {
  const dataDir = mkdtempSync(join(tmpdir(), 'egw-restart-'))
  const connectTimeoutMs = opts.connectTimeoutMs ?? 15_000
  let sshd: OpenSshd | undefined
  let sup: SupervisorProcess | undefined
  const gateways: GatewayProcess[] = []
  // Output of the gateways already killed: the interesting part of a restart failure.
  let pastOutput = ''
  let closed = false

  const close = async (): Promise<void> => {
    if (closed) return
    closed = true
    await sup?.stop()
    for (const g of gateways) await g.stop()
    await sshd?.close()
    rmSync(dataDir, { recursive: true, force: true })
  }

  try {
    const gatewayOpts = { localSandbox: false, dataDir, extraArgs: opts.serveArgs ?? [] }
    gateways.push(await startGatewayProcess(gatewayOpts))
    if (opts.openssh === true) sshd = await startOpenSshd({ authorizedKeys: [loadDataDir(dataDir).publicKey] })
    let listeningAt = performance.now()
    const current = (): GatewayProcess => gateways.at(-1)!
    sup = startSupervisorProcess({
      gatewayUrl: current().supervisorUrl,
      sandboxId: opts.sandboxId,
      token: current().token(opts.sandboxId),
      ...(sshd === undefined ? {} : { sshTarget: `${sshd.host}:${sshd.port}`, sshUser: sandboxAccount() })
    })
    const theSup = sup
    const waitConnected = async (): Promise<void> => {
      await waitFor(async () => {
        const res = await api(current().publicUrl, 'GET', `/v1/sandboxes/${opts.sandboxId}`)
        return res.status === 200 && res.body.status === 'connected'
      }, { timeoutMs: connectTimeoutMs, intervalMs: 50, description: `supervisor of ${opts.sandboxId} connected to gateway pid ${current().pid}` })
    }
    const rig: RestartRig = {
      sandboxId: opts.sandboxId,
      get gw () { return current() },
      sup: theSup,
      get listeningAt () { return listeningAt },
      kill: async () => {
        const g = current()
        const exit = await killGatewayProcess(g)
        if (exit.signal !== 'SIGKILL') throw new Error(`gateway pid ${g.pid} exited by ${JSON.stringify(exit)}, not SIGKILL; output:\n${g.output()}`)
        pastOutput += `--- gateway pid ${g.pid} (killed) ---\n${g.output().slice(-16_384)}\n`
      },
      restart: async () => {
        const next = await restartGatewayProcess(current())
        listeningAt = performance.now()
        gateways.push(next)
        return next
      },
      waitConnected,
      diagnostics: () => `${pastOutput}--- gateway pid ${current().pid} ---\n${current().output().slice(-16_384)}\n--- supervisor ---\n${theSup.output().slice(-16_384)}\n`,
      close
    }
    await waitConnected()
    return rig
  } catch (err) {
    await close()
    throw err
  }
}
