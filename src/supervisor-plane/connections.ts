import http2, { type Http2Session } from 'node:http2'
import type { Socket } from 'node:net'
import type { H2Pinger } from '../relay/h2-ping.js'
import type { Refusals, RefusalReason } from '../refusals.js'
import { KeyedBuckets, TokenBucket } from './budget.js'

// Every TCP connection to the supervisor listener, from accept to close, with its budgets.
// A peer is presumed hostile until one of its streams shows a valid token, and even then it
// speaks for one sandbox only, whose code may own it. Beyond any budget the connection is
// closed: GOAWAY ENHANCE_YOUR_CALM, then the session and the socket are destroyed.

export interface ConnectionLimits {
  supervisorRefusedStreamsPerMinute: number
  supervisorAuthTimeoutMs: number
  maxUnauthenticatedConnections: number
  // Also the connections one sandbox may hold: each carries one session.
  maxSessionStreamsPerSandbox: number
}

export interface Conn {
  readonly socket: Socket
  readonly remoteAddress: string | undefined
  session: Http2Session | undefined
  pinger: H2Pinger | undefined
  // The sandbox of the first valid token on the connection; undefined until then.
  sandboxId: string | undefined
  streams: number
  // Streams the peer opened that reached the stream handler, and those the HTTP/2 layer
  // refused below it that were already charged to the budget.
  seenStreams: number
  chargedHidden: number
  closing: boolean
  readonly key: string
  authTimer: NodeJS.Timeout | undefined
  readonly refused: TokenBucket
  readonly frames: TokenBucket
}

// PING and SETTINGS frames a peer may send per minute (and at once). An honest supervisor
// PINGs every 10 s at most and settles its SETTINGS once; nghttp2 answers each by itself, so
// without a budget a flood costs us a write per frame for as long as it lasts.
const CONTROL_FRAMES_PER_MINUTE = 600
// How often the streams the HTTP/2 layer refused below us are counted.
const HIDDEN_STREAM_AUDIT_MS = 250
// A connection being closed gets this long to flush its GOAWAY before its socket is destroyed.
const SOCKET_RELEASE_MS = 250
// An address whose connection was closed for abuse has its next connections dropped at once
// for a while: 50 ms, doubling with each strike up to a second, forgotten after 10 s without
// one. A peer that reconnects the moment it is closed (a rapid reset per connection) would
// otherwise cost a whole HTTP/2 setup and its first batch of frames each time (~4 ms of CPU);
// a dropped connection costs under a third of a millisecond. Connections already open from the
// same address (another sandbox behind the same NAT) are not touched; a reconnect of theirs is
// refused for at most a second, which a supervisor's backoff rides out.
const PENALTY_BASE_MS = 50
const PENALTY_MAX_MS = 1000
const PENALTY_FORGET_MS = 10_000
const PENALIZED: ReadonlySet<RefusalReason> = new Set(['refused_streams', 'frame_flood', 'sandbox_connections'])

export class ConnectionTable {
  readonly #lim: ConnectionLimits
  readonly #refusals: Refusals
  // By remote address and port: unique among live TCP connections to one listener, and the
  // same seen from the raw socket, the TLS socket and the http2 session's socket.
  readonly #conns = new Map<string, Conn>()
  readonly #perSandbox = new Map<string, number>()
  // The same, found once per session: a flood's every stream asks.
  readonly #bySession = new WeakMap<Http2Session, Conn>()
  // Refused streams are budgeted per sandbox once a connection speaks for one, so a sandbox
  // that reconnects gets its spent budget back, not a fresh one.
  readonly #sandboxRefused: KeyedBuckets
  readonly #audit: NodeJS.Timeout
  readonly #penalties = new Map<string, { until: number, strikes: number }>()
  #unauthenticated = 0
  #authenticated = 0
  readonly #setMaxConnections: (n: number) => void

  // setMaxConnections is the listening server's maxConnections: kept at the authenticated
  // connections plus the unauthenticated cap, Node itself drops a connection over the cap as
  // it accepts it, before any TLS or HTTP/2 work (a flood of them costs us next to nothing).
  constructor (lim: ConnectionLimits, refusals: Refusals, setMaxConnections: (n: number) => void) {
    this.#lim = lim
    this.#refusals = refusals
    this.#setMaxConnections = setMaxConnections
    this.#capacityChanged()
    const perMinute = lim.supervisorRefusedStreamsPerMinute
    this.#sandboxRefused = new KeyedBuckets(() => new TokenBucket(perMinute, perMinute / 60))
    this.#audit = setInterval(() => { for (const c of this.#conns.values()) this.#auditHiddenStreams(c) }, HIDDEN_STREAM_AUDIT_MS)
    this.#audit.unref()
  }

  get all (): IterableIterator<Conn> { return this.#conns.values() }

  // A connection Node dropped at accept for the cap.
  dropped (remoteAddress: string | undefined): void {
    this.#refusals.refuse('connection_limit', undefined, 'supervisor connection refused: too many unauthenticated connections', { limit: this.#lim.maxUnauthenticatedConnections, remoteAddress })
  }

  // A new TCP connection; undefined (and the socket destroyed) when too many are waiting to
  // authenticate: the newest goes, those that may be about to show a token stay. (Node's
  // maxConnections drops them first; this is for what slips past it.)
  admit (socket: Socket): Conn | undefined {
    if (this.#unauthenticated >= this.#lim.maxUnauthenticatedConnections) {
      this.dropped(socket.remoteAddress)
      socket.destroy()
      return undefined
    }
    const penalty = this.#penalties.get(socket.remoteAddress ?? '')
    if (penalty !== undefined && performance.now() < penalty.until) {
      this.#refusals.refuse('address_penalty', undefined, 'supervisor connection refused: its address was just closed for abuse', { remoteAddress: socket.remoteAddress, strikes: penalty.strikes })
      socket.destroy()
      return undefined
    }
    const perMinute = this.#lim.supervisorRefusedStreamsPerMinute
    const key = connKey(socket.remoteAddress, socket.remotePort)
    const conn: Conn = {
      key,
      socket,
      remoteAddress: socket.remoteAddress,
      session: undefined,
      pinger: undefined,
      sandboxId: undefined,
      authTimer: undefined,
      refused: new TokenBucket(perMinute, perMinute / 60),
      frames: new TokenBucket(CONTROL_FRAMES_PER_MINUTE, CONTROL_FRAMES_PER_MINUTE / 60),
      streams: 0,
      seenStreams: 0,
      chargedHidden: 0,
      closing: false
    }
    this.#conns.set(key, conn)
    this.#unauthenticated++
    conn.authTimer = setTimeout(() => {
      conn.authTimer = undefined
      if (conn.sandboxId === undefined) this.close(conn, 'auth_timeout', `supervisor connection closed: no valid token within ${this.#lim.supervisorAuthTimeoutMs} ms`)
    }, this.#lim.supervisorAuthTimeoutMs)
    conn.authTimer.unref()
    socket.once('close', () => {
      clearTimeout(conn.authTimer)
      if (conn.sandboxId === undefined) this.#unauthenticated--
      else {
        decrement(this.#perSandbox, conn.sandboxId)
        this.#authenticated--
        this.#capacityChanged()
      }
      if (this.#conns.get(key) === conn) this.#conns.delete(key)
    })
    return conn
  }

  of (session: Http2Session): Conn | undefined {
    const known = this.#bySession.get(session)
    if (known !== undefined) return known
    try {
      // For TLS this is the TLS socket, whose address and port are those of the TCP connection.
      const s = session.socket
      const conn = this.#conns.get(connKey(s.remoteAddress, s.remotePort))
      if (conn !== undefined) this.#bySession.set(session, conn)
      return conn
    } catch {
      return undefined
    }
  }

  // The connection speaks for the sandbox from now on. False when the sandbox already holds
  // its share: an idle authenticated connection costs a socket, and one token must not be
  // able to hold them all.
  authenticate (conn: Conn, sandboxId: string): boolean {
    if (conn.sandboxId !== undefined) return conn.sandboxId === sandboxId
    const held = this.#perSandbox.get(sandboxId) ?? 0
    if (held >= this.#lim.maxSessionStreamsPerSandbox) return false
    this.#perSandbox.set(sandboxId, held + 1)
    conn.sandboxId = sandboxId
    this.#unauthenticated--
    this.#authenticated++
    this.#capacityChanged()
    clearTimeout(conn.authTimer)
    conn.authTimer = undefined
    return true
  }

  // A refused (or peer-reset) stream, or several the HTTP/2 layer refused: spends the budget
  // and closes the connection once it is gone.
  spend (conn: Conn, n = 1, what = 'too many streams reset or refused'): void {
    const bucket = conn.sandboxId === undefined ? conn.refused : this.#sandboxRefused.get(conn.sandboxId)
    if (!bucket.take(n)) this.close(conn, 'refused_streams', `supervisor connection closed: ${what}`, { perMinute: this.#lim.supervisorRefusedStreamsPerMinute })
  }

  // A PING or SETTINGS frame from the peer.
  controlFrame (conn: Conn): void {
    if (!conn.frames.take()) this.close(conn, 'frame_flood', 'supervisor connection closed: PING/SETTINGS frames over budget', { perMinute: CONTROL_FRAMES_PER_MINUTE })
  }

  // GOAWAY ENHANCE_YOUR_CALM, then the session is destroyed, and the socket too if it has not
  // gone within a moment: a peer that does not read cannot hold it open by leaving the GOAWAY
  // unsent in our buffers.
  close (conn: Conn, reason: RefusalReason, message: string, fields: Record<string, unknown> = {}): void {
    if (conn.closing) return
    conn.closing = true
    this.#refusals.refuse(reason, conn.sandboxId, message, { ...fields, remoteAddress: conn.remoteAddress })
    if (PENALIZED.has(reason) && conn.remoteAddress !== undefined) this.#strike(conn.remoteAddress)
    // Out of any nghttp2 callback we may be in.
    setImmediate(() => {
      const s = conn.session
      if (s === undefined || s.destroyed) { conn.socket.destroy(); return }
      try { s.goaway(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM) } catch { /* already closing */ }
      setImmediate(() => { s.destroy(undefined, http2.constants.NGHTTP2_ENHANCE_YOUR_CALM) })
      setTimeout(() => conn.socket.destroy(), SOCKET_RELEASE_MS).unref()
    })
  }

  stop (): void {
    clearInterval(this.#audit)
  }

  #strike (address: string): void {
    const now = performance.now()
    const p = this.#penalties.get(address)
    const strikes = p === undefined || now - p.until > PENALTY_FORGET_MS ? 1 : p.strikes + 1
    this.#penalties.delete(address)
    if (this.#penalties.size >= 10_000) this.#penalties.delete(this.#penalties.keys().next().value!)
    this.#penalties.set(address, { strikes, until: now + Math.min(PENALTY_MAX_MS, PENALTY_BASE_MS * 2 ** (strikes - 1)) })
  }

  #capacityChanged (): void {
    this.#setMaxConnections(this.#authenticated + this.#lim.maxUnauthenticatedConnections)
  }

  // Node refuses some streams below us (too many header pairs, a header list over its size)
  // with RST_STREAM and never shows them: a peer could open them forever on an authenticated
  // connection. The last stream id the peer used says how many it opened; those we never saw
  // spend the refused-stream budget like any refusal.
  #auditHiddenStreams (conn: Conn): void {
    const s = conn.session
    if (s === undefined || s.destroyed || conn.closing) return
    let last: number
    try { last = s.state.lastProcStreamID ?? 0 } catch { return }
    // Client streams have odd ids: 1, 3, 5, ...
    const hidden = Math.floor((last + 1) / 2) - conn.seenStreams - conn.chargedHidden
    if (hidden <= 0) return
    conn.chargedHidden += hidden
    this.spend(conn, hidden, 'too many streams refused by the HTTP/2 layer')
  }
}

function connKey (address: string | undefined, port: number | undefined): string {
  return `${address ?? '?'}|${port ?? '?'}`
}

function decrement (m: Map<string, number>, key: string): void {
  const n = (m.get(key) ?? 1) - 1
  if (n <= 0) m.delete(key)
  else m.set(key, n)
}
