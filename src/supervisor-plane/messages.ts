import { Type, type Static, type TSchema } from '@sinclair/typebox'
import { TypeCompiler, type TypeCheck } from '@sinclair/typebox/compiler'
import { Value } from '@sinclair/typebox/value'

// The supervisor wire protocol's messages, both directions, as the one definition both ends
// decode with. The gateway treats every supervisor line as hostile (sandbox code may own the
// supervisor and its valid token); the supervisor treats gateway lines as untrusted too, since
// a value it cannot use (a ping interval of "soon") must not reach its timers. Every string has
// a bound, so nothing a peer sends grows a record or a log line beyond it.

const MAX_MS = 24 * 3600 * 1000

// randomUUID() in practice; anything printable and short is taken.
const InstanceId = Type.String({ minLength: 1, maxLength: 128, pattern: '^[A-Za-z0-9._:-]+$' })
// POSIX portable user names, plus '@' for directory accounts and a trailing '$' for machine
// accounts: the name reaches ssh2 as the login and the sandbox listing as text.
const SshUser = Type.String({ minLength: 1, maxLength: 256, pattern: '^[A-Za-z0-9._][A-Za-z0-9._@-]*[$]?$' })
// An OpenSSH one-line public key (parsed by ssh2 at exec time): one line, no control
// characters; its comment may be any text.
const OneLine = '^[^\\x00-\\x1f\\x7f]+$'
const SshHostKey = Type.String({ minLength: 1, maxLength: 16 * 1024, pattern: OneLine })
const RelayId = Type.String({ minLength: 1, maxLength: 64, pattern: '^[A-Za-z0-9-]+$' })
export const REASON_MAX_CHARS = 1024
const Reason = Type.String({ maxLength: REASON_MAX_CHARS })
const Ms = (minimum: number): ReturnType<typeof Type.Integer> => Type.Integer({ minimum, maximum: MAX_MS })

// Supervisor → gateway. Unknown fields are dropped (a newer supervisor may say more).
export const HelloSchema = Type.Object({
  type: Type.Literal('hello'),
  instanceId: Type.Optional(InstanceId),
  sshHostKey: Type.Optional(SshHostKey),
  sshUser: Type.Optional(SshUser),
  // True when the sandbox's daemon keeps its execs and speaks the keeper protocol
  // (src/schemas/keeper.ts): the embedded daemon. OpenSSH targets do not.
  keepsExecs: Type.Optional(Type.Boolean())
})
export const SupervisorHeartbeatSchema = Type.Object({ type: Type.Literal('heartbeat') })
export const RelayFailedSchema = Type.Object({ type: Type.Literal('relay_failed'), relayId: RelayId, reason: Reason })

// Gateway → supervisor.
export const AcceptedSchema = Type.Object({
  type: Type.Literal('accepted'),
  sessionId: Type.String({ minLength: 1, maxLength: 64 }),
  heartbeatIntervalMs: Ms(10),
  pingIntervalMs: Ms(1),
  pingTimeoutMs: Ms(1),
  gatewayPublicKey: Type.String({ minLength: 1, maxLength: 16 * 1024, pattern: OneLine })
})
export const RelaySchema = Type.Object({ type: Type.Literal('relay'), relayId: RelayId })
const GatewayHeartbeatSchema = Type.Object({ type: Type.Literal('heartbeat') })
const SupersededSchema = Type.Object({ type: Type.Literal('superseded') })
export const RejectedSchema = Type.Object({ type: Type.Literal('rejected'), reason: Reason })
// Cluster mode: this replica drains. The supervisor opens a new session (the load balancer sends
// it to another replica) and leaves this one once the new one is accepted.
const MoveSchema = Type.Object({ type: Type.Literal('move') })

export type SupervisorMessage = Static<typeof HelloSchema> | Static<typeof SupervisorHeartbeatSchema> | Static<typeof RelayFailedSchema>
export type GatewayMessage =
  | Static<typeof AcceptedSchema> | Static<typeof RelaySchema> | Static<typeof GatewayHeartbeatSchema>
  | Static<typeof SupersededSchema> | Static<typeof RejectedSchema> | Static<typeof MoveSchema>

// One compiled checker per message type, chosen by `type` first: the error then names the
// field that is wrong, not "expected one of five objects".
export interface Codec<M> {
  readonly name: string
  readonly byType: ReadonlyMap<string, { schema: TSchema, check: TypeCheck<TSchema> }>
  // Carries M only for the type checker.
  readonly message?: M
}

function codec<M> (name: string, schemas: readonly TSchema[]): Codec<M> {
  const byType = new Map<string, { schema: TSchema, check: TypeCheck<TSchema> }>()
  for (const schema of schemas) byType.set(schema.properties.type.const as string, { schema, check: TypeCompiler.Compile(schema) })
  return { name, byType }
}

export const SupervisorMessages: Codec<SupervisorMessage> = codec('supervisor', [HelloSchema, SupervisorHeartbeatSchema, RelayFailedSchema])
export const GatewayMessages: Codec<GatewayMessage> = codec('gateway', [AcceptedSchema, RelaySchema, GatewayHeartbeatSchema, SupersededSchema, RejectedSchema, MoveSchema])

// Why a line was refused: a fixed phrase and, at most, a field path taken from our own schema,
// never from the peer's bytes.
export type Decoded<M> = { ok: true, msg: M } | { ok: false, why: string }

const utf8 = new TextDecoder('utf-8', { fatal: true })

// The one decoder of wire lines, both directions: bytes of one complete line (no newline) →
// a message that matches its schema, with unknown fields removed. Never throws.
export function decode<M> (c: Codec<M>, line: Uint8Array): Decoded<M> {
  let text: string
  try { text = utf8.decode(line) } catch { return { ok: false, why: 'not UTF-8' } }
  let raw: unknown
  try { raw = JSON.parse(text) } catch { return { ok: false, why: 'not JSON' } }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) return { ok: false, why: 'not a JSON object' }
  const type = (raw as { type?: unknown }).type
  if (typeof type !== 'string') return { ok: false, why: 'no string "type"' }
  // A Map: a "type" of "constructor" or "__proto__" finds nothing.
  const entry = c.byType.get(type)
  if (entry === undefined) return { ok: false, why: 'unknown message type' }
  if (!entry.check.Check(raw)) {
    const first = entry.check.Errors(raw).First()
    return { ok: false, why: `invalid ${type}${first === undefined ? '' : ` at ${first.path.slice(0, 64) || '/'}`}` }
  }
  return { ok: true, msg: Value.Clean(entry.schema, raw) as M }
}

export function encode (msg: SupervisorMessage | GatewayMessage): string {
  return JSON.stringify(msg) + '\n'
}

// Splits a byte stream into lines without decoding anything: chunks are kept as they came
// (never re-copied into one growing buffer) and only a complete line is joined, once. An
// unfinished line, or a finished one, longer than maxBytes is reported and nothing more is
// read: a peer that never ends a line holds at most maxBytes (plus the chunk in hand).
export type LineVerdict = 'go on' | 'stop'

export class LineSplitter {
  readonly #maxBytes: number
  #parts: Buffer[] = []
  #size = 0
  #over = false

  constructor (maxBytes: number) {
    this.#maxBytes = maxBytes
  }

  // Bytes of the unfinished line held now.
  get pendingBytes (): number { return this.#size }

  // onLine gets each complete line (without "\n"); returning 'stop' ends the push there.
  // Returns false once a line was too long (then and on every later push).
  push (chunk: Buffer, onLine: (line: Buffer) => LineVerdict, onTooLong: (bytes: number) => void): boolean {
    if (this.#over) return false
    let start = 0
    for (;;) {
      const nl = chunk.indexOf(10, start)
      if (nl === -1) break
      const size = this.#size + nl - start
      if (size > this.#maxBytes) return this.#tooLong(size, onTooLong)
      let line = chunk.subarray(start, nl)
      if (this.#parts.length > 0) {
        this.#parts.push(line)
        line = Buffer.concat(this.#parts, size)
        this.#parts = []
        this.#size = 0
      }
      start = nl + 1
      if (onLine(line) === 'stop') return true
      if (this.#over) return false
    }
    if (start < chunk.length) {
      const rest = chunk.length - start
      if (this.#size + rest > this.#maxBytes) return this.#tooLong(this.#size + rest, onTooLong)
      // A short tail of a large chunk is copied, so a held line never pins much more than itself.
      this.#parts.push(rest * 2 < chunk.length ? Buffer.from(chunk.subarray(start)) : chunk.subarray(start))
      this.#size += rest
    }
    return true
  }

  #tooLong (bytes: number, onTooLong: (bytes: number) => void): false {
    this.#over = true
    this.#parts = []
    this.#size = 0
    onTooLong(bytes)
    return false
  }
}
