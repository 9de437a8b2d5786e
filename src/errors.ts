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
  relay_open_timeout: { status: 504, title: 'Relay open timed out' },
} as const satisfies Record<string, { status: number, title: string }>

export type ErrorCode = keyof typeof errorTable

export interface Problem {
  type: string
  title: string
  status: number
  detail: string
  code: ErrorCode
}

const kGatewayError = Symbol.for('exec-gateway.error')

export class GatewayError extends Error {
  readonly code: ErrorCode
  readonly status: number
  readonly detail: string

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

export function problem (code: ErrorCode, detail: string): Problem {
  const { status, title } = errorTable[code]
  return { type: `https://exec-gateway.dev/problems/${code.replaceAll('_', '-')}`, title, status, detail, code }
}

export function isErrorCode (value: unknown): value is ErrorCode {
  return typeof value === 'string' && Object.hasOwn(errorTable, value)
}
