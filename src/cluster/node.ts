import type { Logger } from 'pino'
import { subscribeGateway, type GatewayEvents } from '../diagnostics.js'
import type { SessionRegistry, SupervisorSession } from '../relay/sessions.js'
import type { ExecEntry } from '../execs/exec-entry.js'
import { Directory } from './directory.js'
import { ExecRecords } from './exec-records.js'
import type { ReplicaInfo } from './reads.js'
import { DirectoryUnavailable } from './redis-client.js'
import { Reaper } from './reaper.js'
import { replicaAuthHeader, type ReplicaSecret } from './replica-auth.js'

// One replica's part in the cluster (docs/api.md §6): it publishes itself in the directory, claims
// each sandbox whose supervisor session it holds (fenced, so exactly one replica owns a sandbox
// at a time), gives the claim up when the session goes, and ends a session whose claim another
// replica has taken since. The session registry stays the local truth; this keeps Redis in step
// with it and never the other way round: Redis trouble never ends a session or an exec.

export interface ClusterNodeOptions {
  redisUrl: string
  // Namespace of the cluster's keys; replicas of one cluster share it.
  prefix?: string
  replicaId: string
  registry: SessionRegistry
  // This replica's exec records: an exec that ends is written to the directory for the others.
  entryOf: (execId: string) => ExecEntry | undefined
  // How long a finished exec stays readable (--exec-ttl-s), and how much output a rebuilt one holds.
  execTtlMs: number
  retentionBytes: number
  // An exec that ends here is written to the directory (from the execEnded event).
  events: GatewayEvents
  // The sandbox's claim went to a newer session on another replica, which rebuilds its kept
  // execs: their runs here are to stop without an outcome (ExecManager.handOver).
  // ... of these execs (those another replica has rebuilt already).
  onMoved: (sandboxId: string, execIds: ReadonlySet<string>) => string[]
  // The kept execs of a sandbox whose runs are here.
  keptExecs: (sandboxId: string) => string[]
  // How long a gone replica's execs may take to come back on another before they end with 503.
  reattachTimeoutMs: number
  // The replica key, to tell a previous owner that its sandbox moved here.
  secret: () => ReplicaSecret
  logger: Logger
  replicaTtlMs?: number
  commandTimeoutMs?: number
  // How often held claims are compared with the directory (a claim taken by a newer session on
  // another replica ends the local session).
  checkIntervalMs?: number
}

interface Claim {
  session: SupervisorSession
  // Undefined until the directory has answered.
  fence: number | undefined
  // The first registration's try, with the previous owner told.
  registered: Promise<void>
  // The replica that held the sandbox before this claim, to tell once its execs are rebuilt here.
  previous?: string | undefined
}

const DEFAULT_PREFIX = 'exec-gateway:'
const DEFAULT_CHECK_INTERVAL_MS = 1000
// The directory's own default (Directory's replicaTtlMs).
const DEFAULT_REPLICA_TTL_MS = 5000
// Gone replicas are looked for every few checks: a SCAN over the running sets.
const REAP_EVERY_TICKS = 3
// How long a new owner waits for its registration (and the previous owner's letting go) before it
// rebuilds the sandbox's execs anyway; and the bound on telling the previous owner.
const ADOPT_WAIT_MS = 2000
const TELL_MOVED_MS = 1000
// How long a sandbox whose session went is watched for a registration elsewhere (its kept execs'
// runs here reattach meanwhile); well past any reattach bound.
const WATCH_RELEASED_MS = 10 * 60_000
// The owner check before a new exec starts here: a Redis round trip takes well under a
// millisecond on a LAN, so past this Redis is in trouble and the session here is trusted.
const OWNER_CHECK_MS = 250

async function boundedBy<T> (ms: number, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  p.catch(() => {})
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => { timer = setTimeout(() => { reject(new Error(`no answer within ${ms} ms`)) }, ms) })])
  } finally {
    clearTimeout(timer)
  }
}

export class ClusterNode {
  readonly replicaId: string
  #directory: Directory | undefined
  readonly #o: ClusterNodeOptions
  readonly #log: Logger
  readonly #claims = new Map<string, Claim>()
  // Sandboxes whose session here went, since when: if their supervisor comes back on another
  // replica, that replica rebuilds their kept execs and the runs here must stop.
  readonly #released = new Map<string, number>()
  readonly #off: Array<() => void> = []
  #check: NodeJS.Timeout | undefined
  #checking = false
  #closed = false
  #ticks = 0
  readonly #reaper: Reaper
  // Its execs' records in the directory, and the cluster's knowledge of execs not held here.
  readonly records: ExecRecords

  constructor (o: ClusterNodeOptions) {
    this.#o = o
    this.replicaId = o.replicaId
    this.#log = o.logger
    this.records = new ExecRecords({
      directory: () => this.directory,
      replicaId: o.replicaId,
      entryOf: o.entryOf,
      execTtlMs: o.execTtlMs,
      retentionBytes: o.retentionBytes,
      replicaTtlMs: o.replicaTtlMs ?? DEFAULT_REPLICA_TTL_MS,
      reattachTimeoutMs: o.reattachTimeoutMs,
      closed: () => this.#closed,
      logger: o.logger
    })
    this.#reaper = new Reaper({
      directory: () => this.directory,
      reattachTimeoutMs: o.reattachTimeoutMs,
      replicaTtlMs: o.replicaTtlMs ?? DEFAULT_REPLICA_TTL_MS,
      execTtlMs: o.execTtlMs,
      logger: o.logger
    })
  }

  get directory (): Directory {
    if (this.#directory === undefined) throw new Error('the cluster node has not started')
    return this.#directory
  }

  // Starts heartbeating, once this replica's listeners are up; a Redis that is not there yet is
  // waited for in the background (the replica serves its own sessions meanwhile).
  async start (urls: { internalUrl: string, publicUrl: string }): Promise<void> {
    const o = this.#o
    this.#directory = new Directory({
      url: o.redisUrl,
      prefix: o.prefix ?? DEFAULT_PREFIX,
      replicaId: o.replicaId,
      internalUrl: urls.internalUrl,
      publicUrl: urls.publicUrl,
      ...(o.replicaTtlMs === undefined ? {} : { replicaTtlMs: o.replicaTtlMs }),
      ...(o.commandTimeoutMs === undefined ? {} : { commandTimeoutMs: o.commandTimeoutMs })
    })
    this.#directory.onEvent((e) => {
      if (e.type === 'error') this.#log.warn({ err: e.error.message }, 'redis error')
      else if (e.type === 'republished') this.#log.info({ restored: e.restored.length, lost: e.lost.length }, 'directory entries published again after redis came back')
    })
    const registry = this.#o.registry
    this.#off.push(registry.onRegistered((sandboxId) => { this.#claim(sandboxId) }))
    this.#off.push(registry.onUnregistered((session) => { void this.#release(session) }))
    this.#off.push(subscribeGateway(this.#o.events.id, {
      // Created execs are recorded by their POST (before it is answered), rebuilt ones by
      // afterAdopt: only their end is taken from the events.
      execEnded: (m) => { void this.records.publishFinished(m.execId) }
    }))
    try {
      await this.directory.start()
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) throw err
      this.#log.warn({ err: err.message }, 'redis is not reachable yet; going on and retrying in the background')
    }
    const every = this.#o.checkIntervalMs ?? DEFAULT_CHECK_INTERVAL_MS
    this.#check = setInterval(() => { void this.#checkClaims() }, every)
    this.#check.unref()
  }

  // The live replica that owns this sandbox, when it is another one.
  async sandboxOwner (sandboxId: string): Promise<ReplicaInfo | undefined> {
    if (this.#claims.has(sandboxId)) return undefined
    const owner = await this.directory.owner(sandboxId)
    if (owner === undefined || !owner.replicaLive || owner.replicaId === this.replicaId) return undefined
    return await this.directory.replica(owner.replicaId)
  }

  // Before a new exec starts on a session held here: has a newer session on another replica
  // taken the sandbox since? A session here can outlive its supervisor's move (a path that went
  // silent, a replica that was frozen) until the claim check ends it; asking the directory now
  // closes the window in which two replicas would both start execs for one sandbox. The
  // session ends at once, and the answer names the new owner (undefined: start here). Asked
  // with a short bound, and Redis trouble answers "here": a replica keeps serving the sessions
  // it holds through an outage.
  async takenElsewhere (sandboxId: string): Promise<{ owner: ReplicaInfo | undefined } | undefined> {
    const claim = this.#claims.get(sandboxId)
    if (claim === undefined || claim.fence === undefined) return undefined
    let owner
    try {
      owner = await boundedBy(OWNER_CHECK_MS, this.directory.owner(sandboxId))
    } catch {
      return undefined
    }
    if (owner === undefined || owner.replicaId === this.replicaId || owner.fence <= claim.fence) return undefined
    await this.checkSandbox(sandboxId)
    const info = owner.replicaLive ? await this.directory.replica(owner.replicaId).catch(() => undefined) : undefined
    return { owner: info }
  }

  // The sandbox is another replica's now. Its kept execs here stop only once that replica has
  // rebuilt them (the exec's owner in the directory is that replica): until then a reader or a
  // GET still finds them here, never a 404 in between. Returns how many are still here.
  async #handOverRebuilt (sandboxId: string): Promise<number> {
    const here = this.#o.keptExecs(sandboxId)
    const rebuilt = new Set<string>()
    for (const id of here) {
      const owner = await this.directory.execOwner(id)
      if (owner !== undefined && owner.replicaId !== this.replicaId) rebuilt.add(id)
    }
    if (rebuilt.size > 0) {
      const ids = this.#o.onMoved(sandboxId, rebuilt)
      this.#log.info({ sandboxId, moved: ids.length }, 'execs rebuilt on the sandbox\'s new replica; their runs here stop')
      await this.directory.removeRunning(ids).catch((err: Error) => { this.#log.warn({ sandboxId, err: err.message }, 'could not remove moved execs from this replica\'s running set') })
    }
    return here.length - rebuilt.size
  }

  // The new owner has rebuilt what the sandbox's daemon kept (ExecManager's adoption): they are
  // recorded as this replica's, and the previous owner is told to let go of them now.
  async afterAdopt (sandboxId: string, execIds: string[]): Promise<void> {
    await Promise.all(execIds.map(async (id) => { await this.records.ownExec(id, sandboxId) }))
    const previous = this.#claims.get(sandboxId)?.previous
    if (previous !== undefined && execIds.length > 0) await this.#tellMoved(previous, sandboxId)
  }

  // Whether this replica holds the sandbox's claim (its session is here and the directory
  // agreed, or has not answered yet).
  holds (sandboxId: string): boolean {
    return this.#claims.has(sandboxId)
  }

  async close (): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    clearInterval(this.#check)
    for (const off of this.#off.splice(0)) off()
    // Claims go with the sessions the shutdown ends; what Redis cannot take now expires with
    // this replica's heartbeat as far as readers are concerned (replicaLive false).
    await Promise.allSettled([...this.#claims.values()].map(async (c) => { await this.#release(c.session) }))
    await this.#directory?.close({ deleteHeartbeat: true })
  }

  #claim (sandboxId: string): void {
    const session = this.#o.registry.get(sandboxId)?.session
    if (session === undefined || this.#closed) return
    const claim: Claim = { session, fence: undefined, registered: Promise.resolve() }
    this.#claims.set(sandboxId, claim)
    this.#released.delete(sandboxId)
    claim.registered = this.#register(sandboxId, claim).catch((err: unknown) => { this.#log.error({ err, sandboxId }, 'claiming the sandbox failed') })
  }

  async #register (sandboxId: string, claim: Claim): Promise<void> {
    const session = claim.session
    try {
      const r = await this.directory.register({ sandboxId, replicaId: this.replicaId, instanceId: session.instanceId, sessionId: session.id })
      if (this.#claims.get(sandboxId) !== claim) {
        // The session went while the directory answered: give back what it just took.
        if (r.ok) await this.#releaseFence(sandboxId, r.fence)
        return
      }
      if (!r.ok) {
        this.#log.warn({ sandboxId, owner: r.owner.replicaId, instanceId: session.instanceId }, 'a newer supervisor process serves this sandbox on another replica; refusing this one')
        this.#claims.delete(sandboxId)
        session.send({ type: 'rejected', reason: 'superseded: a newer supervisor process serves this sandbox' })
        session.close('superseded by a newer supervisor process on another replica')
        return
      }
      claim.fence = r.fence
      if (r.previous !== undefined && r.previous.replicaId !== this.replicaId) {
        this.#log.info({ sandboxId, from: r.previous.replicaId, fence: r.fence }, 'sandbox moved to this replica')
        claim.previous = r.previous.replicaId
        await this.#tellMoved(r.previous.replicaId, sandboxId)
      }
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) throw err
      // Tried again by the claim check once Redis answers.
      this.#log.warn({ sandboxId, err: err.message }, 'could not claim the sandbox in the directory yet')
    }
  }

  async #release (session: SupervisorSession): Promise<void> {
    const claim = this.#claims.get(session.sandboxId)
    if (claim === undefined || claim.session !== session) return
    this.#claims.delete(session.sandboxId)
    if (!this.#closed) this.#released.set(session.sandboxId, Date.now())
    if (claim.fence !== undefined) await this.#releaseFence(session.sandboxId, claim.fence)
  }

  async #releaseFence (sandboxId: string, fence: number): Promise<void> {
    try {
      await this.directory.release({ sandboxId, replicaId: this.replicaId, fence })
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) throw err
      this.#log.warn({ sandboxId, err: err.message }, 'could not release the sandbox in the directory; the directory releases it when redis answers again')
    }
  }

  async #checkClaim (sandboxId: string, claim: Claim): Promise<void> {
    const owner = await this.directory.owner(sandboxId)
    if (this.#claims.get(sandboxId) !== claim || claim.fence === undefined) return
    if (owner !== undefined && owner.replicaId === this.replicaId && owner.sessionId === claim.session.id) {
      // Ours, at the fence a late-answered registration left.
      claim.fence = owner.fence
    } else if (owner !== undefined && owner.fence > claim.fence) {
      this.#log.info({ sandboxId, to: owner.replicaId, fence: owner.fence }, 'sandbox taken over by a newer session elsewhere; ending the session here')
      this.#claims.delete(sandboxId)
      // Without a session here the runs cannot take the daemon's attachment back from the new
      // owner; they stop as it rebuilds them (#handOverRebuilt).
      this.#released.set(sandboxId, Date.now())
      claim.session.close('the sandbox moved to another replica')
      if (await this.#handOverRebuilt(sandboxId) === 0) this.#released.delete(sandboxId)
    }
  }

  async #checkReleased (): Promise<void> {
    const now = Date.now()
    for (const [sandboxId, since] of [...this.#released]) {
      if (now - since > WATCH_RELEASED_MS) { this.#released.delete(sandboxId); continue }
      await this.#checkReleasedOne(sandboxId, since)
    }
  }

  async #checkReleasedOne (sandboxId: string, since: number): Promise<void> {
    const owner = await this.directory.owner(sandboxId)
    if (this.#released.get(sandboxId) !== since) return
    if (owner !== undefined && owner.replicaId !== this.replicaId) {
      if (await this.#handOverRebuilt(sandboxId) === 0) this.#released.delete(sandboxId)
    }
  }

  // Before this replica rebuilds a sandbox's kept execs: the replica that held it has been told
  // to let go, so the two do not take the daemon's attachment from each other meanwhile.
  async readyToAdopt (sandboxId: string): Promise<void> {
    const claim = this.#claims.get(sandboxId)
    if (claim === undefined) return
    let timer: NodeJS.Timeout | undefined
    await Promise.race([claim.registered, new Promise<void>((resolve) => { timer = setTimeout(resolve, ADOPT_WAIT_MS) })])
    clearTimeout(timer)
  }

  // The replica that just took this sandbox says so (internal route): look now, not at the next check.
  async checkSandbox (sandboxId: string): Promise<void> {
    const claim = this.#claims.get(sandboxId)
    try {
      if (claim !== undefined && claim.fence !== undefined) await this.#checkClaim(sandboxId, claim)
      else if (this.#released.has(sandboxId)) await this.#checkReleasedOne(sandboxId, this.#released.get(sandboxId)!)
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) throw err
    }
  }

  async #tellMoved (replicaId: string, sandboxId: string): Promise<void> {
    try {
      const r = await this.directory.replica(replicaId)
      if (r === undefined) return
      await fetch(new URL(`/internal/v1/sandboxes/${encodeURIComponent(sandboxId)}/moved`, r.internalUrl), {
        method: 'POST',
        headers: replicaAuthHeader(this.#o.secret()),
        signal: AbortSignal.timeout(TELL_MOVED_MS)
      })
    } catch (err) {
      // Its own check finds out within a second.
      this.#log.debug({ sandboxId, replicaId, err: (err as Error).message }, 'could not tell the previous owner that the sandbox moved')
    }
  }

  // A claim another replica has taken since (a newer session there) ends the session here: two
  // replicas must never both take execs for one sandbox. A claim the directory has not
  // confirmed yet is registered again.
  async #checkClaims (): Promise<void> {
    if (this.#checking || this.#closed) return
    this.#checking = true
    try {
      for (const [sandboxId, claim] of [...this.#claims]) {
        if (claim.fence === undefined) { await this.#register(sandboxId, claim); continue }
        await this.#checkClaim(sandboxId, claim)
      }
      await this.#checkReleased()
      // Redis answers again (a pause may end before any reconnect or republish would tell).
      await this.records.rewriteUnwritten()
      if (++this.#ticks % REAP_EVERY_TICKS === 0) await this.#reaper.tick()
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) this.#log.error({ err }, 'claim check failed')
    } finally {
      this.#checking = false
    }
  }
}
