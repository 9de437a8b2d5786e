import { randomUUID } from 'node:crypto'
import type { Logger } from 'pino'
import type { RefusalReason } from '../refusals.js'
import type { SupervisorSession } from '../relay/sessions.js'
import type { TokenBucket } from './budget.js'
import { decode, encode, LineSplitter, SupervisorMessages, type GatewayMessage, type SupervisorMessage } from './messages.js'

// One supervisor session, without its transport: the listener feeds it the bytes of the
// session stream (or a test feeds it decoded messages) and it answers through write/end
// callbacks, the way ssh2's Protocol is driven by onWrite. Everything it is given comes from a
// sandbox that may be hostile, so nothing here may throw out of push() or receive(): a line
// that is not a message is refused and skipped, and a handler that throws anyway ends this
// session, never the process.
//
//   awaiting_hello ──hello──▶ accepted ──(end, close, transport gone)──▶ ended
//         └─────────────(superseded instance, limits, errors)───────────────┘

export type SessionState = 'awaiting_hello' | 'accepted' | 'ended'

interface SessionTransport {
  // Writes one encoded line; false when the stream can no longer be written.
  write: (line: string) => boolean
  // Bytes written but not yet taken by the peer.
  pendingBytes: () => number
  // Ends the stream; the transport bounds how long the peer may take to go.
  end: () => void
}

// What the session needs of the registry (SessionRegistry has it).
export interface SessionRegistryPort {
  mayRegister: (sandboxId: string, instanceId: string | undefined) => boolean
  register: (session: SupervisorSession, info: { sshHostKey?: string | undefined, sshUser?: string | undefined, keepsExecs?: boolean | undefined }) => void
  unregister: (session: SupervisorSession) => void
  touch: (sandboxId: string) => void
  failRelay: (relayId: string, sandboxId: string, reason: string) => void
  // False while the gateway drains (cluster mode): a new session is sent on to another replica.
  acceptingSessions?: () => boolean
}

type Refuse = (reason: RefusalReason, sandboxId: string | undefined, message: string, fields?: Record<string, unknown>) => void

export interface SessionOptions {
  sandboxId: string
  registry: SessionRegistryPort
  transport: SessionTransport
  refuse: Refuse
  logger: Logger
  // Lifecycle lines (registered, ended): the listener rate-limits them per sandbox, since a
  // sandbox can open and close sessions as fast as it likes.
  info: (fields: Record<string, unknown>, message: string) => void
  heartbeatIntervalMs: number
  pingIntervalMs: number
  pingTimeoutMs: number
  gatewayPublicKey: string
  lineMaxBytes: number
  // Shared by the sandbox's sessions: a new session does not refill it.
  messages: TokenBucket
  // Why the session's token is no longer accepted, or undefined while it is.
  tokenRefusal: () => string | undefined
  // The token was revoked: the listener closes the whole connection, whose relays were opened
  // on the same token's authority.
  onRevoked: () => void
}

// Gateway messages a peer may leave unread before the session is ended: heartbeats and relay
// requests are small, so an honest supervisor never comes near it.
export const SEND_BACKLOG_MAX_BYTES = 256 * 1024

export class SessionMachine implements SupervisorSession {
  readonly id = randomUUID()
  readonly sandboxId: string
  readonly connectedAt = new Date()
  readonly #o: SessionOptions
  readonly #lines: LineSplitter
  readonly #heartbeat: NodeJS.Timeout
  #state: SessionState = 'awaiting_hello'
  #instanceId: string | undefined
  #registered = false

  constructor (opts: SessionOptions) {
    this.#o = opts
    this.sandboxId = opts.sandboxId
    this.#lines = new LineSplitter(opts.lineMaxBytes)
    // A session lives no longer than its token: checked at every heartbeat.
    this.#heartbeat = setInterval(() => { if (!this.checkToken()) this.send({ type: 'heartbeat' }) }, opts.heartbeatIntervalMs)
    this.#heartbeat.unref()
  }

  get state (): SessionState { return this.#state }
  get instanceId (): string | undefined { return this.#instanceId }

  // Bytes from the session stream, in any chunking.
  push (chunk: Buffer): void {
    if (this.#state === 'ended') return
    this.#o.registry.touch(this.sandboxId)
    this.#lines.push(chunk, (line) => this.#line(line), (bytes) => {
      this.#o.refuse('line_too_long', this.sandboxId, 'supervisor session line too long; ending the session', { bytes, maxBytes: this.#o.lineMaxBytes })
      this.#end()
    })
  }

  // One decoded message. Public so that tests can drive the machine without bytes.
  receive (msg: SupervisorMessage): void {
    if (this.#state === 'ended') return
    try {
      this.#handle(msg)
    } catch (err) {
      this.#o.refuse('handler_error', this.sandboxId, 'a supervisor message handler failed; ending the session', { type: typeOf(msg), error: errorText(err) })
      this.#end()
    }
  }

  send (msg: GatewayMessage): boolean {
    if (this.#state === 'ended') return false
    if (this.#o.transport.pendingBytes() > SEND_BACKLOG_MAX_BYTES) {
      this.#o.refuse('session_backlog', this.sandboxId, 'supervisor does not read its session stream; ending the session', { pendingBytes: this.#o.transport.pendingBytes() })
      this.#end()
      return false
    }
    return this.#o.transport.write(encode(msg))
  }

  // The registry ends a session (superseded, shutting down).
  close (reason: string): void {
    if (this.#state === 'ended') return
    this.#o.info({ sessionId: this.id, reason }, 'closing supervisor session')
    this.#end()
  }

  // True when the token is no longer accepted, and the session was ended for it.
  checkToken (): boolean {
    if (this.#state === 'ended') return false
    const reason = this.#o.tokenRefusal()
    if (reason === undefined) return false
    this.#o.logger.warn({ sandboxId: this.sandboxId, sessionId: this.id, reason }, 'ending a supervisor session: its token is no longer accepted')
    this.send({ type: 'rejected', reason: `supervisor token no longer accepted: ${reason}` })
    this.#end()
    this.#o.onRevoked()
    return true
  }

  // The transport is gone (closed, reset, connection lost).
  closed (): void {
    this.#end(false)
  }

  #line (line: Buffer): 'go on' | 'stop' {
    if (this.#state === 'ended') return 'stop'
    // Every line counts, blank and bad ones too: they cost as much to look at.
    if (!this.#o.messages.take()) {
      this.#o.refuse('message_rate', this.sandboxId, 'supervisor session messages over the rate; ending the session', {})
      this.#end()
      return 'stop'
    }
    if (isBlank(line)) return 'go on'
    const d = decode(SupervisorMessages, line)
    if (!d.ok) {
      this.#o.refuse('bad_message', this.sandboxId, 'bad message from supervisor', { why: d.why, bytes: line.length })
      return 'go on'
    }
    this.receive(d.msg)
    // The message may have ended the session (a refused hello): no line after it is read.
    return (this.#state as SessionState) === 'ended' ? 'stop' : 'go on'
  }

  #handle (msg: SupervisorMessage): void {
    switch (msg.type) {
      case 'hello': this.#hello(msg); return
      case 'heartbeat': return
      case 'relay_failed':
        if (this.#state !== 'accepted') {
          this.#o.refuse('bad_message', this.sandboxId, 'relay_failed before hello', {})
          return
        }
        this.#o.registry.failRelay(msg.relayId, this.sandboxId, msg.reason)
    }
  }

  #hello (msg: Extract<SupervisorMessage, { type: 'hello' }>): void {
    if (this.#state !== 'awaiting_hello') {
      this.#o.refuse('bad_message', this.sandboxId, 'a second hello on one session', {})
      return
    }
    if (this.#o.registry.acceptingSessions?.() === false) {
      this.send({ type: 'rejected', reason: 'draining: this replica is shutting down; connect again to reach another one' })
      this.#end()
      return
    }
    if (!this.#o.registry.mayRegister(this.sandboxId, msg.instanceId)) {
      this.#o.refuse('superseded_instance', this.sandboxId, 'refusing a superseded supervisor while the newer one is connected', { instanceId: msg.instanceId })
      this.send({ type: 'rejected', reason: 'superseded: a newer supervisor process serves this sandbox' })
      this.#end()
      return
    }
    this.#state = 'accepted'
    this.#instanceId = msg.instanceId
    this.send({
      type: 'accepted',
      sessionId: this.id,
      heartbeatIntervalMs: this.#o.heartbeatIntervalMs,
      pingIntervalMs: this.#o.pingIntervalMs,
      pingTimeoutMs: this.#o.pingTimeoutMs,
      gatewayPublicKey: this.#o.gatewayPublicKey
    })
    this.#registered = true
    this.#o.registry.register(this, { sshHostKey: msg.sshHostKey, sshUser: msg.sshUser, keepsExecs: msg.keepsExecs === true })
    this.#o.info({ sessionId: this.id }, 'supervisor session registered')
  }

  #end (endTransport = true): void {
    if (this.#state === 'ended') return
    this.#state = 'ended'
    clearInterval(this.#heartbeat)
    if (this.#registered) {
      this.#o.registry.unregister(this)
      this.#o.info({ sessionId: this.id }, 'supervisor session ended')
    }
    if (endTransport) this.#o.transport.end()
  }
}

// Both only ever read what is safe to read on any value: a thrown non-Error, or a message whose
// toString is not callable, must not throw again from the catch that reports it.
function typeOf (msg: unknown): string {
  const t: unknown = typeof msg === 'object' && msg !== null ? (msg as { type?: unknown }).type : undefined
  return typeof t === 'string' ? t.slice(0, 32) : typeof msg
}

function errorText (err: unknown): string {
  const m: unknown = err instanceof Error ? err.message : undefined
  return typeof m === 'string' ? m.slice(0, 200) : typeof err
}

function isBlank (line: Buffer): boolean {
  for (const b of line) if (b !== 0x20 && b !== 0x09 && b !== 0x0d) return false
  return true
}
