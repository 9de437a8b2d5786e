// The soak's HTTP and WebSocket clients: one connection per request, every call bounded, events
// handed over as they arrive (megabytes are checked on the way, never held).
import http from 'node:http'
import { StringDecoder } from 'node:string_decoder'
import WebSocket from 'ws'
import type { Expected } from './expected.js'

let baseUrl = ''
export function setBaseUrl (url: string): void { baseUrl = url }

export type HttpOutcome =
  | { ok: true, status: number, text: string, json: any }
  // refused: the connection was refused, so the request never reached a gateway (it is down).
  | { ok: false, timedOut: boolean, error: string, partial: string, refused?: boolean }

// One request on its own connection (no keep-alive pool to race with), bounded by timeoutMs.
export function httpCall (method: string, path: string, body: unknown, timeoutMs: number, headers: Record<string, string> = {}): Promise<HttpOutcome> {
  return new Promise((resolve) => {
    const url = new URL(path, baseUrl)
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body))
    const chunks: Buffer[] = []
    let settled = false
    const partial = (): string => Buffer.concat(chunks).toString('utf8')
    const finish = (o: HttpOutcome): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      resolve(o)
    }
    const req = http.request({
      host: url.hostname,
      port: Number(url.port),
      path: url.pathname + url.search,
      method,
      agent: false,
      headers: payload === undefined ? headers : { ...headers, 'content-type': 'application/json', 'content-length': String(payload.length) }
    }, (res) => {
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        const text = partial()
        let json: any
        try { json = JSON.parse(text) } catch { json = undefined }
        finish({ ok: true, status: res.statusCode ?? 0, text, json })
      })
      res.on('error', (err) => finish({ ok: false, timedOut: false, error: `response error: ${err.message}`, partial: partial() }))
      res.on('close', () => finish({ ok: false, timedOut: false, error: 'response closed before its end', partial: partial() }))
    })
    req.on('error', (err: NodeJS.ErrnoException) => finish({ ok: false, timedOut: false, error: `request error: ${err.message}`, partial: partial(), ...(err.code === 'ECONNREFUSED' ? { refused: true } : {}) }))
    const timer = setTimeout(() => {
      finish({ ok: false, timedOut: true, error: `no complete answer within ${timeoutMs} ms`, partial: partial() })
      req.destroy()
    }, Math.max(1, timeoutMs))
    req.end(payload)
  })
}

export interface ReadOptions {
  offsets?: { stdout: number, stderr: number }
  // Stop reading after this many bytes of the stream have arrived, for ms.
  pause?: { afterBytes: number, ms: number }
  // WebSocket only: sent as stdin frames once open, from offset `from` (default 0), then eof.
  stdin?: { data: Expected, frames: 'binary' | 'text', minChunk: number, maxChunk: number, rand: () => number, from?: number }
}
// status: the HTTP status when the gateway refused the attach (404 for an exec it does not know).
export interface StreamRead { timedOut: boolean, error?: string, status?: number, closeCode?: number, paused?: boolean, stdinSent?: number }

const query = (o: ReadOptions): string => o.offsets === undefined || (o.offsets.stdout === 0 && o.offsets.stderr === 0) ? '' : `?stdoutOffset=${o.offsets.stdout}&stderrOffset=${o.offsets.stderr}`

// GET /events as NDJSON, each complete line handed to onEvent; a line cut off is not an event.
export function streamNdjson (execId: string, timeoutMs: number, onEvent: (ev: any) => void, o: ReadOptions = {}): Promise<StreamRead> {
  return streamEvents('ndjson', execId, timeoutMs, onEvent, o)
}

// GET /events as SSE: each complete event's data handed to onEvent; the offsets to resume from
// go in Last-Event-ID, as a reconnecting EventSource sends them (the id of the last event seen).
export function streamSse (execId: string, timeoutMs: number, onEvent: (ev: any) => void, o: ReadOptions = {}): Promise<StreamRead> {
  return streamEvents('sse', execId, timeoutMs, onEvent, o)
}

function streamEvents (format: 'ndjson' | 'sse', execId: string, timeoutMs: number, onEvent: (ev: any) => void, o: ReadOptions): Promise<StreamRead> {
  return new Promise((resolve) => {
    const resume = o.offsets === undefined || (o.offsets.stdout === 0 && o.offsets.stderr === 0) ? undefined : `${o.offsets.stdout}-${o.offsets.stderr}`
    const url = new URL(`/v1/execs/${execId}/events${format === 'sse' ? '' : query(o)}`, baseUrl)
    const headers: Record<string, string> = format === 'sse' ? { accept: 'text/event-stream', ...(resume === undefined ? {} : { 'last-event-id': resume }) } : { accept: 'application/x-ndjson' }
    let settled = false
    let paused = false
    let pauseTimer: NodeJS.Timeout | undefined
    const finish = (r: StreamRead): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      clearTimeout(pauseTimer)
      resolve(paused ? { ...r, paused } : r)
    }
    const req = http.get({ host: url.hostname, port: Number(url.port), path: url.pathname + url.search, agent: false, headers }, (res) => {
      if (res.statusCode !== 200) {
        const chunks: Buffer[] = []
        res.on('data', (c: Buffer) => chunks.push(c))
        res.on('end', () => finish({ timedOut: false, status: res.statusCode ?? 0, error: `GET /events → HTTP ${res.statusCode}: ${Buffer.concat(chunks).toString('utf8').slice(0, 200)}` }))
        res.on('error', (err) => finish({ timedOut: false, error: `GET /events → HTTP ${res.statusCode}, then ${err.message}` }))
        return
      }
      const decoder = new StringDecoder('utf8')
      let rest = ''
      let received = 0
      let parseError: string | undefined
      res.on('data', (c: Buffer) => {
        received += c.length
        const lines = (rest + decoder.write(c)).split('\n')
        rest = lines.pop()!
        for (const line of lines) {
          // SSE: only the data lines carry the event (id and event name repeat what it says).
          const data = format === 'sse' ? (line.startsWith('data: ') ? line.slice(6) : '') : line
          if (data.trim() === '') continue
          let ev: unknown
          try { ev = JSON.parse(data) } catch { parseError ??= `unparsable ${format} line ${JSON.stringify(line.slice(0, 100))}`; continue }
          onEvent(ev)
        }
        if (o.pause !== undefined && !paused && received >= o.pause.afterBytes) {
          paused = true
          res.pause()
          pauseTimer = setTimeout(() => res.resume(), o.pause.ms)
        }
      })
      res.on('end', () => finish({ timedOut: false, ...(parseError === undefined ? {} : { error: parseError }) }))
      res.on('error', (err) => finish({ timedOut: false, error: `response error: ${err.message}` }))
      res.on('close', () => finish({ timedOut: false, error: parseError ?? 'response closed before its end' }))
    })
    req.on('error', (err: NodeJS.ErrnoException) => finish({ timedOut: false, error: `request error: ${err.message}` }))
    const timer = setTimeout(() => { finish({ timedOut: true }); req.destroy() }, Math.max(1, timeoutMs))
  })
}

// The WebSocket attach (JSON text events), each event handed to onEvent.
export function streamWs (execId: string, timeoutMs: number, onEvent: (ev: any) => void, o: ReadOptions = {}): Promise<StreamRead> {
  return new Promise((resolve) => {
    let settled = false
    let paused = false
    let received = 0
    let stdinSent = o.stdin?.from ?? 0
    let pauseTimer: NodeJS.Timeout | undefined
    const ws = new WebSocket(`${baseUrl.replace(/^http/, 'ws')}/v1/execs/${execId}/stream${query(o)}`)
    const finish = (r: StreamRead): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      clearTimeout(pauseTimer)
      resolve({ ...r, ...(paused ? { paused } : {}), ...(o.stdin === undefined ? {} : { stdinSent }) })
    }
    const timer = setTimeout(() => { finish({ timedOut: true }); ws.terminate() }, Math.max(1, timeoutMs))
    ws.on('message', (data: Buffer, isBinary) => {
      received += data.length
      if (isBinary) onEvent({ type: '(binary frame)' })
      else {
        let ev: unknown
        try { ev = JSON.parse(data.toString()) } catch { ev = { type: '(unparsable)', raw: data.toString().slice(0, 100) } }
        onEvent(ev)
      }
      if (o.pause !== undefined && !paused && received >= o.pause.afterBytes) {
        paused = true
        ws.pause()
        pauseTimer = setTimeout(() => ws.resume(), o.pause.ms)
      }
    })
    ws.on('open', () => {
      const s = o.stdin
      if (s === undefined) return
      // A well-behaved client: at most 1 MiB handed to ws and not yet written to the socket.
      let unsent = 0
      let eofSent = false
      const pump = (): void => {
        while (ws.readyState === ws.OPEN && stdinSent < s.data.bytes && unsent < 1024 * 1024) {
          const n = Math.min(s.data.bytes - stdinSent, s.minChunk + Math.floor(s.rand() * (s.maxChunk - s.minChunk + 1)))
          const bytes = s.data.slice(stdinSent, n)
          stdinSent += n
          unsent += n
          const done = (): void => { unsent -= n; if (unsent < 256 * 1024) setImmediate(pump) }
          if (s.frames === 'binary') ws.send(Buffer.concat([Buffer.from([0]), bytes]), { binary: true }, done)
          else ws.send(JSON.stringify({ type: 'stdin', data: bytes.toString('latin1') }), done)
        }
        if (ws.readyState === ws.OPEN && stdinSent === s.data.bytes && unsent === 0 && !eofSent) {
          eofSent = true
          ws.send(JSON.stringify({ type: 'eof' }))
        }
      }
      pump()
    })
    ws.on('unexpected-response', (_req, res) => { finish({ timedOut: false, status: res.statusCode ?? 0, error: `WebSocket refused: HTTP ${res.statusCode}` }); ws.terminate() })
    ws.on('error', (err) => finish({ timedOut: false, error: `WebSocket error: ${err.message}` }))
    ws.on('close', (code) => finish({ timedOut: false, closeCode: code }))
  })
}
