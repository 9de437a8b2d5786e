import type { ProblemBody } from './schemas/problem.js'

// Every error the gateway can report, in one table. The `code` is the contract; titles and
// details are for people. Relay and exec code throw GatewayError and never pick HTTP statuses
// themselves: the status comes from this table.

export const errorTable = {
  invalid_argument: { status: 400, title: 'Invalid argument' },
  unauthenticated: { status: 401, title: 'Unauthenticated' },
  permission_denied: { status: 403, title: 'Permission denied' },
  not_found: { status: 404, title: 'Not found' },
  sandbox_not_found: { status: 404, title: 'Sandbox not found' },
  exec_not_found: { status: 404, title: 'Exec not found' },
  method_not_allowed: { status: 405, title: 'Method not allowed' },
  exec_finished: { status: 409, title: 'Exec already finished' },
  payload_too_large: { status: 413, title: 'Payload too large' },
  unsupported_media_type: { status: 415, title: 'Unsupported media type' },
  too_many_requests: { status: 429, title: 'Too many requests' },
  internal: { status: 500, title: 'Internal error' },
  ssh_failed: { status: 502, title: 'SSH connection to the sandbox failed' },
  sandbox_unavailable: { status: 503, title: 'Sandbox unavailable' },
  relay_unavailable: { status: 503, title: 'Relay unavailable' },
  shutting_down: { status: 503, title: 'Shutting down' },
  // Cluster mode: the replica that owns the sandbox or exec cannot be reached, or the shared
  // directory (Redis) does not answer for what only it knows.
  replica_unavailable: { status: 503, title: 'Replica unavailable' },
  directory_unavailable: { status: 503, title: 'Cluster directory unavailable' },
  relay_open_timeout: { status: 504, title: 'Relay open timed out' }
} as const satisfies Record<string, { status: number, title: string }>

export type ErrorCode = keyof typeof errorTable

export const errorCodes = Object.keys(errorTable) as ErrorCode[]

// Statuses HTTP itself decides, reported under the code of their kind of mistake: clients
// branch on the code, which stays one of the table's; the status is what the protocol requires.
const protocolStatusTable = {
  417: { code: 'invalid_argument', title: 'Expectation failed' },
  431: { code: 'invalid_argument', title: 'Request header fields too large' }
} as const satisfies Record<number, { code: ErrorCode, title: string }>

// The problem+json body (RFC 9457); its one wire definition is ProblemSchema.
export type Problem = ProblemBody

const kGatewayError = Symbol.for('exec-gateway.error')

export class GatewayError extends Error {
  readonly code: ErrorCode
  readonly status: number
  // What happened, for people; the same text as `message`. It is the problem's and the exec
  // record's `detail`, and the `message` of a final `error` event (docs/api.md §3, §4).
  readonly detail: string

  // `cause` is the underlying error, kept for logs and debuggers; it never reaches the wire.
  constructor (code: ErrorCode, detail: string, options?: { cause?: unknown }) {
    super(detail, options)
    this.name = 'GatewayError'
    this.code = code
    this.status = errorTable[code].status
    this.detail = detail
    Object.defineProperty(this, kGatewayError, { value: true })
  }

  // Branded so that two copies of this module (vitest + dist) still recognise each other.
  static is (err: unknown): err is GatewayError {
    return typeof err === 'object' && err !== null && (err as Record<symbol, unknown>)[kGatewayError] === true
  }

  toProblem (): Problem {
    return problem(this.code, this.detail)
  }
}

// The one builder of problem bodies, on every listener: type, title and status come from the
// table, so a code always arrives with the same status and title.
export function problem (code: ErrorCode, detail: string): Problem {
  const { status, title } = errorTable[code]
  return { type: problemType(code), title, status, detail, code }
}

// The same for a status of HTTP's own (417, 431), with its table's code and title.
export function protocolProblem (status: keyof typeof protocolStatusTable, detail: string): Problem {
  const { code, title } = protocolStatusTable[status]
  return { type: problemType(code), title, status, detail, code }
}

function problemType (code: ErrorCode): string {
  return `https://exec-gateway.dev/problems/${code.replaceAll('_', '-')}`
}

export function isErrorCode (value: unknown): value is ErrorCode {
  return typeof value === 'string' && Object.hasOwn(errorTable, value)
}

// ssh2's client classifies the errors it emits by `level` (lib/client.js; lib/protocol/utils.js
// makeError defaults to 'protocol'). What each means for an exec is decided here, beside the
// table, as fastify's lib/errors.js keeps its maps of its dependencies' codes. Before the
// handshake ends nothing has run and the daemon is at fault (ssh_failed); after it, a channel may
// be running and what failed is the relay under it (relay_unavailable).

// The levels ssh2's client emits; any other (or none) finds no rule of its own.
type SshErrorLevel = 'client-authentication' | 'client-timeout' | 'client-socket' | 'client-dns' | 'handshake' | 'protocol' | 'agent'

export interface SshClientError extends Error { level?: string }

export interface SshFailureContext {
  // The handshake finished ('ready'): a command may be running.
  ready: boolean
  readyTimeoutMs: number
  keepaliveIntervalMs: number
  keepaliveCountMax: number
}

// `said` is ssh2's message already bounded (it may carry the daemon's own strings).
interface SshLevelRule { code: ErrorCode, detail: (said: string, err: SshClientError, ctx: SshFailureContext) => string }
type SshLevelTable = Partial<Record<SshErrorLevel, SshLevelRule>>

function ruleFor (table: SshLevelTable, level: string | undefined): SshLevelRule | undefined {
  return level !== undefined && Object.hasOwn(table, level) ? table[level as SshErrorLevel] : undefined
}

const HOST_KEY_REFUSED = "the sandbox SSH daemon's host key is not the one its supervisor reported (supervisor --ssh-host-key, or the embedded daemon's own key)"

// ssh2 reports a host key that our hostVerifier refused as a 'handshake' error like any failed
// key exchange (kex.js, same level and the same disconnect reason); its message is the only
// thing telling them apart. The message is ssh2's own, never the daemon's.
function isHostKeyRefusal (err: SshClientError): boolean {
  return err.message.startsWith('Host denied')
}

const sshHandshakeLevels: SshLevelTable = {
  'client-authentication': { code: 'ssh_failed', detail: () => 'the sandbox SSH daemon rejected the gateway key' },
  'client-timeout': { code: 'ssh_failed', detail: (_said, _err, ctx) => `SSH handshake not finished within ${ctx.readyTimeoutMs} ms` },
  // ssh2's verdict on what the daemon offered (no common key exchange, a host key refused):
  // the daemon's close that follows must not turn it into a relay failure. Someone else
  // answering on the supervisor's SSH target is never sent a command.
  handshake: { code: 'ssh_failed', detail: (said, err) => isHostKeyRefusal(err) ? HOST_KEY_REFUSED : `SSH handshake failed: ${said}` }
}

const sshReadyLevels: SshLevelTable = {
  // After the handshake a client-timeout can only be the keepalive giving up.
  'client-timeout': {
    code: 'relay_unavailable',
    detail: (_said, _err, { keepaliveIntervalMs: i, keepaliveCountMax: n }) => `no answer to ${n} SSH keepalives over ${i * (n + 1)} ms: the relay is wedged`
  }
}

const sshReadyOtherwise: SshLevelRule = { code: 'relay_unavailable', detail: (said) => `the relay failed before the command reported an exit status: ${said}` }

// What an ssh2 client error means for the exec, or undefined for an error during the handshake
// that its level does not settle (a socket or protocol error): that one is the relay's doing
// when the relay closed with it, so sshHandshakeBreak decides once that close could arrive.
export function sshClientFailure (err: SshClientError, said: string, ctx: SshFailureContext): GatewayError | undefined {
  const rule = ctx.ready ? (ruleFor(sshReadyLevels, err.level) ?? sshReadyOtherwise) : ruleFor(sshHandshakeLevels, err.level)
  return rule === undefined ? undefined : new GatewayError(rule.code, rule.detail(said, err, ctx), { cause: err })
}

export function sshHandshakeBreak (err: SshClientError, said: string, relayClosed: boolean): GatewayError {
  return relayClosed
    ? new GatewayError('relay_unavailable', `the relay closed during the SSH handshake: ${said}`, { cause: err })
    : new GatewayError('ssh_failed', `SSH handshake failed: ${said}`, { cause: err })
}
