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

export class SshPool {
  readonly #opts: SshPoolOptions
  readonly #members = new Map<string, Set<Member>>()
  // Connection setups belong to the pool, not to the exec that started them: one caller giving
  // up must not fail the others waiting on the same connection.
  readonly #closing = new AbortController()

  constructor (opts: SshPoolOptions) {
    this.#opts = opts
    // A new session may be another supervisor process with another daemon (a restart, a
    // takeover): connections made over the old one's relays lead to the old daemon. They keep
    // the execs they carry, but new execs go over the new session.
    opts.registry.onRegistered((sandboxId) => { this.#retire(sandboxId) })
  }

  // Whose sessions the pool's relays come from: the exec layer asks it what a sandbox's daemon is.
  get registry (): SessionRegistry { return this.#opts.registry }

  stats (sandboxId?: string): { connections: number, leased: number } {
    let connections = 0
    let leased = 0
    for (const [id, set] of this.#members) {
      if (sandboxId !== undefined && id !== sandboxId) continue
      for (const m of set) { connections++; leased += m.leased }
    }
    return { connections, leased }
  }

  // A connection with a free channel slot: a live pooled one, one still being set up, or a new
  // one. `fresh` skips the pool (a retry after a channel that never opened).
  async acquire (sandboxId: string, signal: AbortSignal, fresh = false): Promise<Lease> {
    const o = this.#opts
    let member: Member | undefined
    if (o.pooling && !fresh) {
      for (const m of this.#members.get(sandboxId) ?? []) {
        if (!m.dead && m.leased < o.channelsPerConnection) { member = m; break }
      }
    }
    if (member === undefined) member = this.#create(sandboxId)
    else this.#take(member)
    const m = member
    try {
      await abortable(m.ready, signal)
    } catch (err) {
      this.#release(sandboxId, m)
      throw err
    }
    return this.#lease(sandboxId, m)
  }

  close (): void {
    this.#closing.abort(new GatewayError('shutting_down', 'the gateway is shutting down'))
    for (const [id, set] of this.#members) for (const m of [...set]) { this.#remove(id, m); m.conn?.end() }
  }

  #create (sandboxId: string): Member {
    const m = { conn: undefined, dead: false, leased: 1, idleTimer: undefined } as Omit<Member, 'ready'> as Member
    let set = this.#members.get(sandboxId)
    if (set === undefined) { set = new Set(); this.#members.set(sandboxId, set) }
    set.add(m)
    m.ready = this.#open(sandboxId, m)
    m.ready.catch(() => {
      m.dead = true
      this.#remove(sandboxId, m)
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
    for (const m of [...this.#members.get(sandboxId) ?? []]) {
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
    const set = this.#members.get(sandboxId)
    if (set === undefined) return
    set.delete(m)
    if (set.size === 0) this.#members.delete(sandboxId)
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
