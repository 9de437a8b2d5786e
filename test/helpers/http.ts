import http from 'node:http'

// A request on a fresh connection that is closed afterwards (agent: false), for tests that
// count sockets and so cannot have a client connection pool keeping connections open.
export async function postJsonOnce (url: string, body: unknown): Promise<{ status: number, body: any }> {
  const payload = JSON.stringify(body)
  return await new Promise((resolve, reject) => {
    const req = http.request(url, { method: 'POST', agent: false, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } }, (res) => {
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
    req.on('error', reject)
    req.end(payload)
  })
}
