import { randomBytes } from 'node:crypto'
import { connect, type Socket } from 'node:net'
import { describe, expect, it } from 'vitest'
import { WS_CLOSE_HANDSHAKE_MS } from '../../src/lifecycle/bounds.js'
import { execStart } from '../helpers/api.js'
import { startGateway } from '../helpers/gateway.js'
import { waitFor } from '../helpers/wait.js'

// The public listener's WebSockets at shutdown: told 1001, given a bounded close handshake, then
// cut. A client that never answers the close frame must not hold close() for ws's own 30 s.

const GRACE = 300

interface RawClient { socket: Socket, closeCodes: number[], ended: Promise<void>, upgraded: () => boolean }

// A WebSocket client by hand, so that it can read frames and never answer a close.
function rawWebSocket (publicUrl: string, path: string): RawClient {
  const url = new URL(publicUrl)
  const socket = connect(Number(url.port), url.hostname)
  const closeCodes: number[] = []
  let buf = Buffer.alloc(0)
  let upgraded = false
  socket.on('error', () => {})
  socket.on('connect', () => {
    socket.write(`GET ${path} HTTP/1.1\r\nHost: ${url.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
      `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\n\r\n`)
  })
  socket.on('data', (chunk: Buffer) => {
    buf = Buffer.concat([buf, chunk])
    if (!upgraded) {
      const end = buf.indexOf('\r\n\r\n')
      if (end < 0) return
      expect(buf.subarray(0, 12).toString()).toBe('HTTP/1.1 101')
      upgraded = true
      buf = buf.subarray(end + 4)
    }
    // Unmasked server frames under 64 KiB (all this test's are).
    for (;;) {
      if (buf.length < 2) return
      const short = buf[1]! & 0x7f
      const head = short === 126 ? 4 : 2
      if (buf.length < head) return
      const len = short === 126 ? buf.readUInt16BE(2) : short
      if (buf.length < head + len) return
      if ((buf[0]! & 0x0f) === 0x8 && len >= 2) closeCodes.push(buf.readUInt16BE(head))
      buf = buf.subarray(head + len)
    }
  })
  const ended = new Promise<void>((resolve) => socket.once('close', () => resolve()))
  return { socket, closeCodes, ended, upgraded: () => upgraded }
}

describe('shutdown closes WebSockets within a bound', () => {
  it('sends 1001, and cuts a client that never answers the close frame within the handshake bound', async () => {
    const g = await startGateway({ localSandbox: true, shutdownGraceMs: GRACE })
    let closed = false
    try {
      const id = await execStart(g.publicUrl, 'local', { command: ['sleep', '20'] })
      const client = rawWebSocket(g.publicUrl, `/v1/execs/${id}/stream`)
      await waitFor(() => client.upgraded(), { timeoutMs: 5000, intervalMs: 10, description: 'the WebSocket upgrade' })
      const started = performance.now()
      await g.close()
      closed = true
      const ms = performance.now() - started
      await client.ended
      expect(client.closeCodes).toEqual([1001])
      // The grace, the handshake bound, and the rest of the sequence (a few hundred ms).
      expect(ms).toBeLessThan(GRACE + WS_CLOSE_HANDSHAKE_MS + 1500)
    } finally {
      if (!closed) await g.close()
    }
  })
})
