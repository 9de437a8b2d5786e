// The supervisor wire protocol, shared by the gateway and the supervisor. Internal: the
// contract leaves it to us. One long-lived HTTP/2 stream per supervisor carries NDJSON control
// messages both ways; every relay is its own HTTP/2 stream of raw SSH bytes.

export const SESSION_PATH = '/v1/supervisor/session'
export const RELAY_PATH_PREFIX = '/v1/supervisor/relays/'
export const SANDBOX_HEADER = 'x-exec-gateway-sandbox'

export type GatewayMessage =
  | { type: 'accepted', sessionId: string, heartbeatIntervalMs: number, pingIntervalMs: number, pingTimeoutMs: number, gatewayPublicKey: string }
  | { type: 'relay', relayId: string }
  | { type: 'heartbeat' }
  | { type: 'superseded' }
  | { type: 'rejected', reason: string }

export type SupervisorMessage =
  | { type: 'hello', instanceId?: string | undefined, sshHostKey?: string | undefined, sshUser?: string | undefined }
  | { type: 'heartbeat' }
  | { type: 'relay_failed', relayId: string, reason: string }

// HTTP/2 windows sized for bulk output: Node's 64 KiB default caps a relay at one window per RTT.
export const H2_STREAM_WINDOW = 4 * 1024 * 1024
export const H2_CONNECTION_WINDOW = 32 * 1024 * 1024

export const SANDBOX_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/

// Splits an NDJSON byte stream into parsed messages; a line that is not JSON is reported, not thrown.
export class NdjsonDecoder {
  #buf = ''
  push (chunk: Buffer | string, onMessage: (msg: unknown) => void, onBad: (line: string) => void): void {
    this.#buf += chunk.toString()
    if (this.#buf.length > 1024 * 1024) { onBad(this.#buf.slice(0, 100)); this.#buf = ''; return }
    let nl: number
    while ((nl = this.#buf.indexOf('\n')) !== -1) {
      const line = this.#buf.slice(0, nl).trim()
      this.#buf = this.#buf.slice(nl + 1)
      if (line === '') continue
      let msg: unknown
      try { msg = JSON.parse(line) } catch { onBad(line); continue }
      onMessage(msg)
    }
  }
}
