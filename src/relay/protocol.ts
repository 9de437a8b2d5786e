// The supervisor wire protocol's constants, shared by the gateway and the supervisor. Internal:
// the contract leaves it to us. One long-lived HTTP/2 stream per supervisor carries NDJSON
// control messages both ways (their schemas and decoder: src/supervisor-plane/messages.ts);
// every relay is its own HTTP/2 stream of raw SSH bytes.

export const SESSION_PATH = '/v1/supervisor/session'
export const RELAY_PATH_PREFIX = '/v1/supervisor/relays/'

// HTTP/2 windows sized for bulk output: Node's 64 KiB default caps a relay at one window per RTT.
export const H2_STREAM_WINDOW = 4 * 1024 * 1024
export const H2_CONNECTION_WINDOW = 32 * 1024 * 1024
