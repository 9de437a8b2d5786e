import { request } from 'node:http'
import { connect, createServer } from 'node:net'

// The launcher's questions to what it started, each one bounded: is redis answering, what does
// haproxy think of its servers, what does a replica say about a sandbox.

const HOST = '127.0.0.1'
// Ports a person may have a real service on; a port from the kernel is never asked to be one.
const RESERVED_PORTS = new Set([80, 443, 6379, 8080, 8081, 8082, 8404, 16379])

export const sleep = async (ms: number): Promise<void> => { await new Promise((resolve) => setTimeout(resolve, ms)) }

/** A port the kernel says is free now (bound and released); the caller may still lose a race for it. */
export async function freePort (taken: ReadonlySet<number>): Promise<number> {
  for (;;) {
    const port = await new Promise<number>((resolve, reject) => {
      const srv = createServer()
      srv.once('error', reject)
      srv.listen(0, HOST, () => {
        const a = srv.address()
        const p = typeof a === 'object' && a !== null ? a.port : 0
        srv.close(() => { resolve(p) })
      })
    })
    if (!RESERVED_PORTS.has(port) && !taken.has(port)) return port
  }
}

/** True when something accepts TCP connections on host:port (within timeoutMs). */
export async function tcpAccepts (port: number, timeoutMs: number): Promise<boolean> {
  return await new Promise((resolve) => {
    const sock = connect(port, HOST)
    const done = (ok: boolean): void => { clearTimeout(timer); sock.destroy(); resolve(ok) }
    const timer = setTimeout(() => { done(false) }, timeoutMs)
    sock.once('error', () => { done(false) })
    sock.once('connect', () => { done(true) })
  })
}

/** One PING over a raw socket: true on +PONG within timeoutMs. */
export async function redisPing (port: number, timeoutMs: number): Promise<boolean> {
  return await new Promise((resolve) => {
    const sock = connect(port, HOST)
    let buf = ''
    const done = (ok: boolean): void => { clearTimeout(timer); sock.destroy(); resolve(ok) }
    const timer = setTimeout(() => { done(false) }, timeoutMs)
    sock.once('error', () => { done(false) })
    sock.once('connect', () => { sock.write('PING\r\n') })
    sock.on('data', (d) => {
      buf += d.toString()
      if (buf.includes('+PONG')) done(true)
    })
  })
}

/** haproxy `show stat` over its admin socket: "backend/server" → status (UP, DOWN, "DOWN 1/2"...). */
export async function haproxyServerStatus (socketPath: string, timeoutMs: number): Promise<Map<string, string>> {
  const csv = await new Promise<string>((resolve, reject) => {
    const sock = connect(socketPath)
    let buf = ''
    const timer = setTimeout(() => { sock.destroy(); reject(new Error(`haproxy admin socket: no answer within ${timeoutMs} ms`)) }, timeoutMs)
    sock.once('error', (err) => { clearTimeout(timer); reject(err) })
    sock.once('connect', () => { sock.write('show stat\n') })
    sock.on('data', (d) => { buf += d.toString() })
    sock.once('close', () => { clearTimeout(timer); resolve(buf) })
  })
  const lines = csv.split('\n').filter((l) => l.trim() !== '')
  const header = lines.shift()?.replace(/^# /, '').split(',') ?? []
  const [px, sv, st] = ['pxname', 'svname', 'status'].map((n) => header.indexOf(n)) as [number, number, number]
  const out = new Map<string, string>()
  for (const l of lines) {
    const f = l.split(',')
    const name = f[sv] ?? ''
    if (name === 'FRONTEND' || name === 'BACKEND') continue
    out.set(`${f[px] ?? ''}/${name}`, f[st] ?? '')
  }
  return out
}

/** GET url → status and parsed JSON body (undefined when it is not JSON); rejects on a network error or after timeoutMs. */
export async function getJson (url: string, timeoutMs: number): Promise<{ status: number, body: unknown }> {
  return await new Promise((resolve, reject) => {
    // agent: false: one connection per probe, closed after it, so no keep-alive socket outlives the launcher's use.
    const req = request(url, { method: 'GET', agent: false, timeout: timeoutMs }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { text += c })
      res.on('error', reject)
      res.on('end', () => {
        let body: unknown
        try { body = JSON.parse(text) } catch { body = undefined }
        resolve({ status: res.statusCode ?? 0, body })
      })
    })
    req.on('timeout', () => { req.destroy(new Error(`GET ${url}: no answer within ${timeoutMs} ms`)) })
    req.on('error', reject)
    req.end()
  })
}
