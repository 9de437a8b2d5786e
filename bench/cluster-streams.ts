// The readers of the cluster phase: an exec's stdout of zeros read from offset 0 over GET /events
// (NDJSON, base64 data) or over the WebSocket (binary subprotocol), every offset checked and
// every byte checked to be zero; and the time to the first byte of an SSE stream. They take a
// base URL and know nothing of which replica holds the exec: the phase points them at r0 or r1.
import http from 'node:http'
import WebSocket from 'ws'
import { BINARY_SUBPROTOCOL } from '../src/schemas/websocket.js'

// firstByteMs → endMs is the streaming time; bytes are the stdout bytes received.
export interface Transfer { bytes: number, streamMs: number, frames: number }

export type TransferMode = 'ndjson' | 'binary'

interface StreamEvent { type: string, offset?: number, data?: string, exitCode?: number | null }

// What any reader must not see on an exec that prints zeros and exits 0.
const ZERO = Buffer.alloc(1024 * 1024)
function zeros (b: Buffer): boolean {
  for (let off = 0; off < b.length; off += ZERO.length) {
    const part = b.subarray(off, off + ZERO.length)
    if (!part.equals(ZERO.subarray(0, part.length))) return false
  }
  return true
}

// Checks one stdout chunk against the offset expected; returns the new offset.
function take (problems: string[], at: number, offset: number | undefined, b: Buffer): number {
  if (offset !== undefined && offset !== at) problems.push(`stdout offset ${offset}, expected ${at}`)
  if (!zeros(b)) problems.push(`non-zero stdout byte near offset ${at}`)
  return at + b.length
}

function other (problems: string[], ev: StreamEvent, onExit: (ev: StreamEvent) => void): void {
  if (ev.type === 'exit') onExit(ev)
  else if (ev.type !== 'heartbeat') problems.push(JSON.stringify(ev).slice(0, 300))
}

const TRANSFER_BOUND_MS = 300_000

// GET /v1/execs/{id}/events from 0 as NDJSON with base64 data, to the exit event and the end.
function readNdjson (base: string, execId: string): Promise<Transfer> {
  return new Promise((resolve, reject) => {
    const problems: string[] = []
    let at = 0
    let frames = 0
    let first: number | undefined
    let exit: StreamEvent | undefined
    let rest = ''
    const req = http.get(`${base}/v1/execs/${execId}/events?encoding=base64`, { agent: false, headers: { accept: 'application/x-ndjson' } }, (res) => {
      if (res.statusCode !== 200) { res.resume(); finish(new Error(`/events of ${execId}: HTTP ${res.statusCode}`)); return }
      // JSON and base64 are ASCII: latin1 decodes them without a UTF-8 pass.
      res.setEncoding('latin1')
      res.on('data', (chunk: string) => {
        first ??= performance.now()
        rest += chunk
        let nl: number
        while ((nl = rest.indexOf('\n')) !== -1) {
          const line = rest.slice(0, nl)
          rest = rest.slice(nl + 1)
          if (line === '') continue
          frames++
          const ev = JSON.parse(line) as StreamEvent
          if (ev.type === 'stdout') at = take(problems, at, ev.offset, Buffer.from(ev.data ?? '', 'base64'))
          else other(problems, ev, (e) => { exit = e })
        }
      })
      res.on('end', () => {
        const end = performance.now()
        if (rest.trim() !== '') problems.push(`unterminated line at the end: ${rest.slice(0, 100)}`)
        if (exit?.exitCode !== 0) problems.push(`exit ${JSON.stringify(exit)}`)
        finish(problems.length > 0 ? new Error(`ndjson stream of ${execId}: ${problems.slice(0, 5).join('; ')}`) : undefined, { bytes: at, streamMs: end - (first ?? end), frames })
      })
      res.on('error', (err) => finish(err))
    })
    const timer = setTimeout(() => { req.destroy(); finish(new Error(`ndjson stream of ${execId} did not end within ${TRANSFER_BOUND_MS} ms`)) }, TRANSFER_BOUND_MS)
    req.on('error', (err) => finish(err))
    let done = false
    function finish (err: Error | undefined, t?: Transfer): void {
      if (done) return
      done = true
      clearTimeout(timer)
      if (err !== undefined) reject(err)
      else resolve(t!)
    }
  })
}

// The WebSocket with the binary subprotocol from 0, to the close (1000 after the exit event).
function readBinary (base: string, execId: string): Promise<Transfer> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${base.replace(/^http/, 'ws')}/v1/execs/${execId}/stream`, [BINARY_SUBPROTOCOL])
    const problems: string[] = []
    let at = 0
    let frames = 0
    let first: number | undefined
    let exit: StreamEvent | undefined
    const timer = setTimeout(() => { ws.terminate(); reject(new Error(`binary stream of ${execId} did not end within ${TRANSFER_BOUND_MS} ms`)) }, TRANSFER_BOUND_MS)
    ws.on('open', () => { if (ws.protocol !== BINARY_SUBPROTOCOL) problems.push(`subprotocol ${JSON.stringify(ws.protocol)}`) })
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      frames++
      first ??= performance.now()
      if (!isBinary) { other(problems, JSON.parse(data.toString('utf8')) as StreamEvent, (e) => { exit = e }); return }
      if (data[0] === 1) at = take(problems, at, undefined, data.subarray(1))
      else problems.push(`binary frame on channel ${data[0]}`)
    })
    ws.on('unexpected-response', (_req, res) => { clearTimeout(timer); reject(new Error(`websocket of ${execId} refused: HTTP ${res.statusCode}`)) })
    ws.on('error', (err) => { clearTimeout(timer); reject(err) })
    ws.on('close', (code) => {
      clearTimeout(timer)
      const end = performance.now()
      if (code !== 1000) problems.push(`close code ${code}`)
      if (exit?.exitCode !== 0) problems.push(`exit ${JSON.stringify(exit)}`)
      if (problems.length > 0) reject(new Error(`binary stream of ${execId}: ${problems.slice(0, 5).join('; ')}`))
      else resolve({ bytes: at, streamMs: end - (first ?? end), frames })
    })
  })
}

export async function readZeros (base: string, execId: string, mode: TransferMode): Promise<Transfer> {
  return mode === 'ndjson' ? await readNdjson(base, execId) : await readBinary(base, execId)
}

// GET /events as SSE on a kept-alive connection: ms from the request to the first body byte; the
// rest of the stream (a finished exec's replay and its end) is read so the socket is reused.
export function sseFirstByte (agent: http.Agent, base: string, execId: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now()
    let ttfb: number | undefined
    const req = http.get(`${base}/v1/execs/${execId}/events`, { agent, headers: { accept: 'text/event-stream' } }, (res) => {
      if (res.statusCode !== 200) { res.resume(); reject(new Error(`SSE of ${execId}: HTTP ${res.statusCode}`)); return }
      res.on('data', () => { ttfb ??= performance.now() - t0 })
      res.on('end', () => { clearTimeout(timer); if (ttfb === undefined) reject(new Error(`SSE of ${execId}: no byte`)); else resolve(ttfb) })
      res.on('error', (err) => { clearTimeout(timer); reject(err) })
    })
    const timer = setTimeout(() => { req.destroy(new Error(`SSE of ${execId} did not end within 10 s`)) }, 10_000)
    req.on('error', (err) => { clearTimeout(timer); reject(err) })
  })
}
