import { setMaxListeners } from 'node:events'
import type { Logger } from 'pino'
import ssh2 from 'ssh2'
import type { GatewayEvents } from '../diagnostics.js'
import type { SessionRegistry } from './sessions.js'
import { GatewayError } from '../errors.js'
import type { Refusals } from '../refusals.js'
import { SshConnection } from './ssh-connection.js'

// Warm SSH connections per sandbox. A fresh connection costs a relay, a handshake and (with
// OpenSSH) a fork and re-exec of sshd, ~150 ms; a channel on an open one costs a round trip.
// Each pooled connection keeps its own keepalive, carries up to channelsPerConnection execs,
// and closes after idleCloseMs without any. With pooling off, every exec gets its own
// connection, closed when the exec ends.
//
// At most maxOpensPerSandbox connections of a sandbox are being opened (relay and handshake) at
// once: that is what asks the supervisor for relay streams, and the budget it guards is the
// registry's pending-relay cap. A caller that finds no free slot and no room for another open
// waits in the sandbox's queue, first come first served, instead of being refused; each open
// that settles moves the queue on. The wait is as bounded as the opens it waits for: when an
// open fails and none has succeeded since a caller queued, the sandbox is not serving, and that
// caller gets the open's error (what it would have got from an open of its own).

export interface SshPoolOptions {
  registry: SessionRegistry
  privateKey: string
  keepaliveIntervalMs: number
  keepaliveCountMax: number
  readyTimeoutMs: number
  pooling: boolean
  channelsPerConnection: number
  idleCloseMs: number
  logger: Logger
  // What a hostile sandbox SSH daemon sends that is refused, counted and logged per sandbox.
  refusals: Refusals
  // Connections of one sandbox being opened at once; at most its pending-relay cap.
  maxOpensPerSandbox: number
  maxRekeysPerMinute: number
  maxRefusedChannelOpens: number
  // How long relays and handshakes take, and why they fail: published for metrics.
  events: GatewayEvents
}

export interface Lease {
  conn: SshConnection
  release: () => void
}

interface Member {
  // Relay open and SSH handshake, shared by every exec that joins while it is under way.
  ready: Promise<SshConnection>
  conn: SshConnection | undefined
  dead: boolean
  leased: number
  idleTimer: NodeJS.Timeout | undefined
}

// An acquire that found neither a free slot nor room for another open.
interface Waiter {
  fresh: boolean
  // The sandbox's count of successful opens when it queued.
  seenOpens: number
  admit: (m: Member) => void
  reject: (err: unknown) => void
}

interface SandboxConns {
  members: Set<Member>
  // Members whose relay and handshake are under way.
  opening: number
  openedOk: number
  queue: Waiter[]
}

export class SshPool {
  readonly #opts: SshPoolOptions
  readonly #sandboxes = new Map<string, SandboxConns>()
  // Connection setups belong to the pool, not to the exec that started them: one caller giving
  // up must not fail the others waiting on the same connection.
  readonly #closing = new AbortController()

  constructor (opts: SshPoolOptions) {
    this.#opts = opts
    // A new session may be another supervisor process with another daemon (a restart, a
    // takeover): connections made over the old one's relays lead to the old daemon. They keep
    // the execs they carry, but new execs go over the new session.
    opts.registry.onRegistered((sandboxId) => { this.#retire(sandboxId) })
    // Every open under way listens on it (through the registry's relay wait).
    setMaxListeners(0, this.#closing.signal)
  }

  // Whose sessions the pool's relays come from: the exec layer asks it what a sandbox's daemon is.
  get registry (): SessionRegistry { return this.#opts.registry }

  stats (sandboxId?: string): { connections: number, leased: number } {
    let connections = 0
    let leased = 0
    for (const [id, sb] of this.#sandboxes) {
      if (sandboxId !== undefined && id !== sandboxId) continue
      for (const m of sb.members) { connections++; leased += m.leased }
    }
    return { connections, leased }
  }

  // Acquires waiting for a connection of this sandbox (none free, and its opens at the budget).
  queued (sandboxId: string): number { return this.#sandboxes.get(sandboxId)?.queue.length ?? 0 }

  // A connection with a free channel slot: a live pooled one, one still being set up, or a new
  // one; when there is none and the sandbox's opens are at their budget, a place in its queue.
  // `fresh` skips the pool (a retry after a channel that never opened).
  async acquire (sandboxId: string, signal: AbortSignal, fresh = false): Promise<Lease> {
    if (signal.aborted) throw signal.reason
    const sb = this.#conns(sandboxId)
    const m = sb.queue.length === 0 ? this.#slot(sandboxId, sb, fresh) : undefined
    const member = m ?? await this.#queue(sandboxId, sb, fresh, signal)
    try {
      await abortable(member.ready, signal)
    } catch (err) {
      this.#release(sandboxId, member)
      throw err
    }
    return this.#lease(sandboxId, member)
  }

  close (): void {
    const reason = new GatewayError('shutting_down', 'the gateway is shutting down')
    this.#closing.abort(reason)
    for (const [id, sb] of this.#sandboxes) {
      for (const w of sb.queue.splice(0)) w.reject(reason)
      for (const m of [...sb.members]) { this.#remove(id, m); m.conn?.end() }
    }
  }

  #conns (sandboxId: string): SandboxConns {
    let sb = this.#sandboxes.get(sandboxId)
    if (sb === undefined) {
      sb = { members: new Set(), opening: 0, openedOk: 0, queue: [] }
      this.#sandboxes.set(sandboxId, sb)
    }
    return sb
  }

  // The sandbox's entry goes once nothing of it is left: many sandboxes come and go.
  #prune (sandboxId: string, sb: SandboxConns): void {
    if (sb.members.size === 0 && sb.opening === 0 && sb.queue.length === 0 && this.#sandboxes.get(sandboxId) === sb) this.#sandboxes.delete(sandboxId)
  }

  // A member with a free slot, taken, or a new one if the open budget has room.
  #slot (sandboxId: string, sb: SandboxConns, fresh: boolean): Member | undefined {
    const o = this.#opts
    if (o.pooling && !fresh) {
      for (const m of sb.members) {
        if (!m.dead && m.leased < o.channelsPerConnection) { this.#take(m); return m }
      }
    }
    if (sb.opening >= o.maxOpensPerSandbox) return undefined
    return this.#create(sandboxId, sb)
  }

  async #queue (sandboxId: string, sb: SandboxConns, fresh: boolean, signal: AbortSignal): Promise<Member> {
    return await new Promise<Member>((resolve, reject) => {
      const onAbort = (): void => {
        const i = sb.queue.indexOf(w)
        if (i >= 0) sb.queue.splice(i, 1)
        reject(signal.reason)
        this.#prune(sandboxId, sb)
      }
      const w: Waiter = {
        fresh,
        seenOpens: sb.openedOk,
        admit: (m) => { signal.removeEventListener('abort', onAbort); resolve(m) },
        reject: (err) => { signal.removeEventListener('abort', onAbort); reject(err) }
      }
      sb.queue.push(w)
      signal.addEventListener('abort', onAbort, { once: true })
    })
  }

  // Hands free slots and room for opens to the queue, in order.
  #pump (sandboxId: string): void {
    const sb = this.#sandboxes.get(sandboxId)
    if (sb === undefined) return
    while (sb.queue.length > 0) {
      const m = this.#slot(sandboxId, sb, sb.queue[0]!.fresh)
      if (m === undefined) break
      sb.queue.shift()!.admit(m)
    }
    this.#prune(sandboxId, sb)
  }

  #create (sandboxId: string, sb: SandboxConns): Member {
    const m = { conn: undefined, dead: false, leased: 1, idleTimer: undefined } as Omit<Member, 'ready'> as Member
    sb.members.add(m)
    sb.opening++
    m.ready = this.#open(sandboxId, m)
    m.ready.then(() => {
      sb.opening--
      sb.openedOk++
      this.#pump(sandboxId)
    }, (err: unknown) => {
      sb.opening--
      m.dead = true
      this.#remove(sandboxId, m)
      // The sandbox has served no connection since these queued: they get the open's error.
      const stalled = sb.queue.filter((w) => w.seenOpens === sb.openedOk)
      sb.queue = sb.queue.filter((w) => w.seenOpens !== sb.openedOk)
      for (const w of stalled) w.reject(err)
      this.#pump(sandboxId)
    })
    return m
  }

  async #open (sandboxId: string, m: Member): Promise<SshConnection> {
    const o = this.#opts
    const events = o.events
    const relayStart = performance.now()
    let sock
    try {
      sock = await o.registry.openRelay(sandboxId, this.#closing.signal)
    } catch (err) {
      events.relayFailed({ sandboxId, reason: GatewayError.is(err) ? err.code : 'aborted' })
      throw err
    }
    events.relayOpened({ sandboxId, seconds: (performance.now() - relayStart) / 1000 })
    const handshakeStart = performance.now()
    const sandbox = o.registry.get(sandboxId)
    const conn = new SshConnection({
      sock,
      username: sandbox?.sshUser ?? 'root',
      privateKey: o.privateKey,
      hostVerifier: sandbox?.sshHostKey === undefined ? undefined : hostKeyVerifier(sandbox.sshHostKey),
      keepaliveIntervalMs: o.keepaliveIntervalMs,
      keepaliveCountMax: o.keepaliveCountMax,
      readyTimeoutMs: o.readyTimeoutMs,
      logger: o.logger.child({ sandboxId }),
      sandboxId,
      refusals: o.refusals,
      maxRekeysPerMinute: o.maxRekeysPerMinute,
      maxRefusedChannelOpens: o.maxRefusedChannelOpens
    })
    m.conn = conn
    // A dead connection leaves the pool at once; its channels end on their own.
    conn.once('failure', (err: GatewayError) => {
      m.dead = true
      this.#remove(sandboxId, m)
      if (!conn.endedByUs) events.relayFailed({ sandboxId, reason: err.code })
    })
    try {
      await conn.ready
    } catch (err) {
      events.sshHandshake({ sandboxId, seconds: (performance.now() - handshakeStart) / 1000, outcome: 'failed' })
      conn.end()
      throw err
    }
    events.sshHandshake({ sandboxId, seconds: (performance.now() - handshakeStart) / 1000, outcome: 'ok' })
    return conn
  }

  #take (m: Member): void {
    m.leased++
    clearTimeout(m.idleTimer)
    m.idleTimer = undefined
  }

  #lease (sandboxId: string, m: Member): Lease {
    let released = false
    return {
      conn: m.conn!,
      release: () => {
        if (released) return
        released = true
        this.#release(sandboxId, m)
      }
    }
  }

  #release (sandboxId: string, m: Member): void {
    m.leased = Math.max(0, m.leased - 1)
    // A free slot on a connection that can take it: the queue's head may use it.
    if (this.#opts.pooling && !m.dead) this.#pump(sandboxId)
    if (m.leased > 0) return
    // Everyone who waited for a connection still being set up gave up: it idles once it is up.
    if (m.conn === undefined) { m.ready.then(() => { if (m.leased === 0) this.#idle(sandboxId, m) }, () => {}); return }
    this.#idle(sandboxId, m)
  }

  #idle (sandboxId: string, m: Member): void {
    const conn = m.conn!
    if (!this.#opts.pooling || m.dead || this.#closing.signal.aborted || !conn.alive) {
      this.#remove(sandboxId, m)
      conn.end()
      return
    }
    m.idleTimer = setTimeout(() => {
      this.#remove(sandboxId, m)
      conn.end()
    }, this.#opts.idleCloseMs)
    m.idleTimer.unref()
  }

  #retire (sandboxId: string): void {
    for (const m of [...this.#sandboxes.get(sandboxId)?.members ?? []]) {
      if (m.conn === undefined) continue
      m.dead = true
      if (m.leased === 0) {
        this.#remove(sandboxId, m)
        m.conn.end()
      }
    }
  }

  #remove (sandboxId: string, m: Member): void {
    clearTimeout(m.idleTimer)
    const sb = this.#sandboxes.get(sandboxId)
    if (sb === undefined) return
    sb.members.delete(m)
    this.#prune(sandboxId, sb)
  }
}

// Waits for p, or rejects with the signal's reason once it aborts; p itself goes on.
async function abortable<T> (p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) throw signal.reason
  return await new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason)
    signal.addEventListener('abort', onAbort, { once: true })
    p.then((v) => { signal.removeEventListener('abort', onAbort); resolve(v) }, (err: unknown) => { signal.removeEventListener('abort', onAbort); reject(err) })
  })
}

function hostKeyVerifier (publicKey: string): (key: Buffer) => boolean {
  const parsed = ssh2.utils.parseKey(publicKey)
  const want = Array.isArray(parsed) ? parsed[0] : parsed
  if (want === undefined || want instanceof Error) return () => false
  const blob = want.getPublicSSH()
  return (key: Buffer) => key.equals(blob)
}
