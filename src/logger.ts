import pino, { type DestinationStream, type Logger } from 'pino'

// The one place log redaction is decided, for the gateway and the supervisor alike: whatever a
// log call is handed, bearer headers, tokens, secrets and private keys leave as "[redacted]".
const REDACTED_PATHS = [
  'req.headers.authorization', 'headers.authorization', '*.authorization',
  'req.headers["sec-websocket-protocol"]', 'headers["sec-websocket-protocol"]',
  'token', '*.token', 'apiToken', 'privateKey', '*.privateKey', 'tokenSecret', 'tokenSecrets'
]

export function createLogger (level: string, destination?: DestinationStream): Logger {
  const options = { level, redact: { paths: REDACTED_PATHS, censor: '[redacted]' } }
  return destination === undefined ? pino(options) : pino(options, destination)
}
