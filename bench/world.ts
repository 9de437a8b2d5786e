// What the bench measures against, and the teardown that leaves nothing behind: gateways A and
// B with their supervisors, the run's sshd and the peer's key, the random file, and every process
// and temp file started on the way (gateway C of the held-execs phase included).
import { execFileSync } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { chmodSync, closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs'
import os from 'node:os'
import { join } from 'node:path'
import { loadDataDir } from '../src/data-dir.js'
import { startGatewayProcess, type GatewayProcess } from '../test/helpers/gateway-process.js'
import { startOpenSshd, type OpenSshd } from '../test/helpers/openssh.js'
import { startSupervisorProcess, type SupervisorProcess } from '../test/helpers/supervisor-process.js'
import { GatewayApi, SshPeer } from './clients.js'
import { CURVE_KEX, FILE_MIB, GCM_CIPHER, GATEWAY_EXTRA_ARGS, GATEWAY_NODE_OPTIONS, ONLY, PROFILE_DIR } from './knobs.js'
import { cmdline, findSshdConfig, taggedProcesses } from './proc.js'
import { Profiler } from './profile.js'
import { log, Results } from './report.js'

export interface Setup {
  tmp: string
  sshd: OpenSshd
  ssh: SshPeer
  // Gateway A: default flags (pool on), the in-process `local` sandbox, a supervisor to OpenSSH
  // ("ossh") and one with the embedded daemon ("emb").
  gwA: GatewayProcess
  // Gateway B: --ssh-pool false, the same two kinds of supervisor.
  gwB: GatewayProcess
  // Gateway D: default flags with --api-token apiToken, one supervisor to OpenSSH ("ossh"): what
  // `curl` talks to in the ControlMaster phase, token checked. Only when that phase runs.
  gwD: GatewayProcess | undefined
  apiToken: string
  // A's ossh and emb, then B's (then D's ossh).
  supervisors: SupervisorProcess[]
  sshdPid: number | undefined
  file: string
  fileSha256: string
  fileBytes: number
}

function gatewayEnv (inspect: boolean): Record<string, string> {
  const opts = [process.env.NODE_OPTIONS ?? '', GATEWAY_NODE_OPTIONS, PROFILE_DIR === '' && !inspect ? '' : '--inspect=127.0.0.1:0'].filter((o) => o !== '').join(' ')
  return opts === '' ? {} : { NODE_OPTIONS: opts }
}

async function makeRandomFile (path: string, mib: number): Promise<{ sha256: string, bytes: number }> {
  const fd = openSync(path, 'w', 0o644)
  const hash = createHash('sha256')
  try {
    for (let i = 0; i < mib; i += 16) {
      const chunk = randomBytes(Math.min(16, mib - i) * 1024 * 1024)
      hash.update(chunk)
      writeSync(fd, chunk)
    }
  } finally {
    closeSync(fd)
  }
  chmodSync(path, 0o644)
  return { sha256: hash.digest('hex'), bytes: mib * 1024 * 1024 }
}

export class World {
  readonly api = new GatewayApi()
  readonly profiler = new Profiler(PROFILE_DIR)
  readonly results = new Results()
  // Every exec id the bench started and left running: what the teardown kills by pid.
  readonly execIds = new Set<string>()
  readonly #gateways: GatewayProcess[] = []
  readonly #supervisors: SupervisorProcess[] = []
  readonly #cleanups: Array<() => Promise<void>> = []
  #sshd: OpenSshd | undefined
  #tmp: string | undefined
  #setup: Setup | undefined

  get setup (): Setup {
    if (this.#setup === undefined) throw new Error('the bench setup did not complete')
    return this.#setup
  }

  // Run first at teardown, before the gateways stop (an ssh ControlMaster, processes by pid).
  onTeardown (fn: () => Promise<void>): void {
    this.#cleanups.push(fn)
  }

  async gateway (extraArgs: string[], localSandbox: boolean, inspect = false): Promise<GatewayProcess> {
    // The bench measures throughput (hundreds of execs/s, 1,000 held at once): exec rate limit off.
    const gw = await startGatewayProcess({ localSandbox, extraArgs: ['--exec-rate-limit-per-minute', '0', ...extraArgs, ...GATEWAY_EXTRA_ARGS], env: gatewayEnv(inspect), shutdownGraceMs: 2000 })
    this.#gateways.push(gw)
    return gw
  }

  supervisor (gw: GatewayProcess, sandboxId: string, sshd?: OpenSshd): SupervisorProcess {
    const sup = startSupervisorProcess({
      gatewayUrl: gw.supervisorUrl,
      sandboxId,
      token: gw.token(sandboxId),
      // What a sandbox runs in production: debug lines would cost the embedded daemon a few
      // JSON lines per exec that sshd, its peer here, does not pay.
      logLevel: 'info',
      ...(sshd === undefined ? {} : { sshTarget: `${sshd.host}:${sshd.port}`, sshUser: sshd.user })
    })
    this.#supervisors.push(sup)
    return sup
  }

  async start (): Promise<void> {
    const started = Date.now()
    const tmp = mkdtempSync(join(os.tmpdir(), 'egw-bench-'))
    this.#tmp = tmp
    // The sandbox account (not root) reads the random file.
    chmodSync(tmp, 0o755)
    const clientKey = join(tmp, 'client_ed25519')
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'exec-gateway-bench', '-f', clientKey])

    const needOpenSsh = ONLY.has('roundtrip') || ONLY.has('rate') || ONLY.has('throughput') || ONLY.has('controlmaster') || ONLY.has('burst')
    const gwA = await this.gateway([], true)
    const gwB = await this.gateway(['--ssh-pool=false'], false)
    const apiToken = randomBytes(24).toString('base64url')
    const gwD = ONLY.has('controlmaster') ? await this.gateway(['--api-token', apiToken], false) : undefined
    const keys = [readFileSync(`${clientKey}.pub`, 'utf8').trim(), ...[gwA, gwB, gwD].flatMap((g) => g === undefined ? [] : [loadDataDir(g.dataDir).publicKey])]
    const sshd = await startOpenSshd({ authorizedKeys: keys, logLevel: 'ERROR' })
    this.#sshd = sshd
    const supervisors = needOpenSsh
      ? [this.supervisor(gwA, 'ossh', sshd), this.supervisor(gwA, 'emb'), this.supervisor(gwB, 'ossh', sshd), this.supervisor(gwB, 'emb')]
      : []
    if (gwD !== undefined) supervisors.push(this.supervisor(gwD, 'ossh', sshd))
    let file = ''
    let fileSha256 = ''
    let fileBytes = 0
    if (ONLY.has('throughput')) {
      file = join(tmp, `random-${FILE_MIB}MiB.bin`)
      const made = await makeRandomFile(file, FILE_MIB)
      fileSha256 = made.sha256
      fileBytes = made.bytes
    }
    if (needOpenSsh) {
      await Promise.all([this.api.waitConnected(gwA.publicUrl, 'ossh'), this.api.waitConnected(gwA.publicUrl, 'emb'), this.api.waitConnected(gwB.publicUrl, 'ossh'), this.api.waitConnected(gwB.publicUrl, 'emb')])
    }
    if (gwD !== undefined) await this.api.waitConnected(gwD.publicUrl, 'ossh', apiToken)
    const sshdInfo = findSshdConfig(sshd.port)
    const ssh = new SshPeer(clientKey, sshd)
    this.#setup = { tmp, sshd, ssh, gwA, gwB, gwD, apiToken, supervisors, sshdPid: sshdInfo?.pid, file, fileSha256, fileBytes }

    const { commands, notes } = this.results
    commands.push(
      `- gateway A (default flags, pool on): \`${cmdline(gwA.pid)}\``,
      `- gateway B (one SSH connection per exec): \`${cmdline(gwB.pid)}\``,
      ...(gwD === undefined ? [] : [`- gateway D (default flags and an API token, for \`curl\`): \`${cmdline(gwD.pid)}\``]),
      ...supervisors.map((s) => `- supervisor: \`${cmdline(s.pid)}\``),
      `- sshd (test/helpers/openssh.ts, logging in as \`${sshd.user}\`): \`${sshdInfo?.command ?? `sshd on 127.0.0.1:${sshd.port}`}\``,
      `- OpenSSH client baseline: \`${ssh.commandLine('true')}\``,
      `- OpenSSH client baseline with the gateway's key exchange: \`${ssh.commandLine('true', `-o KexAlgorithms=${CURVE_KEX}`)}\``,
      `- throughput baseline: \`${ssh.commandLine(file === '' ? '<file>' : `cat ${file}`)} > /dev/null\``,
      `- throughput baseline with the gateway's cipher, its CPU from bash's \`times\`: \`bash -c '"$@" > /dev/null; times' bash ${ssh.commandLine(file === '' ? '<file>' : `cat ${file}`, `-c ${GCM_CIPHER}`)}\``
    )
    if (sshdInfo !== undefined) this.results.sshdConfig = sshdInfo.config.trim()
    if (GATEWAY_NODE_OPTIONS !== '') notes.push(`gateways ran with NODE_OPTIONS=${GATEWAY_NODE_OPTIONS}`)
    if (PROFILE_DIR !== '') {
      mkdirSync(PROFILE_DIR, { recursive: true })
      notes.push(`**profiled run** (BENCH_PROFILE_DIR=${PROFILE_DIR}): gateways ran with the inspector and a sampling profiler during each phase; the figures are slower than an unprofiled run`)
    }
    if (GATEWAY_EXTRA_ARGS.length > 0) notes.push(`gateways ran with extra flags: ${GATEWAY_EXTRA_ARGS.join(' ')}`)
    log(`setup done in ${((Date.now() - started) / 1000).toFixed(1)} s (sshd port ${sshd.port}, user ${sshd.user})`)
  }

  async teardown (): Promise<void> {
    this.profiler.close()
    for (const fn of this.#cleanups.splice(0)) await fn().catch((err: unknown) => log(`teardown: ${String(err)}`))
    // Stop in order: the gateways (which close their SSH connections), then supervisors, sshd.
    await Promise.allSettled(this.#gateways.map(async (g) => await g.stop()))
    await Promise.allSettled(this.#supervisors.map(async (s) => await s.stop()))
    await this.#sshd?.close()
    this.api.close()
    // The embedded daemon leaves a command running when its client goes away (as sshd does):
    // anything of ours still alive is killed by pid.
    const left = taggedProcesses(this.execIds)
    for (const pid of left) { try { process.kill(pid, 'SIGKILL') } catch { /* gone */ } }
    if (left.length > 0) log(`killed ${left.length} exec processes that outlived the run`)
    if (this.#tmp !== undefined) rmSync(this.#tmp, { recursive: true, force: true })
  }
}
