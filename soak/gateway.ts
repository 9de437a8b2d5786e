// The soak's gateway: a real `exec-gateway serve` process (the built dist/) with its own data
// dir, so that a chaos fault can SIGKILL it and start a successor on the same ports and data dir,
// as an operator's restart would. The driver sees it only as a client does (HTTP), plus /proc
// for its memory and CPU.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { loadDataDir } from '../src/data-dir.js'
import { signSupervisorToken } from '../src/tokens.js'
import { killGatewayProcess, restartGatewayProcess, startGatewayProcess, type GatewayProcess } from '../test/helpers/gateway-process.js'
import { KNOBS } from './knobs.js'

// KNOBS spelled as `serve` flags (sessionWaitMs → --session-wait-ms). No exec rate limit: the
// soak creates thousands of execs a minute from one address, and the limit has its own tests.
export const FLAGS = [
  ...Object.entries(KNOBS).flatMap(([k, v]) => [`--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`, String(v)]),
  '--exec-rate-limit-per-minute', '0'
]

// started: what the old gateway said about each exec just before the SIGKILL, by exec key (the
// script's first line): when it started on its sandbox, or null when it had not yet.
// Cluster mode records a replica fault as a restart too (clients resume through it alike):
// kind and replica say which, `owned` the sandboxes that replica held when it began.
export interface Restart {
  n: number
  killAt: number
  upAt?: number
  started: Map<string, number | null>
  kind?: 'replica-kill' | 'replica-restart'
  replica?: string
  owned?: string[]
  // replica-restart: SIGTERM to exit (the drain).
  drainMs?: number
}

export class SoakGateway {
  readonly dataDir: string
  readonly publicKey: string
  readonly #secret: Buffer
  #proc: GatewayProcess | undefined
  // Every process this gateway has been, for CPU and RSS sums (pid → last reading).
  readonly pids: number[] = []
  readonly restarts: Restart[] = []
  // Warnings (node's "(node:PID) …Warning: …" lines) seen in each process's output, kept at its death.
  readonly #warnings = new Map<string, number>()

  constructor () {
    this.dataDir = mkdtempSync(join(tmpdir(), 'egw-soak-'))
    // Made here, before the first process: the token secret signs the supervisors' tokens and
    // the SSH key goes into OpenSSH's authorized_keys. The first serve is not a "restart".
    const identity = loadDataDir(this.dataDir)
    this.publicKey = identity.publicKey
    this.#secret = identity.tokenSecret
  }

  get publicUrl (): string { return this.#proc!.publicUrl }
  get supervisorUrl (): string { return this.#proc!.supervisorUrl }
  get pid (): number { return this.#proc!.pid }
  // The gateway processes running now, for CPU and RSS.
  livePids (): number[] { return [this.#proc!.pid] }
  // Down between a kill and its successor's "listening" line.
  get up (): boolean { return this.restarts.every((r) => r.upAt !== undefined) }

  token (sandboxId: string): string { return signSupervisorToken(this.#secret, sandboxId) }

  async start (): Promise<void> {
    this.#proc = await startGatewayProcess({ dataDir: this.dataDir, localSandbox: false, extraArgs: FLAGS, startTimeoutMs: 30_000 })
    this.pids.push(this.#proc.pid)
  }

  // SIGKILL, down for downMs, then a new process on the same ports and data dir.
  async restart (downMs: number, started: Map<string, number | null>): Promise<Restart> {
    const old = this.#proc!
    const r: Restart = { n: this.restarts.length + 1, killAt: Date.now(), started }
    this.restarts.push(r)
    await killGatewayProcess(old)
    this.#noteWarnings(old.output())
    await new Promise((resolve) => setTimeout(resolve, downMs))
    this.#proc = await restartGatewayProcess(old, { startTimeoutMs: 30_000 })
    this.pids.push(this.#proc.pid)
    r.upAt = Date.now()
    return r
  }

  warnings (): Map<string, number> {
    const all = new Map(this.#warnings)
    for (const [k, n] of countWarnings(this.#proc?.output() ?? '')) all.set(k, (all.get(k) ?? 0) + n)
    return all
  }

  #noteWarnings (out: string): void {
    for (const [k, n] of countWarnings(out)) this.#warnings.set(k, (this.#warnings.get(k) ?? 0) + n)
  }

  async close (): Promise<void> {
    try { await this.#proc?.stop() } finally { rmSync(this.dataDir, { recursive: true, force: true }) }
  }
}

export function countWarnings (out: string): Map<string, number> {
  const m = new Map<string, number>()
  for (const line of out.split('\n')) {
    const w = /^\(node:\d+\) (\w*Warning: .{0,120})/.exec(line)
    if (w !== null) m.set(w[1]!, (m.get(w[1]!) ?? 0) + 1)
  }
  return m
}

// RSS in bytes and CPU (user + system) in seconds of one process, from /proc; undefined once gone.
export function procStats (pid: number): { rss: number, cpuS: number } | undefined {
  try {
    const rss = Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) * 1024
    // Fields after the command name, which may hold spaces: utime and stime are 14th and 15th.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return { rss, cpuS: (Number(f[11]) + Number(f[12])) / 100 }
  } catch { return undefined }
}
