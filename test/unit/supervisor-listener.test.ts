import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import http2, { type ClientHttp2Session } from 'node:http2'
import net from 'node:net'
import tls from 'node:tls'
import pino from 'pino'
import { startGateway, type TestGateway } from '../helpers/gateway.js'
import { certDir, type CertDir } from '../helpers/tls-certs.js'
import { sleep } from '../helpers/wait.js'
import { api } from '../helpers/api.js'
import { Supervisor } from '../../src/supervisor/agent.js'
import { RELAY_PATH_PREFIX, SESSION_PATH } from '../../src/relay/protocol.js'

// The supervisor listener's connection budgets on a real in-process gateway, each with a
// deadline small enough to wait for: the auth deadline (h2c and TLS, including a handshake
// that never finishes), the connections one sandbox may hold, a connection speaking for one
// sandbox only, and a refused-stream budget that a reconnect does not refill.

const within = async <T>(p: Promise<T>, ms: number, what: string): Promise<T> =>
  await Promise.race([p, sleep(ms).then(() => { throw new Error(`${what} did not happen within ${ms} ms`) })])

// Resolves with how long after the connect the gateway closed the socket.
async function closedAfter (socket: net.Socket, boundMs: number): Promise<number> {
  const t0 = performance.now()
  socket.on('error', () => {})
  socket.resume()
  await within(new Promise((resolve) => socket.once('close', resolve)), boundMs, 'the gateway closing the connection')
  return performance.now() - t0
}

interface H2 { client: ClientHttp2Session, goaway: Promise<number>, closed: Promise<void> }

function h2 (url: string, opts: http2.SecureClientSessionOptions = {}): H2 {
  const client = http2.connect(url, opts)
  client.on('error', () => {})
  return {
    client,
    goaway: new Promise((resolve) => client.once('goaway', (code) => resolve(code))),
    closed: new Promise((resolve) => client.once('close', () => resolve()))
  }
}

// The answer to one request, once its stream has closed: the status (if any) and the reset code.
// A refused relay claim is a 200 and then RST_STREAM REFUSED_STREAM.
async function answer (c: H2, path: string, token: string): Promise<string> {
  const s = c.client.request({ ':method': 'POST', ':path': path, authorization: `Bearer ${token}` })
  s.on('error', () => {})
  s.resume()
  let st = 'none'
  s.once('response', (h) => { st = String(h[':status']) })
  await within(new Promise((resolve) => s.once('close', resolve)), 5000, `an answer on ${path}`)
  return `${st} rst ${s.rstCode ?? 0}`
}

const REFUSED_CLAIM = `200 rst ${http2.constants.NGHTTP2_REFUSED_STREAM}`

// An address whose connection was closed for abuse is refused for up to a second; every test
// here connects from 127.0.0.1, so each starts after that.
const PENALTY_MAX_MS = 1000
// A dropped connection closes well within the penalty's first step.
const PENALTY_BASE_BOUND_MS = 500

describe('supervisor listener budgets', () => {
  let g: TestGateway
  let honest: Supervisor
  afterEach(async () => { await sleep(PENALTY_MAX_MS + 100) })
  beforeAll(async () => {
    g = await startGateway({ supervisorAuthTimeoutMs: 300, supervisorRefusedStreamsPerMinute: 20 })
    honest = new Supervisor({ gatewayUrl: g.supervisorUrl, sandboxId: 'honest', token: g.token('honest'), logger: pino({ level: 'silent' }) })
    await honest.start()
    await g.waitConnected('honest')
  })
  afterAll(async () => {
    await honest?.stop()
    await g?.close()
  })

  const honestRuns = async (): Promise<void> => {
    const r = await api(g.publicUrl, 'POST', '/v1/sandboxes/honest/execs?wait=true', { command: ['sh', '-c', 'printf ok; exit 4'] })
    expect(r.body).toMatchObject({ stdout: 'ok', exitCode: 4 })
  }

  it('an h2c connection that shows no valid token is closed at the auth deadline; one that does is not', async () => {
    const u = new URL(g.supervisorUrl)
    const idle = net.connect(Number(u.port), u.hostname)
    const ms = await closedAfter(idle, 3000)
    expect(ms).toBeGreaterThanOrEqual(250)
    expect(ms).toBeLessThan(1500)
    const bad = h2(g.supervisorUrl)
    expect(await answer(bad, SESSION_PATH, 'egw1.bm9wZQ.0.forged')).toMatch(/^401 /)
    await within(bad.closed, 3000, 'the unauthenticated connection closing')
    expect(g.gw.refusals.count('auth_timeout')).toBeGreaterThanOrEqual(2)
    await sleep(500)
    expect(g.gw.registry.get('honest')?.session).toBeDefined()
    await honestRuns()
  })

  it('a sandbox holds at most --max-session-streams-per-sandbox connections; the next is refused and closed', async () => {
    const token = g.token('many-conns')
    const held: H2[] = []
    try {
      for (let i = 0; i < 4; i++) {
        const c = h2(g.supervisorUrl)
        held.push(c)
        // An unclaimed relay authenticates the connection (and is refused).
        expect(await answer(c, `${RELAY_PATH_PREFIX}r${i}`, token)).toBe(REFUSED_CLAIM)
      }
      const fifth = h2(g.supervisorUrl)
      held.push(fifth)
      expect(await answer(fifth, SESSION_PATH, token)).toMatch(/^429 /)
      expect(await within(fifth.goaway, 3000, 'a GOAWAY on the fifth connection')).toBe(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM)
      await within(fifth.closed, 3000, 'the fifth connection closing')
      expect(g.gw.refusals.count('sandbox_connections')).toBeGreaterThanOrEqual(1)
    } finally {
      for (const c of held) c.client.destroy()
    }
    await honestRuns()
  })

  it('a connection speaks for the sandbox of its first token only', async () => {
    const c = h2(g.supervisorUrl)
    try {
      expect(await answer(c, `${RELAY_PATH_PREFIX}x`, g.token('first'))).toBe(REFUSED_CLAIM)
      expect(await answer(c, SESSION_PATH, g.token('second'))).toMatch(/^403 /)
      expect(g.gw.registry.get('second')).toBeUndefined()
    } finally { c.client.destroy() }
  })

  it('the refused-stream budget belongs to the sandbox: a new connection does not refill it', async () => {
    const token = g.token('spender')
    const first = h2(g.supervisorUrl)
    let refused = 0
    try {
      // 20 a minute: the 21st refusal closes the connection.
      for (let i = 0; i < 25; i++) {
        if (first.client.closed || first.client.destroyed) break
        const st = await answer(first, `${RELAY_PATH_PREFIX}n${i}`, token).catch(() => '')
        if (st === REFUSED_CLAIM) refused++
      }
      expect(await within(first.goaway, 3000, 'the GOAWAY')).toBe(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM)
      expect(refused).toBeLessThanOrEqual(22)
      await first.closed
      await sleep(PENALTY_MAX_MS + 100)
      const second = h2(g.supervisorUrl)
      try {
        await answer(second, `${RELAY_PATH_PREFIX}again`, token).catch(() => '')
        // Closed at its first refusal.
        expect(await within(second.goaway, 3000, 'the GOAWAY on the reconnect')).toBe(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM)
      } finally { second.client.destroy() }
    } finally { first.client.destroy() }
    await honestRuns()
  })
})

describe('supervisor listener: an address just closed for abuse is dropped for a moment', () => {
  let g: TestGateway
  let honest: Supervisor
  beforeAll(async () => {
    g = await startGateway({ supervisorRefusedStreamsPerMinute: 4 })
    honest = new Supervisor({ gatewayUrl: g.supervisorUrl, sandboxId: 'honest', token: g.token('honest'), logger: pino({ level: 'silent' }) })
    await honest.start()
    await g.waitConnected('honest')
  })
  afterAll(async () => {
    await honest?.stop()
    await g?.close()
  })

  it('reconnects right after a close are dropped before any HTTP/2, the honest connection from the same address stays, and the penalty ends', async () => {
    const abuser = h2(g.supervisorUrl)
    for (let i = 0; i < 6 && !abuser.client.closed && !abuser.client.destroyed; i++) await answer(abuser, `${RELAY_PATH_PREFIX}p${i}`, g.token('abuser')).catch(() => '')
    expect(await within(abuser.goaway, 3000, 'the GOAWAY')).toBe(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM)
    await abuser.closed
    // At once: dropped before a SETTINGS frame could be sent.
    const u = new URL(g.supervisorUrl)
    const again = net.connect(Number(u.port), u.hostname)
    let bytes = 0
    again.on('data', (c: Buffer) => { bytes += c.length })
    expect(await closedAfter(again, 2000)).toBeLessThan(PENALTY_BASE_BOUND_MS)
    expect(bytes).toBe(0)
    expect(g.gw.refusals.count('address_penalty')).toBeGreaterThanOrEqual(1)
    expect(g.gw.registry.get('honest')?.session).toBeDefined()
    const r = await api(g.publicUrl, 'POST', '/v1/sandboxes/honest/execs?wait=true', { command: ['sh', '-c', 'printf still; exit 2'] })
    expect(r.body).toMatchObject({ stdout: 'still', exitCode: 2 })
    await sleep(PENALTY_MAX_MS + 100)
    const later = h2(g.supervisorUrl)
    try {
      expect(await answer(later, `${RELAY_PATH_PREFIX}later`, g.token('someone-else'))).toBe(REFUSED_CLAIM)
    } finally { later.client.destroy() }
  })
})

describe('supervisor listener over TLS: the handshake is bounded too', () => {
  let certs: CertDir
  let g: TestGateway
  beforeAll(async () => {
    certs = certDir()
    const ca = await certs.ca('listener')
    const server = await certs.server(ca, 'listener')
    g = await startGateway({ supervisorAuthTimeoutMs: 300, supervisorTls: { certFile: server.certFile, keyFile: server.keyFile } })
  })
  afterAll(async () => {
    await g?.close()
    certs?.remove()
  })

  it('a TCP connection that never starts TLS, and one that stalls mid-handshake, are closed at the deadline', async () => {
    const u = new URL(g.supervisorUrl)
    const silent = net.connect(Number(u.port), u.hostname)
    expect(await closedAfter(silent, 3000)).toBeLessThan(1500)
    // Half a ClientHello: the record header promises more than ever comes.
    const half = net.connect(Number(u.port), u.hostname, () => { half.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])) })
    expect(await closedAfter(half, 3000)).toBeLessThan(1500)
    // A complete handshake that then says nothing is an unauthenticated connection like any.
    const quiet = tls.connect({ host: u.hostname, port: Number(u.port), ALPNProtocols: ['h2'], rejectUnauthorized: false })
    expect(await closedAfter(quiet, 3000)).toBeLessThan(1500)
    expect(g.gw.refusals.count('auth_timeout')).toBeGreaterThanOrEqual(3)
  })
})
