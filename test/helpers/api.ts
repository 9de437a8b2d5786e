import WebSocket from 'ws'

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

export async function execWait (baseUrl: string, sandboxId: string, req: Record<string, unknown>, query = ''): Promise<ApiResponse> {
  return await api(baseUrl, 'POST', `/v1/sandboxes/${sandboxId}/execs?wait=true${query}`, req)
}

export async function execStart (baseUrl: string, sandboxId: string, req: Record<string, unknown>): Promise<string> {
  const r = await api(baseUrl, 'POST', `/v1/sandboxes/${sandboxId}/execs`, req)
  if (r.status !== 201) throw new Error(`exec start failed: ${r.status} ${r.text}`)
  return r.body.id as string
}

// Every event of /events until it ends.
export async function readEvents (baseUrl: string, execId: string, accept = 'application/x-ndjson', query = ''): Promise<any[]> {
  const res = await fetch(`${baseUrl}/v1/execs/${execId}/events${query}`, { headers: { accept } })
  const text = await res.text()
  if (accept.includes('event-stream')) {
    return text.split('\n\n').filter((b) => b.trim() !== '').map((block) => {
      const data = block.split('\n').find((l) => l.startsWith('data: '))!
      return JSON.parse(data.slice(6))
    })
  }
  return text.split('\n').filter((l) => l.trim() !== '').map((l) => JSON.parse(l))
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
