import http from 'node:http'

// JSON over plain node:http, for callers that must control connections: the load test counts
// sockets (agent: false, a fresh connection closed afterwards), the bench pools its own.

export interface JsonResponse { status: number, body: any }

export interface RequestJsonOptions {
  method: string
  body?: unknown
  agent: http.Agent | false
  timeoutMs?: number
}

export async function requestJson (url: string, opts: RequestJsonOptions): Promise<JsonResponse> {
  const payload = opts.body === undefined ? undefined : JSON.stringify(opts.body)
  return await new Promise((resolve, reject) => {
    const req = http.request(url, {
      method: opts.method,
      agent: opts.agent,
      headers: payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) }
    }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString()
        let parsed: any = text
        try { parsed = JSON.parse(text) } catch { /* not JSON */ }
        resolve({ status: res.statusCode ?? 0, body: parsed })
      })
      res.on('error', reject)
    })
    if (opts.timeoutMs !== undefined) {
      const ms = opts.timeoutMs
      req.setTimeout(ms, () => req.destroy(new Error(`${opts.method} ${url} took over ${ms} ms`)))
    }
    req.on('error', reject)
    req.end(payload)
  })
}

export async function postJsonOnce (url: string, body: unknown): Promise<JsonResponse> {
  return await requestJson(url, { method: 'POST', body, agent: false })
}
