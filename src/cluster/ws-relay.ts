import { WebSocket, type RawData } from 'ws'

// The frame relay of a WebSocket bridge: every message from one side is sent to the other as
// the same kind (text stays text, binary stays binary) with the same bytes, and a side whose
// peer does not read is itself not read, so the sender's own flow control holds the producer
// (the owner's exec, or the client's stdin) instead of this replica's memory.

export interface RelayOptions {
  // Above this many bytes handed to a side's ws and not yet written to its socket, the other
  // side is paused; below lowWaterBytes it is resumed.
  highWaterBytes?: number
  lowWaterBytes?: number
}

const DEFAULT_HIGH_WATER = 1024 * 1024
const DEFAULT_LOW_WATER = 256 * 1024

// The close codes ws may send (its isValidStatusCode). 1005 (no code) is sent as a close frame
// without a code, which the peer reads as 1005 again; 1006 (no close frame: the connection
// dropped) and anything else that cannot go on the wire (1015, 1004) become a plain
// termination, which the peer reads as 1006. The far peer thus sees what this one saw.
function sendableCode (code: number): boolean {
  return (code >= 1000 && code <= 1014 && code !== 1004 && code !== 1005 && code !== 1006) || (code >= 3000 && code <= 4999)
}

export function closeLike (ws: WebSocket, code: number, reason: Buffer | string): void {
  if (ws.readyState === WebSocket.CLOSED) return
  if (ws.readyState === WebSocket.CONNECTING) { ws.terminate(); return }
  // A paused socket would not read the peer's closing frame and ws would hold it for its
  // close timeout.
  ws.resume()
  if (code === 1005) ws.close()
  else if (sendableCode(code)) ws.close(code, reason)
  else ws.terminate()
}

function byteLength (data: RawData): number {
  if (Array.isArray(data)) return data.reduce((n, b) => n + b.length, 0)
  return data instanceof ArrayBuffer ? data.byteLength : data.length
}

// Relays from → to until either closes; returns how many bytes are queued towards `to`.
function relayOneWay (from: WebSocket, to: WebSocket, high: number, low: number): () => number {
  let unsent = 0
  let paused = false
  from.on('message', (data: RawData, isBinary: boolean) => {
    if (to.readyState !== WebSocket.OPEN) return
    const size = byteLength(data)
    unsent += size
    to.send(data, { binary: isBinary, compress: false }, () => {
      unsent -= size
      if (paused && unsent <= low) {
        paused = false
        if (from.readyState === WebSocket.OPEN) from.resume()
      }
    })
    if (!paused && unsent > high) {
      paused = true
      from.pause()
    }
  })
  return () => unsent
}

export interface Relay {
  // Bytes handed to each side's ws and not yet written to its socket.
  queuedToClient: () => number
  queuedToUpstream: () => number
  // Resolves once both sides are closed.
  closed: Promise<void>
}

// Both sockets must be OPEN, their 'error' listeners attached by the caller.
export function relayFrames (client: WebSocket, upstream: WebSocket, opts: RelayOptions = {}): Relay {
  const high = opts.highWaterBytes ?? DEFAULT_HIGH_WATER
  const low = opts.lowWaterBytes ?? DEFAULT_LOW_WATER
  const queuedToClient = relayOneWay(upstream, client, high, low)
  const queuedToUpstream = relayOneWay(client, upstream, high, low)
  const closedOne = (ws: WebSocket): Promise<void> => ws.readyState === WebSocket.CLOSED ? Promise.resolve() : new Promise((resolve) => ws.once('close', () => resolve()))
  upstream.on('close', (code: number, reason: Buffer) => closeLike(client, code, reason))
  client.on('close', (code: number, reason: Buffer) => closeLike(upstream, code, reason))
  return { queuedToClient, queuedToUpstream, closed: Promise.all([closedOne(client), closedOne(upstream)]).then(() => {}) }
}
