import { connect } from 'node:net'

// A deliberately dumb HTTP/1.1 client over a bare TCP socket: it sends exactly the bytes it is
// given (paths with "..", raw UTF-8, broken percent-escapes, odd or repeated headers) where
// fetch and node:http would normalise or refuse them first. One request per connection.

export type RawHeader = [name: string, value: string | Buffer]

export interface RawRequest {
  method: string
  path: string | Buffer
  headers?: RawHeader[]
  body?: Buffer | string
  // Host header value; defaults to the listener's host:port. null sends no Host at all.
  host?: string | null
  // Adds content-length for the body (default true when there is a body).
  contentLength?: boolean
  timeoutMs?: number
}

export interface RawResponse {
  status: number
  headers: Record<string, string>
  body: Buffer
  text: string
  json: any
}

export interface RawTarget { host: string, port: number }

export function targetOf (baseUrl: string): RawTarget {
  const u = new URL(baseUrl)
  return { host: u.hostname, port: Number(u.port) }
}

function dechunk (buf: Buffer): Buffer {
  const out: Buffer[] = []
  let i = 0
  for (;;) {
    const eol = buf.indexOf('\r\n', i)
    if (eol < 0) break
    const size = parseInt(buf.subarray(i, eol).toString('latin1').split(';')[0]!, 16)
    if (!Number.isFinite(size) || size === 0) break
    out.push(buf.subarray(eol + 2, eol + 2 + size))
    i = eol + 2 + size + 2
  }
  return Buffer.concat(out)
}

function parse (raw: Buffer): RawResponse | undefined {
  // Interim answers (100 Continue for an Expect header) precede the real one.
  while (/^HTTP\/1\.[01] 1(0[02-9]|[1-9]\d) /.test(raw.subarray(0, 13).toString('latin1'))) {
    const interimEnd = raw.indexOf('\r\n\r\n')
    if (interimEnd < 0) return undefined
    raw = raw.subarray(interimEnd + 4)
  }
  const end = raw.indexOf('\r\n\r\n')
  if (end < 0) return undefined
  const head = raw.subarray(0, end).toString('latin1').split('\r\n')
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(head[0] ?? '')
  if (m === null) throw new Error(`not an HTTP response: ${JSON.stringify(raw.subarray(0, 200).toString('latin1'))}`)
  const headers: Record<string, string> = {}
  for (const line of head.slice(1)) {
    const c = line.indexOf(':')
    if (c > 0) headers[line.slice(0, c).trim().toLowerCase()] = line.slice(c + 1).trim()
  }
  let body = raw.subarray(end + 4)
  if (/chunked/i.test(headers['transfer-encoding'] ?? '')) body = dechunk(body)
  const text = body.toString('utf8')
  let json: any
  try { json = JSON.parse(text) } catch { json = undefined }
  return { status: Number(m[1]), headers, body, text, json }
}

// Resolves with the response once the server has sent it and closed (Connection: close), or
// as soon as the head of a 101 arrives (the socket is then dropped), or with status 0 when the
// server closed the connection without a byte of answer. Rejects when the server neither
// answers nor closes within timeoutMs, on a socket error, or on a truncated answer.
export async function rawRequest (target: RawTarget, req: RawRequest): Promise<RawResponse> {
  const body = req.body === undefined ? undefined : Buffer.isBuffer(req.body) ? req.body : Buffer.from(req.body, 'utf8')
  const lines: Buffer[] = [Buffer.concat([Buffer.from(`${req.method} `, 'latin1'), Buffer.isBuffer(req.path) ? req.path : Buffer.from(req.path, 'utf8'), Buffer.from(' HTTP/1.1\r\n', 'latin1')])]
  if (req.host !== null) lines.push(Buffer.from(`Host: ${req.host ?? `${target.host}:${target.port}`}\r\n`, 'utf8'))
  for (const [name, value] of req.headers ?? []) {
    lines.push(Buffer.concat([Buffer.from(`${name}: `, 'latin1'), Buffer.isBuffer(value) ? value : Buffer.from(value, 'utf8'), Buffer.from('\r\n')]))
  }
  if (body !== undefined && req.contentLength !== false) lines.push(Buffer.from(`Content-Length: ${body.length}\r\n`))
  lines.push(Buffer.from('Connection: close\r\n\r\n'))
  const payload = Buffer.concat(body === undefined ? lines : [...lines, body])
  const timeoutMs = req.timeoutMs ?? 10_000

  return await new Promise<RawResponse>((resolve, reject) => {
    const chunks: Buffer[] = []
    let settled = false
    const sock = connect(target.port, target.host)
    const timer = setTimeout(() => finish(new Error(`no complete response within ${timeoutMs} ms to ${req.method} ${String(req.path).slice(0, 200)}`)), timeoutMs)
    const finish = (err?: Error): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      sock.destroy()
      const raw = Buffer.concat(chunks)
      let res: RawResponse | undefined
      try { res = parse(raw) } catch (e) { reject(e instanceof Error ? e : new Error(String(e))); return }
      // A server may answer early (413, 400) and reset the rest of our upload: the answer counts.
      if (res !== undefined) resolve(res)
      else if (err === undefined && raw.length === 0) resolve({ status: 0, headers: {}, body: raw, text: '', json: undefined })
      else reject(err ?? new Error(`connection closed mid-response to ${req.method} ${String(req.path).slice(0, 200)}: ${JSON.stringify(raw.subarray(0, 200).toString('latin1'))}`))
    }
    sock.on('data', (c: Buffer) => {
      chunks.push(c)
      const raw = Buffer.concat(chunks)
      if (raw.subarray(0, 12).toString('latin1').startsWith('HTTP/1.1 101') && raw.includes('\r\n\r\n')) finish()
    })
    sock.on('end', () => finish())
    sock.on('close', () => finish())
    sock.on('error', (err) => finish(err))
    sock.write(payload)
  })
}
