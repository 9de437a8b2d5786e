// The soak's cluster mode (SOAK_REPLICAS > 1): that many `exec-gateway serve` replicas on ONE
// shared data dir, one real redis-server beside them and a real haproxy in front (the test
// helpers), so that supervisors dial haproxy's supervisor frontend and clients its public one.
// A replica fault SIGKILLs one replica (replica-kill) or SIGTERMs it so that it drains
// (replica-restart), then starts it again on the same ports. To the clients it is recorded as a
// restart (soak/gateway.ts Restart), so they resume through it as through a gateway restart.
import { createWriteStream, mkdirSync, mkdtempSync, rmSync, writeFileSync, type WriteStream } from 'node:fs'
import { freePort } from '../src/cluster/launcher-probes.js'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { deriveReplicaSecret, replicaAuthHeader } from '../src/cluster/replica-auth.js'
import { loadDataDir } from '../src/data-dir.js'
import { signSupervisorToken } from '../src/tokens.js'
import { killGatewayProcess, restartGatewayProcess, startGatewayProcess, type GatewayProcess } from '../test/helpers/gateway-process.js'
import { startHaproxy, type Haproxy } from '../test/helpers/haproxy.js'
import { startRedisServer, type RedisServer } from '../test/helpers/redis-server.js'
import { sleep } from '../test/helpers/wait.js'
import { countWarnings, FLAGS, type Restart } from './gateway.js'
import { LOG_DIR, REPLICAS, SHUTDOWN_GRACE_MS } from './knobs.js'

const HOST = '127.0.0.1'
// A drain moves its supervisors (haproxy's check, the moves, the rebuilds) and then gives its
// OpenSSH execs the grace; past this it is SIGKILLed and the report says so.
const DRAIN_BOUND_MS = SHUTDOWN_GRACE_MS + 25_000
const UP_BOUND_MS = 15_000

interface Replica { id: string, proc: GatewayProcess, internalUrl: string }

const hostPort = (url: string): string => { const u = new URL(url); return `${u.hostname}:${u.port}` }

export class SoakCluster {
  readonly dataDir: string
  readonly publicKey: string
  readonly #secret: Buffer
  readonly #auth: Record<string, string>
  #redis: RedisServer | undefined
  #haproxy: Haproxy | undefined
  readonly replicas: Replica[] = []
  readonly pids: number[] = []
  readonly restarts: Restart[] = []
  // Drains that did not end within DRAIN_BOUND_MS (SIGKILLed instead): a finding.
  readonly forcedDrains: string[] = []
  readonly #warnings = new Map<string, number>()
  // SOAK_LOG_DIR: every replica process's whole output, appended to <dir>/<replica>.log.
  readonly #logs = new Map<string, WriteStream>()

  constructor () {
    this.dataDir = mkdtempSync(join(tmpdir(), 'egw-soak-cluster-'))
    // One identity for every replica, made before any starts (they would each write their own).
    const identity = loadDataDir(this.dataDir)
    this.publicKey = identity.publicKey
    this.#secret = identity.tokenSecret
    this.#auth = replicaAuthHeader(deriveReplicaSecret(identity))
  }

  get publicUrl (): string { return this.#haproxy!.publicUrl }
  get supervisorUrl (): string { return this.#haproxy!.supervisorUrl }
  get pid (): number { return this.replicas[0]!.proc.pid }
  livePids (): number[] { return this.replicas.filter((r) => r.proc.proc.exitCode === null && r.proc.proc.signalCode === null).map((r) => r.proc.pid) }
  get up (): boolean { return this.restarts.every((r) => r.upAt !== undefined) }
  token (sandboxId: string): string { return signSupervisorToken(this.#secret, sandboxId) }
  describe (): string {
    return `${REPLICAS} replicas (${this.replicas.map((r) => `${r.id} pid ${r.proc.pid} ${r.proc.publicUrl}`).join(', ')}), redis ${this.#redis?.url ?? '?'}, haproxy pid ${this.#haproxy?.pid ?? '?'} at ${this.publicUrl} (supervisors ${this.supervisorUrl})`
  }

  async start (): Promise<void> {
    this.#redis = await startRedisServer()
    for (let i = 1; i <= REPLICAS; i++) {
      const id = `soak-r${i}`
      const internalPort = await freePort(new Set())
      const proc = await startGatewayProcess({
        dataDir: this.dataDir,
        localSandbox: false,
        shutdownGraceMs: SHUTDOWN_GRACE_MS,
        startTimeoutMs: 30_000,
        extraArgs: [...FLAGS, '--redis-url', this.#redis.url, '--replica-id', id, '--internal-listen', `${HOST}:${internalPort}`]
      })
      this.replicas.push({ id, proc, internalUrl: `http://${HOST}:${internalPort}` })
      this.pids.push(proc.pid)
      this.#tee(id, proc)
    }
    this.#haproxy = await startHaproxy({ replicas: this.replicas.map((r) => ({ name: r.id, publicAddr: hostPort(r.proc.publicUrl), supervisorAddr: hostPort(r.proc.supervisorUrl) })) })
    for (const r of this.replicas) await this.#waitUp(r.id)
  }

  async #waitUp (id: string): Promise<void> {
    await this.#haproxy!.waitServer('public_replicas', id, 'UP', UP_BOUND_MS)
    await this.#haproxy!.waitServer('supervisor_replicas', id, 'UP', UP_BOUND_MS)
  }

  // Which replica holds each sandbox's session: each live replica's own list (its internal
  // listener answers with what it holds).
  async owners (): Promise<Map<string, string>> {
    const m = new Map<string, string>()
    await Promise.all(this.replicas.map(async (r) => {
      try {
        const res = await fetch(new URL('/v1/sandboxes', r.internalUrl), { headers: this.#auth, signal: AbortSignal.timeout(2000) })
        const body = await res.json() as { sandboxes?: Array<{ id: string, status: string }> }
        for (const s of body.sandboxes ?? []) if (s.status === 'connected') m.set(s.id, r.id)
      } catch { /* down or slow: it holds nothing we can count on */ }
    }))
    return m
  }

  // SIGKILL (replica-kill) or SIGTERM and its drain (replica-restart) of one replica, down for
  // downMs, then a new process on its ports; resolves once haproxy has it UP again.
  async faultReplica (kind: 'replica-kill' | 'replica-restart', id: string, downMs: number, started: Map<string, number | null>, owned: string[]): Promise<Restart> {
    const rep = this.replicas.find((r) => r.id === id)!
    const old = rep.proc
    const r: Restart = { n: this.restarts.length + 1, killAt: Date.now(), started, kind, replica: id, owned }
    this.restarts.push(r)
    if (kind === 'replica-kill') await killGatewayProcess(old)
    else {
      try { old.proc.kill('SIGTERM') } catch { /* gone */ }
      let t: NodeJS.Timeout | undefined
      const done = await Promise.race([old.exited.then(() => true), new Promise<boolean>((resolve) => { t = setTimeout(() => { resolve(false) }, DRAIN_BOUND_MS) })])
      clearTimeout(t)
      if (!done) {
        this.forcedDrains.push(`${id} (restart #${r.n}) did not exit within ${DRAIN_BOUND_MS} ms of SIGTERM`)
        await killGatewayProcess(old)
      }
    }
    this.#note(old.output())
    if (kind === 'replica-restart') r.drainMs = Date.now() - r.killAt
    await sleep(downMs)
    rep.proc = await restartGatewayProcess(old, { startTimeoutMs: 30_000 })
    this.pids.push(rep.proc.pid)
    this.#tee(id, rep.proc)
    r.upAt = Date.now()
    await this.#waitUp(id).catch(() => { /* the recovery wait reports it */ })
    return r
  }

  async serverUp (id: string): Promise<boolean> {
    const h = this.#haproxy!
    return await h.serverStatus('public_replicas', id).catch(() => '') === 'UP' && await h.serverStatus('supervisor_replicas', id).catch(() => '') === 'UP'
  }

  // A /metrics gauge summed over the replicas (each counts only what it holds); undefined when
  // a live replica does not answer.
  async metricSum (name: string): Promise<number | undefined> {
    let sum = 0
    for (const r of this.replicas) {
      try {
        const text = await (await fetch(new URL('/metrics', r.proc.publicUrl), { signal: AbortSignal.timeout(3000) })).text()
        const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text)
        if (m === null) return undefined
        sum += Number(m[1])
      } catch { return undefined }
    }
    return sum
  }

  #tee (id: string, p: GatewayProcess): void {
    if (LOG_DIR === '') return
    let w = this.#logs.get(id)
    if (w === undefined) {
      mkdirSync(LOG_DIR, { recursive: true })
      w = createWriteStream(join(LOG_DIR, `${id}.log`), { flags: 'a' })
      w.on('error', () => { /* a full disk loses the log, not the run */ })
      this.#logs.set(id, w)
    }
    const out = w
    out.write(`--- pid ${p.pid} started at ${new Date().toISOString()} (its first lines, up to "listening", are in the tail)\n${p.output()}`)
    p.proc.stdout?.on('data', (c: Buffer) => out.write(c))
    p.proc.stderr?.on('data', (c: Buffer) => out.write(c))
  }

  #note (out: string): void {
    for (const [k, n] of countWarnings(out)) this.#warnings.set(k, (this.#warnings.get(k) ?? 0) + n)
  }

  warnings (): Map<string, number> {
    const all = new Map(this.#warnings)
    for (const r of this.replicas) for (const [k, n] of countWarnings(r.proc.output())) all.set(k, (all.get(k) ?? 0) + n)
    return all
  }

  // The tail of every replica's log, for a finding's reproduction.
  outputs (): string { return this.replicas.map((r) => `--- ${r.id} pid ${r.proc.pid}\n${r.proc.output().slice(-4000)}`).join('\n') }

  async close (): Promise<void> {
    try {
      if (LOG_DIR !== '' && this.#haproxy !== undefined) writeFileSync(join(LOG_DIR, 'haproxy.log'), this.#haproxy.output())
      if (LOG_DIR !== '' && this.#redis !== undefined) writeFileSync(join(LOG_DIR, 'redis-server.log'), this.#redis.logs())
      await this.#haproxy?.stop()
      await Promise.all(this.replicas.map(async (r) => { await r.proc.stop() }))
      await this.#redis?.stop()
      for (const w of this.#logs.values()) w.end()
    } finally {
      rmSync(this.dataDir, { recursive: true, force: true })
    }
  }
}
