import { decodeFinished, encodeFinished, type FinishedInput, type FinishedRecord } from './finished.js'
import { DirectoryKeys } from './keys.js'
import { HeldOwners, SUPERSEDED_CAP } from './held.js'
import { incarnationOf, readOwners, readReplicas, readRunningSets, type ReplicaInfo } from './reads.js'
import { parseOwner, parseRegister, registerArgs, type OwnerView, type Registration, type RegisterResult } from './owners.js'
import { DirectoryUnavailable, RedisLink, type RedisCall } from './redis-client.js'
import { PUT_FINISHED, RATE_HIT, REGISTER, RELEASE, runScript } from './scripts.js'

// The cluster's shared state in Redis: which replicas are alive, which replica holds each
// sandbox's supervisor session (fenced), which replica runs each exec, and finished results.
// Every call is one or a few bounded round trips and fails with DirectoryUnavailable when Redis
// does not answer in time; nothing here waits for Redis to come back. When it does come back
// (even empty, after a restart), the directory puts back its heartbeat and the owner records it
// holds by itself, through the same fenced scripts, so it never overwrites a newer owner.

export interface DirectoryOptions {
  url: string
  // Namespace of every key, e.g. 'exec-gateway:'; clusters and tests sharing a Redis differ here.
  prefix: string
  replicaId: string
  internalUrl: string
  publicUrl: string
  replicaTtlMs?: number
  heartbeatIntervalMs?: number
  commandTimeoutMs?: number
  reconnectMaxMs?: number
  execOwnerTtlMs?: number
  // Per stream, of a finished exec's retained tail.
  finishedCapBytes?: number
}

export interface ExecOwner { replicaId: string, sandboxId: string }

export type PutFinishedOutcome = 'written' | 'same' | 'conflict'

export type DirectoryEvent =
  | { type: 'ready' }
  | { type: 'error', error: Error }
  // A connection that showed no sign of life while calls failed was dropped for a new one.
  | { type: 'connection-replaced' }
  // After each re-publish (Redis came back, or our heartbeat key was gone): the sandboxes whose
  // owner records were put back, and those found taken by someone else (no longer ours).
  | { type: 'republished', restored: string[], lost: string[] }

export class Directory {
  readonly replicaId: string
  readonly #opts: Required<DirectoryOptions>
  readonly #keys: DirectoryKeys
  readonly #link: RedisLink
  readonly #startedAt = new Date().toISOString()
  readonly #listeners = new Set<(e: DirectoryEvent) => void>()
  readonly #held: HeldOwners
  #heartbeatTimer: NodeJS.Timeout | undefined
  #started = false
  #closed = false
  #readyCount = 0
  #beats = 0
  #republishing: Promise<void> | undefined
  #republishAgain = false
  #ticking = false
  #beatSoon = false

  constructor (opts: DirectoryOptions) {
    const replicaTtlMs = opts.replicaTtlMs ?? 5000
    const commandTimeoutMs = opts.commandTimeoutMs ?? 1000
    this.#opts = {
      replicaTtlMs,
      heartbeatIntervalMs: Math.max(1, Math.floor(replicaTtlMs / 3)),
      commandTimeoutMs,
      reconnectMaxMs: 2000,
      execOwnerTtlMs: 3_600_000,
      finishedCapBytes: 1024 * 1024,
      ...stripUndefined(opts)
    }
    this.replicaId = opts.replicaId
    this.#keys = new DirectoryKeys(opts.prefix)
    this.#held = new HeldOwners(this.#keys)
    this.#link = new RedisLink({
      url: opts.url,
      commandTimeoutMs,
      reconnectMaxMs: this.#opts.reconnectMaxMs,
      onError: (error) => { this.#emit({ type: 'error', error }) },
      onReady: () => { this.#onReady() },
      onReplaced: () => { this.#emit({ type: 'connection-replaced' }) }
    })
  }

  onEvent (listener: (e: DirectoryEvent) => void): () => void {
    this.#listeners.add(listener)
    return () => { this.#listeners.delete(listener) }
  }

  get ready (): boolean {
    return this.#link.ready
  }

  // Connects and heartbeats from now on. Resolves once the first heartbeat is written; rejects
  // with DirectoryUnavailable if that takes longer than waitMs, but keeps trying in the
  // background either way (until close()).
  async start (waitMs = 5 * this.#opts.commandTimeoutMs): Promise<void> {
    if (this.#closed) throw new DirectoryUnavailable('the directory is closed')
    if (!this.#started) {
      this.#started = true
      this.#link.connect()
      this.#scheduleHeartbeat(0)
    }
    await this.#waitFor(() => this.#beats > 0, waitMs, `no heartbeat reached redis within ${waitMs} ms`)
  }

  // Writes this replica's heartbeat. When the key was gone (Redis restarted, was flushed, or we
  // were stalled past the TTL), what this replica holds is put back too.
  async heartbeat (): Promise<void> {
    const first = this.#beats === 0
    const wasThere = await this.#beat()
    if (!wasThere && !first) this.#requestRepublish()
  }

  // SET … GET: one round trip that also says whether the key was still there.
  async #beat (): Promise<boolean> {
    const info: ReplicaInfo = { replicaId: this.replicaId, internalUrl: this.#opts.internalUrl, publicUrl: this.#opts.publicUrl, startedAt: this.#startedAt }
    const previous = await this.#call('heartbeat', (c) => c.set(this.#keys.replica(this.replicaId), JSON.stringify(info), { PX: this.#opts.replicaTtlMs, GET: true }))
    this.#beats++
    return previous !== null
  }

  async replicas (): Promise<ReplicaInfo[]> {
    return await readReplicas(this.#callFn, this.#keys)
  }

  // Every owner record (SCAN), each with whether its replica's heartbeat is live.
  async owners (): Promise<OwnerView[]> {
    return await readOwners(this.#callFn, this.#keys)
  }

  async replica (replicaId: string): Promise<ReplicaInfo | undefined> {
    const v = await this.#call('replica', (c) => c.get(this.#keys.replica(replicaId)))
    return v === null ? undefined : JSON.parse(v) as ReplicaInfo
  }

  // Decides a supervisor registration for the whole cluster (scripts.ts REGISTER). On success
  // the caller tells result.previous's replica, if any, that its session was superseded.
  async register (r: Registration): Promise<RegisterResult> {
    const registeredAt = new Date().toISOString()
    const reply = await this.#call('register', (c) => runScript(c, REGISTER, this.#sandboxKeys(r.sandboxId), registerArgs(r, registeredAt, SUPERSEDED_CAP)))
    const { result, superseded } = parseRegister(reply)
    if (result.ok) this.#held.registered({ ...r, fence: result.fence, registeredAt, superseded })
    return result
  }

  // Clears the owner record if it still holds this fence; true if it did.
  async release (r: { sandboxId: string, replicaId: string, fence: number }): Promise<boolean> {
    const fence = this.#held.releasing(r.sandboxId, r.fence)
    try {
      const reply = await this.#call('release', (c) => runScript(c, RELEASE, [this.#keys.owner(r.sandboxId)], [r.replicaId, String(fence)]))
      return reply === 'released'
    } catch (err) {
      // Cleared once Redis is back instead.
      if (err instanceof DirectoryUnavailable) this.#held.releaseFailed(r.sandboxId, r.replicaId, fence)
      throw err
    }
  }

  async owner (sandboxId: string): Promise<OwnerView | undefined> {
    const hash = await this.#call('owner', (c) => c.hGetAll(this.#keys.owner(sandboxId)))
    const record = parseOwner(hash)
    if (record === undefined) return undefined
    const live = await this.#call('owner', (c) => c.exists(this.#keys.replica(record.replicaId)))
    return { ...record, replicaLive: live === 1 }
  }

  async putExecOwner (execId: string, owner: ExecOwner, ttlMs = this.#opts.execOwnerTtlMs): Promise<void> {
    const value = JSON.stringify({ replicaId: owner.replicaId, sandboxId: owner.sandboxId })
    await this.#call('putExecOwner', (c) => c.set(this.#keys.execOwner(execId), value, { PX: ttlMs }))
  }

  async execOwner (execId: string): Promise<ExecOwner | undefined> {
    const v = await this.#call('execOwner', (c) => c.get(this.#keys.execOwner(execId)))
    return v === null ? undefined : JSON.parse(v) as ExecOwner
  }

  // The first terminal write of an exec wins (scripts.ts PUT_FINISHED): 'same' for a repeat of
  // it, 'conflict' for a different one, which is dropped.
  async putFinished (execId: string, input: FinishedInput, ttlMs: number): Promise<PutFinishedOutcome> {
    if (!Number.isInteger(ttlMs) || ttlMs <= 0) throw new RangeError(`ttlMs must be a positive integer, got ${ttlMs}`)
    const e = encodeFinished(input, this.#opts.finishedCapBytes)
    const reply = await this.#call('putFinished', (c) => runScript(c, PUT_FINISHED, [this.#keys.finished(execId)], [e.digest, e.meta, e.record, e.stdout, e.stderr, String(ttlMs)]))
    return reply as PutFinishedOutcome
  }

  async finished (execId: string): Promise<FinishedRecord | undefined> {
    const [meta, record, stdout, stderr] = await this.#call('finished', (_c, b) => b.hmGet(this.#keys.finished(execId), ['meta', 'record', 'stdout', 'stderr']))
    if (meta == null || record == null || stdout == null || stderr == null) return undefined
    return decodeFinished(meta, record, stdout, stderr)
  }

  // This process in the cluster: a replica restarted under the same id is another incarnation,
  // and what the old one ran is the old one's.
  get incarnation (): string { return incarnationOf({ replicaId: this.replicaId, startedAt: this.#startedAt }) }

  async addRunning (execId: string, record: unknown): Promise<void> {
    await this.#call('addRunning', (c) => c.hSet(this.#keys.running(this.incarnation), execId, JSON.stringify(record)))
  }

  async removeRunning (execIds: string[], incarnation = this.incarnation): Promise<void> {
    if (execIds.length === 0) return
    await this.#call('removeRunning', (c) => c.hDel(this.#keys.running(incarnation), execIds))
  }

  async runningSets (): Promise<string[]> {
    return await readRunningSets((op, run) => this.#call(op, run), this.#keys)
  }

  async runningOf (incarnation: string): Promise<Map<string, unknown>> {
    const h = await this.#call('runningOf', (c) => c.hGetAll(this.#keys.running(incarnation)))
    const out = new Map<string, unknown>()
    for (const [id, json] of Object.entries(h)) {
      try { out.set(id, JSON.parse(json)) } catch { out.set(id, undefined) }
    }
    return out
  }

  async isRunningIn (incarnation: string, execId: string): Promise<boolean> {
    return await this.#call('isRunningIn', (c) => c.hExists(this.#keys.running(incarnation), execId)) === 1
  }

  // One replica at a time ends a gone incarnation's execs.
  async claimReap (incarnation: string, ttlMs: number): Promise<boolean> {
    return await this.#call('claimReap', (c) => c.set(this.#keys.reap(incarnation), this.incarnation, { NX: true, PX: ttlMs })) === 'OK'
  }

  // One hit on a cluster-wide rate limit: the count in the current window and the ms left of it.
  async rateHit (key: string, windowMs: number): Promise<{ current: number, ttl: number }> {
    const reply = await this.#call('rateHit', (c) => runScript(c, RATE_HIT, [this.#keys.rate(key)], [String(windowMs)])) as [number, number]
    return { current: Number(reply[0]), ttl: Number(reply[1]) }
  }

  // Whether any replica ever registered this sandbox (its fence counter exists).
  async knowsSandbox (sandboxId: string): Promise<boolean> {
    return await this.#call('knowsSandbox', (c) => c.exists(this.#keys.fence(sandboxId))) === 1
  }

  // DELETE of an exec: no replica finds it any more.
  async forgetExec (execId: string): Promise<void> {
    await this.#call('forgetExec', (c) => c.del([this.#keys.finished(execId), this.#keys.execOwner(execId)]))
  }

  // Stops the heartbeat, removes this replica's heartbeat key (so others stop forwarding to it
  // at once instead of after the TTL) unless told not to, and drops the connection. Resolves
  // within about one command bound, whatever Redis does.
  async close (opts: { deleteHeartbeat?: boolean } = {}): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    clearTimeout(this.#heartbeatTimer)
    this.#heartbeatTimer = undefined
    if (opts.deleteHeartbeat !== false && this.#link.ready) {
      await this.#link.run('close', (c) => c.del(this.#keys.replica(this.replicaId))).catch(() => {})
    }
    this.#link.destroy()
    this.#listeners.clear()
  }

  #sandboxKeys (sandboxId: string): string[] {
    return [this.#keys.owner(sandboxId), this.#keys.fence(sandboxId), this.#keys.superseded(sandboxId)]
  }

  readonly #callFn = async <T>(op: string, run: RedisCall<T>): Promise<T> => await this.#call(op, run)

  async #call<T> (op: string, run: RedisCall<T>): Promise<T> {
    if (this.#closed) throw new DirectoryUnavailable('the directory is closed')
    return await this.#link.run(op, run)
  }

  // One heartbeat chain: a tick schedules the next when it ends, and asking for one sooner
  // while a tick runs only shortens the wait after it.
  #scheduleHeartbeat (delayMs: number): void {
    if (this.#closed) return
    clearTimeout(this.#heartbeatTimer)
    this.#heartbeatTimer = setTimeout(() => { void this.#tick() }, delayMs)
  }

  async #tick (): Promise<void> {
    this.#ticking = true
    try {
      await this.heartbeat()
    } catch (err) {
      if (!this.#closed) this.#emit({ type: 'error', error: err as Error })
    } finally {
      this.#ticking = false
      this.#scheduleHeartbeat(this.#beatSoon ? 0 : this.#opts.heartbeatIntervalMs)
      this.#beatSoon = false
    }
  }

  #beatNow (): void {
    if (this.#ticking) this.#beatSoon = true
    else this.#scheduleHeartbeat(0)
  }

  #onReady (): void {
    this.#readyCount++
    this.#emit({ type: 'ready' })
    // The first heartbeat may have been tried before the connection was up.
    if (this.#beats === 0) this.#beatNow()
    // Every connection after the first may be to a Redis that lost everything.
    if (this.#readyCount > 1) this.#requestRepublish()
  }

  #requestRepublish (): void {
    if (this.#closed) return
    if (this.#republishing !== undefined) {
      this.#republishAgain = true
      return
    }
    this.#republishing = this.#republish()
      .catch((err: unknown) => { if (!this.#closed) this.#emit({ type: 'error', error: err as Error }) })
      .finally(() => {
        this.#republishing = undefined
        if (this.#republishAgain) {
          this.#republishAgain = false
          this.#requestRepublish()
        }
      })
  }

  // Heartbeat first, so a reader never sees a put-back record of a replica that looks dead.
  async #republish (): Promise<void> {
    await this.#beat()
    const { restored, lost } = await this.#held.republish(this.#callFn, (id) => this.#sandboxKeys(id))
    this.#emit({ type: 'republished', restored, lost })
  }

  async #waitFor (done: () => boolean, waitMs: number, message: string): Promise<void> {
    if (done()) return
    await new Promise<void>((resolve, reject) => {
      const poll = setInterval(() => {
        if (!done() && !this.#closed) return
        clearInterval(poll)
        clearTimeout(timer)
        if (done()) resolve()
        else reject(new DirectoryUnavailable('the directory is closed'))
      }, 10)
      const timer = setTimeout(() => {
        clearInterval(poll)
        reject(new DirectoryUnavailable(message))
      }, waitMs)
    })
  }

  #emit (e: DirectoryEvent): void {
    for (const l of [...this.#listeners]) {
      try {
        l(e)
      } catch {
        // A listener's failure is its own; the directory carries on.
      }
    }
  }
}

function stripUndefined<T extends object> (o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T
}
