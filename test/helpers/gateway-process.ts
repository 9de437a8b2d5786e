import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { loadDataDir } from '../../src/data-dir.js'
import { signSupervisorToken } from '../../src/tokens.js'

// The built CLI's `exec-gateway serve` as a real child process, for what only a process can
// show: SIGTERM handling, the shutdown grace, and the process actually exiting.

const BIN = fileURLToPath(new URL('../../bin/exec-gateway.js', import.meta.url))
const OUTPUT_LIMIT = 256 * 1024

export interface GatewayProcessOptions {
  /** --shutdown-grace-ms; default 1000. */
  shutdownGraceMs?: number
  /** --local-sandbox; default true. */
  localSandbox?: boolean
  /** More `serve` flags, appended verbatim. */
  extraArgs?: string[]
  /** Extra environment (EXEC_GATEWAY_* variables work as flags do). */
  env?: Record<string, string>
  /** Bound on the "listening" line; default 15000 ms. */
  startTimeoutMs?: number
  /**
   * --data-dir owned by the caller: stop() leaves it in place, so a second process can start on
   * the same identity, secret and exec records (a restart). Default: a fresh temp dir, removed.
   */
  dataDir?: string
  /** --listen as host:port; default 127.0.0.1:0. */
  listen?: string
  /** --supervisor-listen as host:port; default 127.0.0.1:0. */
  supervisorListen?: string
}

interface GatewayExit { code: number | null, signal: NodeJS.Signals | null }

export interface GatewayProcess {
  publicUrl: string
  supervisorUrl: string
  pid: number
  proc: ChildProcess
  dataDir: string
  /** Resolves once the process has exited. */
  exited: Promise<GatewayExit>
  /** stdout + stderr so far (bounded tail). */
  output: () => string
  /** A supervisor token for a sandbox, signed with this gateway's secret. */
  token: (sandboxId: string) => string
  /** SIGTERM, then SIGKILL after 5 s; removes the data dir unless the caller owns it. Idempotent. */
  stop: () => Promise<GatewayExit>
  /** The options it was started with, so a restart can repeat them. */
  options: GatewayProcessOptions
}

// Who removes a data dir on stop(): a restart moves the duty from the dead process to its
// successor, so a temp dir is removed exactly once, by whichever process is stopped last.
const dirDuty = new WeakMap<GatewayProcess, { owned: boolean }>()

export async function startGatewayProcess (opts: GatewayProcessOptions = {}): Promise<GatewayProcess> {
  return await start(opts, { owned: opts.dataDir === undefined })
}

async function start (opts: GatewayProcessOptions, duty: { owned: boolean }): Promise<GatewayProcess> {
  const dataDir = opts.dataDir ?? mkdtempSync(join(tmpdir(), 'egw-proc-'))
  const args = [
    BIN, 'serve',
    '--listen', opts.listen ?? '127.0.0.1:0',
    '--supervisor-listen', opts.supervisorListen ?? '127.0.0.1:0',
    '--data-dir', dataDir,
    '--shutdown-grace-ms', String(opts.shutdownGraceMs ?? 1000),
    ...(opts.localSandbox === false ? [] : ['--local-sandbox']),
    ...(opts.extraArgs ?? [])
  ]
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...opts.env } })
  proc.on('error', () => {})
  let out = ''
  const keep = (c: Buffer): void => { out = (out + c.toString()).slice(-OUTPUT_LIMIT) }
  proc.stdout!.on('data', keep)
  proc.stderr!.on('data', keep)
  const exited = new Promise<GatewayExit>((resolve) => {
    proc.once('exit', (code, signal) => resolve({ code, signal }))
  })
  // An exit hook so a crashed test worker never leaves a gateway behind.
  const onParentExit = (): void => { try { proc.kill('SIGKILL') } catch { /* gone */ } }
  process.once('exit', onParentExit)
  // However it ended (a SIGKILL of the test's own, too), a dead gateway needs no hook.
  proc.once('exit', () => { process.off('exit', onParentExit) })

  let stopping: Promise<GatewayExit> | undefined
  const cleanupDir = (): void => { if (duty.owned) rmSync(dataDir, { recursive: true, force: true }) }
  const stop = async (): Promise<GatewayExit> => {
    stopping ??= (async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        try { proc.kill('SIGTERM') } catch { /* gone */ }
        const t = setTimeout(() => { try { proc.kill('SIGKILL') } catch { /* gone */ } }, 5000)
        const res = await exited
        clearTimeout(t)
        process.off('exit', onParentExit)
        cleanupDir()
        return res
      }
      const res = await exited
      process.off('exit', onParentExit)
      cleanupDir()
      return res
    })()
    return await stopping
  }

  let listening: { publicUrl: string, supervisorUrl: string }
  try {
    listening = await new Promise((resolve, reject) => {
      let buf = ''
      const timeoutMs = opts.startTimeoutMs ?? 15_000
      const timer = setTimeout(() => finish(new Error(`gateway process printed no "listening" line within ${timeoutMs} ms; output:\n${out}`)), timeoutMs)
      const onData = (c: Buffer): void => {
        buf += c.toString()
        let nl: number
        while ((nl = buf.indexOf('\n')) !== -1) {
          const line = buf.slice(0, nl).trim()
          buf = buf.slice(nl + 1)
          if (!line.startsWith('{')) continue
          let rec: any
          try { rec = JSON.parse(line) } catch { continue }
          if (rec?.msg === 'listening' && typeof rec.publicUrl === 'string' && typeof rec.supervisorUrl === 'string') {
            finish(undefined, { publicUrl: rec.publicUrl, supervisorUrl: rec.supervisorUrl })
            return
          }
        }
      }
      const onExit = (code: number | null, signal: NodeJS.Signals | null): void => {
        finish(new Error(`gateway process exited (${signal ?? `code ${String(code)}`}) before listening; output:\n${out}`))
      }
      function finish (err: Error | undefined, value?: { publicUrl: string, supervisorUrl: string }): void {
        clearTimeout(timer)
        proc.stdout!.off('data', onData)
        proc.off('exit', onExit)
        if (err !== undefined) reject(err)
        else resolve(value!)
      }
      proc.stdout!.on('data', onData)
      proc.once('exit', onExit)
    })
  } catch (err) {
    await stop()
    throw err
  }

  const identity = loadDataDir(dataDir)
  const gw: GatewayProcess = {
    ...listening,
    pid: proc.pid!,
    proc,
    dataDir,
    exited,
    output: () => out,
    token: (sandboxId) => signSupervisorToken(identity.tokenSecret, sandboxId),
    stop,
    options: opts
  }
  dirDuty.set(gw, duty)
  return gw
}

/** SIGKILL (no shutdown grace, nothing flushed) and wait for the exit. Idempotent. */
export async function killGatewayProcess (gw: GatewayProcess): Promise<GatewayExit> {
  if (gw.proc.exitCode === null && gw.proc.signalCode === null) {
    try { gw.proc.kill('SIGKILL') } catch { /* gone */ }
  }
  const res = await gw.exited
  return res
}

function hostPort (url: string): string {
  const u = new URL(url)
  return `${u.hostname}:${u.port}`
}

/**
 * A new process on the old one's data dir and on the ports it had bound, so supervisors and
 * clients find it where they left it. The old process must have exited (see killGatewayProcess).
 * Call it before the old one's stop(), which would remove a data dir the helper made. Immediate rebinding works: node's listen sets SO_REUSEADDR.
 */
export async function restartGatewayProcess (gw: GatewayProcess, opts: GatewayProcessOptions = {}): Promise<GatewayProcess> {
  if (gw.proc.exitCode === null && gw.proc.signalCode === null) {
    throw new Error(`restartGatewayProcess: gateway pid ${gw.pid} is still running; kill or stop it first`)
  }
  const old = dirDuty.get(gw) ?? { owned: false }
  const duty = { owned: old.owned }
  old.owned = false
  // A start that fails stops its process and, holding the duty, removes the dir.
  return await start({
    ...gw.options,
    ...opts,
    dataDir: gw.dataDir,
    listen: hostPort(gw.publicUrl),
    supervisorListen: hostPort(gw.supervisorUrl)
  }, duty)
}
