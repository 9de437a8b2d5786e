import pino, { type DestinationStream, type Logger } from 'pino'
import { redactAccessTokens } from './http/read-token.js'

// The one place log redaction is decided, for the gateway and the supervisor alike: whatever a
// log call is handed, bearer headers, tokens, secrets and private keys leave as "[redacted]".
const REDACTED_PATHS = [
  'req.headers.authorization', 'headers.authorization', '*.authorization',
  'req.headers["sec-websocket-protocol"]', 'headers["sec-websocket-protocol"]',
  'token', '*.token', 'apiToken', 'privateKey', '*.privateKey', 'tokenSecret', 'tokenSecrets'
]

interface LoggedRequest {
  method?: string
  url?: string
  host?: string
  ip?: string
  headers?: Record<string, unknown>
  socket?: { remotePort?: number }
  raw?: unknown
}

// Fastify logs each request's URL, and a read token travels in the query (?access_token=): the
// value is replaced, in Fastify's own request shape (this serializer stands in for its), on
// every listener, the internal one's forwarded URLs too. Anything else logged as `req` passes.
function req (value: unknown): unknown {
  if (typeof value !== 'object' || value === null) return value
  const r = value as LoggedRequest
  if (r.raw !== undefined && typeof r.method === 'string') {
    return {
      method: r.method,
      url: redactAccessTokens(String(r.url ?? '')),
      version: r.headers?.['accept-version'],
      host: r.host,
      remoteAddress: r.ip,
      remotePort: r.socket?.remotePort
    }
  }
  return typeof r.url === 'string' ? { ...r, url: redactAccessTokens(r.url) } : value
}

export function createLogger (level: string, destination?: DestinationStream): Logger {
  const options = { level, redact: { paths: REDACTED_PATHS, censor: '[redacted]' }, serializers: { req, url: (u: unknown) => typeof u === 'string' ? redactAccessTokens(u) : u } }
  return destination === undefined ? pino(options) : pino(options, destination)
}
