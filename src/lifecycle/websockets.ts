import type { WebSocketServer } from 'ws'
import { CLOSE_GOING_AWAY } from '../schemas/websocket.js'
import { closeWithin } from './close-within.js'
import { WS_CLOSE_HANDSHAKE_MS } from './bounds.js'

// The public listener's WebSockets at shutdown, as @fastify/websocket's preClose: every open
// one is told 1001, they get WS_CLOSE_HANDSHAKE_MS for the close handshake, and the rest are
// terminated. ws tracks the clients itself, so nobody keeps a set of them by hand.
export async function closeWebSockets (wss: WebSocketServer): Promise<void> {
  for (const ws of wss.clients) {
    if (ws.readyState !== ws.OPEN) continue
    try { ws.close(CLOSE_GOING_AWAY, 'gateway shutting down') } catch { /* already closing */ }
  }
  // In noServer mode ws reports closed once its last client has.
  const allClosed = new Promise<void>((resolve) => { wss.close(() => resolve()) })
  await closeWithin(WS_CLOSE_HANDSHAKE_MS, () => allClosed, () => { for (const ws of wss.clients) ws.terminate() })
}
