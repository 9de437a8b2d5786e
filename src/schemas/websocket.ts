// The WebSocket attach's wire constants (docs/api.md §4): the data subprotocols a client may offer,
// the channel bytes of binary frames and the close codes the server ends with. The route, the
// listener's subprotocol selection, shutdown and the OpenAPI document all read them here.

export const BINARY_SUBPROTOCOL = 'exec-gateway.v1.binary'
// JSON frames (the default) by name: browsers that offer a bearer subprotocol fail the
// handshake unless the server selects one of the offered protocols, so they offer this too.
export const JSON_SUBPROTOCOL = 'exec-gateway.v1.json'

// The first byte of a binary frame.
export const STDIN_CHANNEL = 0
export const STDOUT_CHANNEL = 1
export const STDERR_CHANNEL = 2

// After the exit event.
export const CLOSE_NORMAL = 1000
// The gateway shuts down.
export const CLOSE_GOING_AWAY = 1001
// A client frame broke a rule (the reason says which).
export const CLOSE_POLICY = 1008
// After an error event.
export const CLOSE_ERROR = 1011
// Cluster mode: the exec now runs on another replica (its sandbox moved there); the exec goes on,
// and a client reconnects with its offsets, through any replica.
export const CLOSE_RECONNECT = 1012
