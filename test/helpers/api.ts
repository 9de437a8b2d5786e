import { createHash } from 'node:crypto'
import WebSocket from 'ws'
import { BINARY_SUBPROTOCOL, createGatewayClient, type Encoding, type ExecEvent, type ExecRequest } from '../../sdk/index.js'

// Plain HTTP and WebSocket clients against a live gateway, as a user's code would talk to it.

export interface ApiResponse<T = any> { status: number, headers: Headers, body: T, text: string }

export async function api<T = any> (baseUrl: string, method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<ApiResponse<T>> {
  const res = await fetch(baseUrl + path, {
    method,
    headers: body === undefined ? headers : { 'content-type': 'application/json', ...headers },
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body)
  })
  const text = await res.text()
  let parsed: any = text
  try { parsed = JSON.parse(text) } catch { /* not JSON */ }
  return { status: res.status, headers: res.headers, body: parsed as T, text }
}

// Exec creation and /events go through the SDK (sdk/index.ts), so every test that uses these
// helpers also exercises the generated client against the real gateway.

type Query = { encoding?: Encoding, stdoutOffset?: number, stderrOffset?: number }

// The helpers take the query as text ("&encoding=base64", "?stdoutOffset=4"); the SDK wants it typed.
function parseQuery (query: string): Query {
  const out: Query = {}
  for (const [k, v] of new URLSearchParams(query.replace(/^[?&]/, ''))) {
    if (k === 'encoding' && (v === 'utf8' || v === 'base64')) out.encoding = v
    else if ((k === 'stdoutOffset' || k === 'stderrOffset') && /^\d+$/.test(v)) out[k] = Number(v)
    else throw new Error(`test helper: query parameter ${k}=${v} is not supported; call api() for raw requests`)
  }
  return out
}

export async function execWait (baseUrl: string, sandboxId: string, req: Record<string, unknown>, query = ''): Promise<ApiResponse> {
  const { encoding } = parseQuery(query)
  const { data, error, response } = await createGatewayClient({ baseUrl }).runAndWait(sandboxId, req as ExecRequest, { ...(encoding === undefined ? {} : { encoding }) })
  const body: any = data ?? error
  return { status: response.status, headers: response.headers, body, text: typeof body === 'string' ? body : JSON.stringify(body) }
}

export async function execStart (baseUrl: string, sandboxId: string, req: Record<string, unknown>): Promise<string> {
  const { data, error, response } = await createGatewayClient({ baseUrl }).POST('/v1/sandboxes/{sandboxId}/execs', {
    params: { path: { sandboxId } },
    body: req as ExecRequest
  })
  if (response.status !== 201 || data === undefined) throw new Error(`exec start failed: ${response.status} ${JSON.stringify(error)}`)
  return data.id
}

// Every event of /events until it ends.
export async function readEvents (baseUrl: string, execId: string, accept = 'application/x-ndjson', query = ''): Promise<any[]> {
  const events: ExecEvent[] = []
  const format = accept.includes('event-stream') ? 'sse' : 'ndjson'
  for await (const ev of createGatewayClient({ baseUrl }).streamEvents(execId, { format, ...parseQuery(query) })) events.push(ev)
  return events
}

export interface WsResult { events: any[], closeCode: number, closeReason: string, binary: Buffer[] }

// Collects every frame until the server closes the socket.
export async function readWebSocket (baseUrl: string, execId: string, opts: { query?: string, protocols?: string[], onOpen?: (ws: WebSocket) => void } = {}): Promise<WsResult> {
  const ws = new WebSocket(`${baseUrl.replace(/^http/, 'ws')}/v1/execs/${execId}/stream${opts.query ?? ''}`, opts.protocols ?? [])
  const events: any[] = []
  const binary: Buffer[] = []
  return await new Promise((resolve, reject) => {
    ws.on('open', () => opts.onOpen?.(ws))
    ws.on('message', (data, isBinary) => {
      if (isBinary) binary.push(Buffer.from(data as Buffer))
      else events.push(JSON.parse(data.toString()))
    })
    ws.on('unexpected-response', (_req, res) => reject(new Error(`websocket refused: ${res.statusCode}`)))
    ws.on('error', reject)
    ws.on('close', (code, reason) => resolve({ events, closeCode: code, closeReason: reason.toString(), binary }))
  })
}

export function outputOf (events: any[], stream: 'stdout' | 'stderr'): string {
  return events.filter((e) => e.type === stream).map((e) => e.data).join('')
}

export interface PausedBinaryReader {
  readonly ws: WebSocket
  // Resolves with the close code.
  readonly closed: Promise<number>
  readonly paused: boolean
  // Bytes of output received so far, channel bytes not counted.
  readonly received: number
  // The last JSON text frame: the final event, once the stream has ended.
  readonly final: unknown
  // Of every output byte received; call once, after the close.
  sha256: () => string
}

// A reader of an exec's stream in binary frames that stops reading (ws.pause()) once pauseAtBytes
// have arrived, so the gateway's window to the sandbox closes, until the caller resumes it.
// onFrame sees each binary frame before it is counted.
export function openPausedBinaryReader (baseUrl: string, execId: string, opts: { pauseAtBytes: number, onFrame?: (frame: Buffer) => void }): PausedBinaryReader {
  const ws = new WebSocket(`${baseUrl.replace('http', 'ws')}/v1/execs/${execId}/stream`, [BINARY_SUBPROTOCOL])
  const hash = createHash('sha256')
  let received = 0
  let final: unknown
  let paused = false
  const closed = new Promise<number>((resolve, reject) => {
    ws.on('error', reject)
    ws.on('close', (code) => resolve(code))
  })
  ws.on('message', (data: Buffer, isBinary: boolean) => {
    if (!isBinary) { final = JSON.parse(data.toString()); return }
    opts.onFrame?.(data)
    hash.update(data.subarray(1))
    received += data.length - 1
    if (!paused && received >= opts.pauseAtBytes) { paused = true; ws.pause() }
  })
  return {
    ws,
    closed,
    get paused () { return paused },
    get received () { return received },
    get final () { return final },
    sha256: () => hash.digest('hex')
  }
}
