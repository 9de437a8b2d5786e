import { createHash, randomBytes } from 'node:crypto'
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs'
import { createServer, request as httpRequest, type IncomingHttpHeaders } from 'node:http'
import { connect, createServer as createNetServer, type AddressInfo, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import websocket from '@fastify/websocket'
import fc from 'fast-check'
import Fastify, { type FastifyInstance } from 'fastify'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import WebSocket, { WebSocketServer } from 'ws'
import { forwardHttp } from '../../src/cluster/forward-http.js'
import { FORWARDED_BY_HEADER, type ForwardIdentity } from '../../src/cluster/forward-headers.js'
import { interceptUpgrades, type UpgradeInterception } from '../../src/cluster/forward-ws.js'
import { deriveReplicaSecret, REPLICA_AUTH_HEADER, replicaAuthHeader, verifyReplicaAuth } from '../../src/cluster/replica-auth.js'
import { loadDataDir, rotateTokenSecret } from '../../src/data-dir.js'
import { BINARY_SUBPROTOCOL, JSON_SUBPROTOCOL } from '../../src/schemas/websocket.js'
import { startGateway, type TestGateway } from '../helpers/gateway.js'
import { api, execStart, execWait, openPausedBinaryReader, readWebSocket, type WsResult } from '../helpers/api.js'
import { sandboxAccount, startOpenSshd } from '../helpers/openssh.js'
import { startSupervisorProcess } from '../helpers/supervisor-process.js'
import { startTcpProxy } from '../helpers/tcp-proxy.js'
import { sleep, waitFor } from '../helpers/wait.js'

// Issue 14: a replica forwards a public request it does not own to the owner replica and
// streams the answer back. The owner here is a real gateway with the embedded sandbox; the
// "front" is a small Fastify app that forwards every /v1 request and upgrade to it with
// src/cluster's modules, and every answer through it is compared with the same request sent
// to the owner directly.

// FC_SEED=s replays the generated stdin frames.
const SEED = process.env.FC_SEED === undefined ? Date.now() % 2 ** 31 : Number(process.env.FC_SEED)
const MiB = 1024 * 1024
const BIG = 64 * MiB

interface Front {
  url: string
  app: FastifyInstance
  ws: UpgradeInterception
  // Delays every upgrade's routing decision (bytes sent meanwhile must not be lost).
  decideDelayMs: number
  close: () => Promise<void>
}

// 'handler' forwards from a route, after Fastify parsed the body (sent again serialised);
// 'onRequest' forwards from a hook, before anything read the body (sent as the client's bytes).
async function startFront (targetBaseUrl: string, who: ForwardIdentity, mode: 'handler' | 'onRequest' = 'handler'): Promise<Front> {
  const app = Fastify({ bodyLimit: 4 * MiB })
  await app.register(websocket)
  // An upgrade the front serves itself: it must reach @fastify/websocket as before.
  app.get('/local/echo', { websocket: true }, (socket) => {
    socket.on('message', (data, isBinary) => socket.send(data as Buffer, { binary: isBinary }))
  })
  if (mode === 'onRequest') {
    app.addHook('onRequest', async (req, reply) => {
      if (req.url.startsWith('/v1/')) await forwardHttp(req, reply, { targetBaseUrl, ...who, connectTimeoutMs: 2000 })
    })
  }
  app.all('/v1/*', async (req, reply) => {
    await forwardHttp(req, reply, { targetBaseUrl, ...who, connectTimeoutMs: 2000 })
    return reply
  })
  await app.ready()
  const delay = { ms: 0 }
  // Installed after ready(), when @fastify/websocket's listener is in place.
  const ws = interceptUpgrades(app.server, async (req) => {
    if (delay.ms > 0) await sleep(delay.ms)
    if (req.url?.startsWith('/v1/boom') === true) throw new Error('the directory is down')
    return req.url?.startsWith('/v1/') === true ? { targetBaseUrl, ...who } : undefined
  }, { handshakeTimeoutMs: 3000 })
  const address = await app.listen({ host: '127.0.0.1', port: 0 })
  return {
    url: address,
    app,
    ws,
    get decideDelayMs () { return delay.ms },
    set decideDelayMs (ms: number) { delay.ms = ms },
    close: async () => {
      await ws.closeAll(1001, 1000)
      ws.uninstall()
      await app.close()
    }
  }
}

async function within<T> (ms: number, p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => { reject(new Error(`${what} did not settle within ${ms} ms`)) }, ms)
    })])
  } finally {
    clearTimeout(timer)
  }
}

// The fields of an exec that differ between two runs of the same command.
function sameRun (e: Record<string, unknown>): Record<string, unknown> {
  const { id: _id, createdAt: _c, startedAt: _s, endedAt: _e, ...rest } = e
  return rest
}

interface Refusal { status: number, contentType: string | undefined, body: string }

// The answer to an upgrade that is not accepted.
async function refusalOf (baseUrl: string, path: string, headers: Record<string, string> = {}): Promise<Refusal> {
  const ws = new WebSocket(baseUrl.replace(/^http/, 'ws') + path, [], { headers })
  return await within(10_000, new Promise<Refusal>((resolve, reject) => {
    ws.on('open', () => { ws.terminate(); reject(new Error('the upgrade was accepted')) })
    ws.on('error', reject)
    ws.on('unexpected-response', (_req, res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { body += c })
      res.on('end', () => resolve({ status: res.statusCode!, contentType: res.headers['content-type'], body }))
    })
  }), 'the upgrade refusal')
}

// An attach that also reports the subprotocol the server selected.
async function attach (baseUrl: string, execId: string, protocols: string[] = []): Promise<WsResult & { protocol: string }> {
  let protocol = ''
  const r = await within(30_000, readWebSocket(baseUrl, execId, { protocols, onOpen: (ws) => { protocol = ws.protocol } }), 'the attach')
  return { ...r, protocol }
}

// One masked client frame (RFC 6455 §5.2), for handshakes written by hand.
function clientFrame (opcode: number, payload: Buffer): Buffer {
  const mask = randomBytes(4)
  const len = payload.length
  const head = len < 126 ? Buffer.from([0x80 | opcode, 0x80 | len]) : Buffer.from([0x80 | opcode, 0x80 | 126, len >> 8, len & 0xff])
  const masked = Buffer.from(payload.map((b, i) => b ^ mask[i % 4]!))
  return Buffer.concat([head, mask, masked])
}

// Writes an upgrade request and a first frame in one write, and resolves with the response
// head and the first server frame's opcode and payload.
async function handshakeWithFrame (baseUrl: string, path: string, protocol: string | undefined, frame: Buffer): Promise<{ head: string, opcode: number, payload: Buffer }> {
  const { hostname, port } = new URL(baseUrl)
  const socket = connect(Number(port), hostname)
  const request = [`GET ${path} HTTP/1.1`, `Host: ${hostname}:${port}`, 'Upgrade: websocket', 'Connection: Upgrade',
    'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==', 'Sec-WebSocket-Version: 13',
    ...(protocol === undefined ? [] : [`Sec-WebSocket-Protocol: ${protocol}`]), '', ''].join('\r\n')
  socket.write(Buffer.concat([Buffer.from(request), frame]))
  try {
    return await within(10_000, new Promise((resolve, reject) => {
      let buf = Buffer.alloc(0)
      socket.on('error', reject)
      socket.on('data', (c: Buffer) => {
        buf = Buffer.concat([buf, c])
        const end = buf.indexOf('\r\n\r\n')
        if (end < 0 || buf.length < end + 6) return
        const f = buf.subarray(end + 4)
        let len = f[1]! & 0x7f
        let off = 2
        if (len === 126) { len = f.readUInt16BE(2); off = 4 }
        if (f.length < off + len) return
        resolve({ head: buf.subarray(0, end).toString(), opcode: f[0]! & 0x0f, payload: f.subarray(off, off + len) })
      })
    }), 'the hand-written handshake')
  } finally {
    socket.destroy()
  }
}

// node:http, which (unlike fetch) sends any Connection header it is given.
async function rawRequest (baseUrl: string, method: string, path: string, body: string, headers: Record<string, string>): Promise<{ status: number, body: string }> {
  return await within(10_000, new Promise((resolve, reject) => {
    const req = httpRequest(baseUrl + path, { method, headers }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { text += c })
      res.on('end', () => resolve({ status: res.statusCode!, body: text }))
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end(body)
  }), `${method} ${path}`)
}

async function readUntil (reader: ReadableStreamDefaultReader<Uint8Array>, done: (text: string) => boolean): Promise<string> {
  const decoder = new TextDecoder()
  let text = ''
  while (!done(text)) {
    const { value, done: ended } = await reader.read()
    if (ended) break
    text += decoder.decode(value, { stream: true })
  }
  return text
}

describe('forwarding to the owner replica (issue 14)', () => {
  let g: TestGateway
  let front: Front
  let who: ForwardIdentity
  let dir: string
  let blob2m: Buffer
  let blob2mPath: string
  let bigPath: string
  let bigDigest: string

  beforeAll(async () => {
    console.log(`[cluster-forward] fast-check seed ${SEED} (FC_SEED=${SEED} replays)`)
    dir = mkdtempSync(join(tmpdir(), 'egw-forward-'))
    blob2m = randomBytes(2 * MiB)
    blob2mPath = join(dir, 'blob2m')
    writeFileSync(blob2mPath, blob2m)
    bigPath = join(dir, 'big')
    const hash = createHash('sha256')
    const fd = openSync(bigPath, 'w')
    const block = randomBytes(MiB)
    for (let i = 0; i < BIG / MiB; i++) {
      block.writeUInt32BE(i, 0)
      hash.update(block)
      writeSync(fd, block)
    }
    closeSync(fd)
    bigDigest = hash.digest('hex')
    g = await startGateway({ localSandbox: true })
    await g.waitConnected('local')
    who = { replicaId: 'front-1', secret: deriveReplicaSecret(g.gw.identity) }
    front = await startFront(g.publicUrl, who)
  }, 60_000)

  afterAll(async () => {
    await front?.close()
    await g?.close()
    rmSync(dir, { recursive: true, force: true })
  })

  it('POST ?wait=true through the front gives the direct result field by field, 2 MiB of bytes exactly', async () => {
    // stdin and env travel in the JSON body the front parsed and sends again.
    const stdin = 'ünïcödé "quoted" \\ back\tslash\n\u2028 \ud83d\ude00 end'
    const req = { command: ['sh', '-c', 'cat "$1"; printf %s "$X" >&2; cat >&2; exit 3', 'sh', blob2mPath], env: { X: 'a "b" \\ c' }, stdin }
    const direct = await execWait(g.publicUrl, 'local', req, '?encoding=base64')
    const via = await execWait(front.url, 'local', req, '?encoding=base64')
    expect(direct.status).toBe(200)
    expect(via.status).toBe(200)
    expect(via.headers.get('content-type')).toBe(direct.headers.get('content-type'))
    expect(sameRun(via.body)).toEqual(sameRun(direct.body))
    expect(via.body.exitCode).toBe(3)
    expect(Buffer.from(via.body.stdout, 'base64').equals(blob2m)).toBe(true)
    expect(Buffer.from(via.body.stderr, 'base64').toString()).toBe('a "b" \\ c' + stdin)
    // The record is the owner's: the same exec, read directly.
    expect(sameRun((await api(g.publicUrl, 'GET', `/v1/execs/${via.body.id as string}`)).body)).toEqual(sameRun((await api(front.url, 'GET', `/v1/execs/${via.body.id as string}`)).body))
    // 201 and Location, and a problem, come through as the owner wrote them.
    const started = await api(front.url, 'POST', '/v1/sandboxes/local/execs', { command: ['true'] })
    expect(started.status).toBe(201)
    expect(started.headers.get('location')).toBe(`/v1/execs/${started.body.id as string}`)
    const bad = await api(front.url, 'POST', '/v1/sandboxes/local/execs', { command: [] })
    const badDirect = await api(g.publicUrl, 'POST', '/v1/sandboxes/local/execs', { command: [] })
    expect([bad.status, bad.headers.get('content-type'), bad.text]).toEqual([badDirect.status, badDirect.headers.get('content-type'), badDirect.text])
  }, 60_000)

  it.each([['text/event-stream'], ['application/x-ndjson']])('GET /events as %s streams through the front: first event while the command runs, the same bytes as direct', async (accept) => {
    const id = await execStart(front.url, 'local', { command: ['sh', '-c', 'echo a; sleep 2; echo b; exit 4'] })
    const t0 = Date.now()
    const res = await fetch(`${front.url}/v1/execs/${id}/events`, { headers: { accept } })
    expect(res.status).toBe(200)
    expect(res.headers.get('content-type')).toContain(accept)
    const reader = res.body!.getReader()
    const first = await within(5000, readUntil(reader, (t) => t.includes('"data":"a\\n"')), 'the first event')
    const firstAfterMs = Date.now() - t0
    expect(firstAfterMs, 'the first event arrives while the command still sleeps').toBeLessThan(1500)
    expect(g.gw.execs.get(id)!.finished).toBe(false)
    const live = first + await within(10_000, readUntil(reader, () => false), 'the end of the stream')
    expect(live).toContain('"type":"exit"')
    // Replayed after the end, through the front and directly: the same bytes; and the live
    // stream had those bytes too.
    const replayDirect = await (await fetch(`${g.publicUrl}/v1/execs/${id}/events`, { headers: { accept } })).text()
    const replayVia = await (await fetch(`${front.url}/v1/execs/${id}/events`, { headers: { accept } })).text()
    expect(replayVia).toBe(replayDirect)
    expect(live).toBe(replayDirect)
  }, 30_000)

  it('WebSocket through the front: the same frames, close and selected subprotocol as direct, for every offer', async () => {
    const id = (await execWait(g.publicUrl, 'local', { command: ['sh', '-c', 'printf "x\\ny"; printf err >&2; exit 3'] })).body.id as string
    const bearer = 'exec-gateway.bearer.' + Buffer.from('some-token').toString('base64url')
    for (const offer of [[], [JSON_SUBPROTOCOL], [BINARY_SUBPROTOCOL], [bearer, BINARY_SUBPROTOCOL, JSON_SUBPROTOCOL], [bearer, JSON_SUBPROTOCOL]]) {
      const direct = await attach(g.publicUrl, id, offer)
      const via = await attach(front.url, id, offer)
      expect(via, `offer ${offer.join(',')}`).toEqual(direct)
      expect(via.closeCode).toBe(1000)
    }
  }, 30_000)

  it('interactive stdin through the front: generated text and binary frames echoed by cat exactly, EOF, exit, 1000', async () => {
    const frames = fc.sample(fc.oneof(
      { weight: 3, arbitrary: fc.integer({ min: 1, max: 512 * 1024 }).map((n) => ({ kind: 'binary' as const, bytes: randomBytes(n) })) },
      { weight: 1, arbitrary: fc.string({ unit: 'grapheme', maxLength: 3000 }).map((s) => ({ kind: 'text' as const, bytes: Buffer.from(s) })) }
    ), { numRuns: 24, seed: SEED })
    // At least a few MiB whatever the seed.
    // A binary frame's channel byte counts against the 1 MiB message limit.
    frames.push({ kind: 'binary', bytes: randomBytes(MiB - 1) }, { kind: 'binary', bytes: randomBytes(MiB - 1) })
    const sent = createHash('sha256')
    let total = 0
    for (const f of frames) { sent.update(f.bytes); total += f.bytes.length }
    const id = await execStart(front.url, 'local', { command: ['cat'], interactive: true })
    const got = createHash('sha256')
    let received = 0
    let final: unknown
    const ws = new WebSocket(`${front.url.replace(/^http/, 'ws')}/v1/execs/${id}/stream`, [BINARY_SUBPROTOCOL])
    const closed = new Promise<{ code: number, protocol: string }>((resolve, reject) => {
      ws.on('error', reject)
      ws.on('close', (code) => resolve({ code, protocol: ws.protocol }))
    })
    ws.on('message', (data: Buffer, isBinary) => {
      if (!isBinary) { final = JSON.parse(data.toString()); return }
      expect(data[0]).toBe(1)
      got.update(data.subarray(1))
      received += data.length - 1
    })
    ws.on('open', () => {
      for (const f of frames) {
        if (f.kind === 'binary') ws.send(Buffer.concat([Buffer.from([0]), f.bytes]), { binary: true })
        else ws.send(JSON.stringify({ type: 'stdin', data: f.bytes.toString() }))
      }
      ws.send(JSON.stringify({ type: 'eof' }))
    })
    let peakToOwner = 0
    const sample = setInterval(() => { peakToOwner = Math.max(peakToOwner, front.ws.queued().toOwners) }, 5)
    const end = await within(60_000, closed, 'the interactive attach').finally(() => clearInterval(sample))
    console.log(`[cluster-forward] ${frames.length} stdin frames, ${total} bytes echoed; front queue towards the owner peaked at ${peakToOwner} B`)
    // The client's flood waits in the client's socket, not in the front: its high-water mark
    // and one message.
    expect(peakToOwner).toBeLessThan(3 * MiB)
    expect(end).toEqual({ code: 1000, protocol: BINARY_SUBPROTOCOL })
    expect(final).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
    expect(received).toBe(total)
    expect(got.digest('hex')).toBe(sent.digest('hex'))
  }, 90_000)

  it('a command that does not read its stdin holds a client\'s flood in the client, not in the front; then every byte arrives', async () => {
    const id = await execStart(front.url, 'local', { command: ['sh', '-c', 'sleep 3; wc -c'], interactive: true })
    const ws = new WebSocket(`${front.url.replace(/^http/, 'ws')}/v1/execs/${id}/stream`)
    const events: any[] = []
    const closed = new Promise<number>((resolve, reject) => {
      ws.on('error', reject)
      ws.on('close', (code) => resolve(code))
    })
    ws.on('message', (data: Buffer) => events.push(JSON.parse(data.toString())))
    await within(5000, new Promise((resolve) => ws.once('open', resolve)), 'the open')
    const frame = Buffer.concat([Buffer.from([0]), randomBytes(256 * 1024)])
    const frames = 96
    for (let i = 0; i < frames; i++) ws.send(frame)
    ws.send(JSON.stringify({ type: 'eof' }))
    let peakToOwner = 0
    const sample = setInterval(() => { peakToOwner = Math.max(peakToOwner, front.ws.queued().toOwners) }, 5)
    try {
      await sleep(2000)
      console.log(`[cluster-forward] stdin flood: client still holds ${ws.bufferedAmount} B; front queue towards the owner peaked at ${peakToOwner} B`)
      expect(ws.bufferedAmount, 'the flood waits in the client').toBeGreaterThan(8 * MiB)
      expect(peakToOwner).toBeLessThan(3 * MiB)
      expect(await within(30_000, closed, 'the flooded attach')).toBe(1000)
    } finally {
      clearInterval(sample)
    }
    expect(events.filter((e) => e.type === 'stdout').map((e) => e.data).join('').trim()).toBe(String(frames * 256 * 1024))
    expect(events.at(-1)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
  }, 60_000)

  it('an exec that ends in error closes the forwarded attach with 1011 and the direct reason', async () => {
    // A real relay failure: an OpenSSH sandbox reached through a proxy that is reset mid-exec
    // (DELETE is no error: the exec ends signalled by KILL).
    const sshd = await startOpenSshd({ authorizedKeys: [g.gw.identity.publicKey] })
    const proxy = await startTcpProxy({ targetHost: sshd.host, targetPort: sshd.port })
    const sup = startSupervisorProcess({ gatewayUrl: g.supervisorUrl, sandboxId: 'cut', token: g.token('cut'), sshTarget: `${proxy.host}:${proxy.port}`, sshUser: sandboxAccount() })
    try {
      await g.waitConnected('cut')
      const id = await execStart(g.publicUrl, 'cut', { command: ['sleep', '10'] })
      await waitFor(() => g.gw.execs.get(id)?.status === 'running', { timeoutMs: 10_000 })
      const direct = attach(g.publicUrl, id)
      const via = attach(front.url, id)
      await waitFor(() => g.gw.execs.get(id)?.readers === 2, { timeoutMs: 5000 })
      proxy.resetAll()
      const [d, v] = await Promise.all([direct, via])
      expect(d.closeCode).toBe(1011)
      expect(v).toEqual(d)
    } finally {
      await sup.stop()
      await proxy.close()
      await sshd.close()
    }
  }, 30_000)

  it('an unknown exec id is the same plain HTTP 404 with its body through the front', async () => {
    const path = '/v1/execs/ex_doesnotexist/stream'
    const direct = await refusalOf(g.publicUrl, path)
    const via = await refusalOf(front.url, path)
    expect(direct.status).toBe(404)
    expect(via).toEqual(direct)
    expect(JSON.parse(via.body)).toMatchObject({ code: 'exec_not_found' })
    expect(front.ws.bridges).toBe(0)
  })

  it('a reader that stops while the command prints 64 MiB: the front holds at most its window, the owner holds the command, every byte arrives once', async () => {
    const id = await execStart(front.url, 'local', { command: ['cat', bigPath] })
    const entry = g.gw.execs.get(id)!
    const reader = openPausedBinaryReader(front.url, id, { pauseAtBytes: MiB })
    let peakQueued = 0
    const sample = setInterval(() => { peakQueued = Math.max(peakQueued, front.ws.queued().toClients) }, 10)
    try {
      await waitFor(() => reader.paused, { timeoutMs: 20_000 })
      await waitFor(() => entry.flowHeld, { timeoutMs: 10_000, description: 'the owner holds the exec for its slow reader' })
      const rssAtPause = process.memoryUsage().rss
      const producedAtPause = entry.stdout.total
      await sleep(1500)
      const growth = entry.stdout.total - producedAtPause
      console.log(`[cluster-forward] paused at ${reader.received} B received, ${producedAtPause} B produced; +${growth} B in 1.5 s; front queue peak ${peakQueued} B`)
      expect(growth, 'the command is held while nobody reads').toBeLessThan(8 * MiB)
      expect(entry.stdout.total).toBeLessThan(BIG - 8 * MiB)
      expect(entry.status).toBe('running')
      // The front's own queue towards the client: its high-water mark and one message.
      expect(peakQueued).toBeLessThan(3 * MiB)
      expect(process.memoryUsage().rss - rssAtPause).toBeLessThan(32 * MiB)
      reader.ws.resume()
      expect(await within(60_000, reader.closed, 'the slow reader\'s end')).toBe(1000)
    } finally {
      clearInterval(sample)
    }
    expect(reader.received).toBe(BIG)
    expect(reader.sha256()).toBe(bigDigest)
    expect(reader.final).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
  }, 120_000)

  it('a client that leaves an SSE stream aborts the forwarded request: the owner loses its reader', async () => {
    const id = await execStart(g.publicUrl, 'local', { command: ['sh', '-c', 'while :; do echo tick; sleep 0.2; done'] })
    try {
      const ac = new AbortController()
      const res = await fetch(`${front.url}/v1/execs/${id}/events`, { headers: { accept: 'text/event-stream' }, signal: ac.signal })
      await within(5000, readUntil(res.body!.getReader(), (t) => t.includes('tick')), 'the first tick')
      expect(g.gw.execs.get(id)!.readers).toBe(1)
      ac.abort()
      await waitFor(() => g.gw.execs.get(id)!.readers === 0, { timeoutMs: 3000, description: 'the owner\'s reader is gone' })
    } finally {
      await api(g.publicUrl, 'DELETE', `/v1/execs/${id}`)
    }
  }, 20_000)

  it('an owner that breaks off mid-answer breaks the client connection too (SSE and WebSocket), never a clean end', async () => {
    const url = new URL(g.publicUrl)
    const proxy = await startTcpProxy({ targetHost: url.hostname, targetPort: Number(url.port) })
    const viaProxy = await startFront(`http://${proxy.host}:${proxy.port}`, who)
    const id = await execStart(g.publicUrl, 'local', { command: ['sh', '-c', 'while :; do echo tick; sleep 0.2; done'] })
    try {
      const res = await fetch(`${viaProxy.url}/v1/execs/${id}/events`, { headers: { accept: 'application/x-ndjson' } })
      const reader = res.body!.getReader()
      await within(5000, readUntil(reader, (t) => t.includes('tick')), 'the first tick')
      const ws = new WebSocket(`${viaProxy.url.replace(/^http/, 'ws')}/v1/execs/${id}/stream`)
      const wsClosed = new Promise<number>((resolve) => { ws.on('error', () => {}); ws.on('close', (code) => resolve(code)) })
      await within(5000, new Promise((resolve) => ws.once('message', resolve)), 'the first frame')
      proxy.resetAll()
      await expect(within(5000, readUntil(reader, () => false), 'the broken stream')).rejects.toThrow(/terminated/)
      expect(await within(5000, wsClosed, 'the broken attach')).toBe(1006)
    } finally {
      await api(g.publicUrl, 'DELETE', `/v1/execs/${id}`)
      await viaProxy.close()
      await proxy.close()
    }
  }, 30_000)

  it('the owner\'s API token check sees what a direct request shows it; an owner that is down: POST and upgrades are a 503 problem replica_unavailable', async () => {
    const other = await startGateway({ apiTokens: ['tok-1'] })
    const f = await startFront(other.publicUrl, { replicaId: 'front-2', secret: deriveReplicaSecret(other.gw.identity) })
    try {
      expect((await api(f.url, 'GET', '/v1/sandboxes')).status).toBe(401)
      expect((await api(f.url, 'GET', '/v1/sandboxes', undefined, { authorization: 'Bearer tok-1' })).status).toBe(200)
      // The bearer subprotocol reaches the owner's guard: past it, the exec is unknown.
      const bearer = 'exec-gateway.bearer.' + Buffer.from('tok-1').toString('base64url')
      for (const offer of [JSON_SUBPROTOCOL, `${bearer}, ${JSON_SUBPROTOCOL}`]) {
        const direct = await refusalOf(other.publicUrl, '/v1/execs/ex_x/stream', { 'sec-websocket-protocol': offer })
        const via = await refusalOf(f.url, '/v1/execs/ex_x/stream', { 'sec-websocket-protocol': offer })
        expect(via).toEqual(direct)
        expect(via.status).toBe(offer === JSON_SUBPROTOCOL ? 401 : 404)
      }
      await other.close()
      const r = await api(f.url, 'POST', '/v1/sandboxes/local/execs?wait=true', { command: ['true'] })
      expect(r.status).toBe(503)
      expect(r.headers.get('content-type')).toContain('application/problem+json')
      expect(r.body).toMatchObject({ status: 503, code: 'replica_unavailable', title: 'Replica unavailable' })
      expect(r.body.detail).toContain('cannot be reached')
      const up = await refusalOf(f.url, '/v1/execs/ex_x/stream')
      expect(up.status).toBe(503)
      expect(up.contentType).toBe('application/problem+json')
      expect(JSON.parse(up.body)).toMatchObject({ code: 'replica_unavailable' })
    } finally {
      await f.close()
    }
  }, 30_000)

  it('a request that was already forwarded once is refused, never forwarded again', async () => {
    const before = (await api(g.publicUrl, 'GET', '/v1/execs')).body.execs.length as number
    const marked = { [FORWARDED_BY_HEADER]: 'replica-x' }
    const r = await api(front.url, 'POST', '/v1/sandboxes/local/execs', { command: ['true'] }, marked)
    expect(r.status).toBe(503)
    expect(r.body).toMatchObject({ code: 'replica_unavailable' })
    expect(r.body.detail).toContain('replica-x')
    expect((await api(g.publicUrl, 'GET', '/v1/execs')).body.execs.length).toBe(before)
    const up = await refusalOf(front.url, '/v1/execs/ex_x/stream', marked)
    expect(up.status).toBe(503)
    expect(JSON.parse(up.body)).toMatchObject({ code: 'replica_unavailable' })
  })

  it('upgrades the front does not forward reach @fastify/websocket as before; bytes sent while routing is decided are kept', async () => {
    front.decideDelayMs = 300
    try {
      const local = await handshakeWithFrame(front.url, '/local/echo', undefined, clientFrame(0x1, Buffer.from('hello')))
      expect(local.head).toMatch(/^HTTP\/1\.1 101 /)
      expect([local.opcode, local.payload.toString()]).toEqual([0x1, 'hello'])
      const id = await execStart(g.publicUrl, 'local', { command: ['cat'], interactive: true })
      const forwarded = await handshakeWithFrame(front.url, `/v1/execs/${id}/stream`, BINARY_SUBPROTOCOL, clientFrame(0x2, Buffer.from('\x00ping\n')))
      expect(forwarded.head).toMatch(/^HTTP\/1\.1 101 /)
      expect(forwarded.head.toLowerCase()).toContain(`sec-websocket-protocol: ${BINARY_SUBPROTOCOL}`)
      expect([forwarded.opcode, forwarded.payload.toString()]).toEqual([0x2, '\x01ping\n'])
      await api(g.publicUrl, 'DELETE', `/v1/execs/${id}`)
    } finally {
      front.decideDelayMs = 0
    }
  }, 20_000)
})

describe('replica auth', () => {
  it('an internal listener refuses requests without the replica header, and a forwarding replica passes it (the token secret never sent)', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'egw-replica-auth-'))
    const otherDir = mkdtempSync(join(tmpdir(), 'egw-replica-auth-other-'))
    const internal = Fastify()
    const cleanup: Array<() => Promise<void>> = [async () => { await internal.close() }]
    try {
      const identity = loadDataDir(dataDir)
      const secret = deriveReplicaSecret(identity)
      internal.addHook('onRequest', async (req, reply) => {
        if (!verifyReplicaAuth(secret, req.headers)) return await reply.code(401).type('application/problem+json').send({ code: 'unauthenticated' })
      })
      // The body as the bytes that arrived.
      internal.removeContentTypeParser('application/json')
      internal.addContentTypeParser('application/json', { parseAs: 'string' }, (_req, body, done) => { done(null, body) })
      internal.all('/v1/*', async (req) => ({ headers: req.headers, body: req.body ?? null }))
      const internalUrl = await internal.listen({ host: '127.0.0.1', port: 0 })
      const f = await startFront(internalUrl, { replicaId: 'front-auth', secret })
      cleanup.unshift(f.close)
      const early = await startFront(internalUrl, { replicaId: 'front-early', secret }, 'onRequest')
      cleanup.unshift(early.close)

      expect((await api(internalUrl, 'GET', '/v1/x')).status).toBe(401)
      expect((await api(internalUrl, 'GET', '/v1/x', undefined, { [REPLICA_AUTH_HEADER]: 'egw-replica nope' })).status).toBe(401)
      expect((await api(internalUrl, 'GET', '/v1/x', undefined, replicaAuthHeader(deriveReplicaSecret(loadDataDir(otherDir))))).status).toBe(401)
      expect((await api(internalUrl, 'GET', '/v1/x', undefined, replicaAuthHeader(secret))).status).toBe(200)

      // A parsed body goes out serialised again; one nothing read yet goes out as it came,
      // whitespace, escapes and all (also chunked).
      const sent = String.raw`{ "command" : ["echo", "\u00fc \"x\" \/"],` + '\n "env": {"A": "1"} }'
      const r = await rawRequest(f.url, 'POST', '/v1/echo?wait=true&a=%2F', sent, { 'content-type': 'application/json', 'x-custom': 'kept', connection: 'keep-alive, x-hop', 'x-hop': 'dropped' })
      expect(r.status).toBe(200)
      const echoed = JSON.parse(r.body) as { headers: IncomingHttpHeaders, body: string }
      const seen = echoed.headers
      expect(echoed.body).toBe(JSON.stringify(JSON.parse(sent)))
      for (const chunked of [false, true]) {
        const e = await rawRequest(early.url, 'POST', '/v1/echo', sent, { 'content-type': 'application/json', ...(chunked ? { 'transfer-encoding': 'chunked' } : {}) })
        expect(e.status).toBe(200)
        expect(JSON.parse(e.body)).toMatchObject({ body: sent, headers: { [FORWARDED_BY_HEADER]: 'front-early' } })
      }
      expect(seen[FORWARDED_BY_HEADER]).toBe('front-auth')
      expect(seen['x-forwarded-for']).toBe('127.0.0.1')
      expect(seen['x-custom']).toBe('kept')
      expect(seen['x-hop']).toBeUndefined()
      expect(seen.host).toBe(new URL(internalUrl).host)
      const wire = JSON.stringify(seen)
      for (const s of identity.tokenSecrets) {
        expect(wire).not.toContain(s.toString('hex'))
        expect(wire).not.toContain(s.toString('base64url'))
        expect(wire).not.toContain(s.toString('base64'))
      }

      // During a token secret rotation a replica still on the old secret is accepted.
      const before = secret
      rotateTokenSecret(dataDir, 'start')
      const rotated = deriveReplicaSecret(loadDataDir(dataDir))
      expect(rotated.current.equals(before.current)).toBe(false)
      expect(verifyReplicaAuth(rotated, replicaAuthHeader(before) as IncomingHttpHeaders)).toBe(true)
      expect(verifyReplicaAuth(before, replicaAuthHeader(rotated) as IncomingHttpHeaders)).toBe(false)
      rotateTokenSecret(dataDir, 'retire')
      expect(verifyReplicaAuth(deriveReplicaSecret(loadDataDir(dataDir)), replicaAuthHeader(before) as IncomingHttpHeaders)).toBe(false)
    } finally {
      for (const c of cleanup) await c()
      rmSync(dataDir, { recursive: true, force: true })
      rmSync(otherDir, { recursive: true, force: true })
    }
  })
})

// A WebSocket server scripted by its client, as the owner: it echoes each message as it came,
// closes as a "close:<code>:<reason>" text asks ("none": no code; "drop": no close frame), and
// records how each client closed.
interface ScriptedOwner {
  url: string
  closes: Array<{ code: number, reason: string }>
  close: () => Promise<void>
}

async function startScriptedOwner (): Promise<ScriptedOwner> {
  const server = createServer((_req, res) => { res.writeHead(404).end() })
  const wss = new WebSocketServer({ server, handleProtocols: (offered) => offered.has('b') ? 'b' : false })
  const closes: ScriptedOwner['closes'] = []
  wss.on('connection', (ws) => {
    ws.on('error', () => {})
    ws.on('close', (code, reason) => closes.push({ code, reason: reason.toString() }))
    ws.on('message', (data: Buffer, isBinary) => {
      const text = isBinary ? '' : data.toString()
      if (!text.startsWith('close:')) { ws.send(data, { binary: isBinary }); return }
      const [, code, reason] = text.split(':')
      if (code === 'none') ws.close()
      else if (code === 'drop') ws.terminate()
      else ws.close(Number(code), reason)
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  return {
    url: `http://127.0.0.1:${port}`,
    closes,
    close: async () => {
      for (const c of wss.clients) c.terminate()
      await new Promise<void>((resolve) => wss.close(() => resolve()))
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

describe('the WebSocket bridge against a scripted owner', () => {
  let owner: ScriptedOwner
  let front: Front
  beforeAll(async () => {
    owner = await startScriptedOwner()
    front = await startFront(owner.url, { replicaId: 'front-ws', secret: deriveReplicaSecret({ tokenSecret: randomBytes(32), tokenSecrets: [] }) })
  })
  afterAll(async () => {
    await front?.close()
    await owner?.close()
  })

  const wsUrl = (): string => `${front.url.replace(/^http/, 'ws')}/v1/scripted`
  const opened = async (protocols: string[] = []): Promise<WebSocket> => {
    const ws = new WebSocket(wsUrl(), protocols)
    ws.on('error', () => {})
    await within(5000, new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('close', reject) }), 'the bridged open')
    return ws
  }
  const closedWith = async (ws: WebSocket): Promise<{ code: number, reason: string }> => await within(5000, new Promise((resolve) => {
    ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() }))
  }), 'the close')

  it('messages keep their kind and bytes, the owner\'s subprotocol choice (or none) is the client\'s, pings are answered per hop', async () => {
    const ws = await opened(['a', 'b'])
    expect(ws.protocol).toBe('b')
    const got: Array<[boolean, Buffer]> = []
    ws.on('message', (data: Buffer, isBinary) => got.push([isBinary, data]))
    ws.send('héllo ✓')
    ws.send(Buffer.from([0, 1, 2, 255]))
    ws.send(Buffer.alloc(0), { binary: true })
    await waitFor(() => got.length === 3, { timeoutMs: 5000 })
    expect(got).toEqual([[false, Buffer.from('héllo ✓')], [true, Buffer.from([0, 1, 2, 255])], [true, Buffer.alloc(0)]])
    const pong = within(5000, new Promise((resolve) => ws.once('pong', resolve)), 'the pong')
    ws.ping('p')
    await pong
    ws.close(1000)
    // The owner selecting none of the offer is a 101 without one, as directly (ws's own
    // client would refuse that answer, so the handshake is written by hand).
    for (const base of [owner.url, front.url]) {
      const r = await handshakeWithFrame(base, '/v1/scripted', 'a', clientFrame(0x1, Buffer.from('still here')))
      expect(r.head).toMatch(/^HTTP\/1\.1 101 /)
      expect(r.head.toLowerCase()).not.toContain('sec-websocket-protocol')
      expect([r.opcode, r.payload.toString()]).toEqual([0x1, 'still here'])
    }
  })

  it.each([
    ['1000:bye', { code: 1000, reason: 'bye' }], ['1001:away', { code: 1001, reason: 'away' }],
    ['1008:policy', { code: 1008, reason: 'policy' }], ['1009:big', { code: 1009, reason: 'big' }],
    ['1011:err', { code: 1011, reason: 'err' }], ['4001:custom', { code: 4001, reason: 'custom' }],
    ['none', { code: 1005, reason: '' }], ['drop', { code: 1006, reason: '' }]
  ])('the owner closing with %s reaches the client as %o', async (how, want) => {
    const ws = await opened()
    const closed = closedWith(ws)
    ws.send(`close:${how}`)
    expect(await closed).toEqual(want)
    await waitFor(() => front.ws.bridges === 0, { timeoutMs: 5000 })
  })

  it.each([
    [1000, 'done'], [1001, 'leaving'], [4002, 'mine'], [undefined, ''], ['terminate', '']
  ] as const)('the client closing with %s reaches the owner the same way', async (code, reason) => {
    const ws = await opened()
    const before = owner.closes.length
    if (code === 'terminate') ws.terminate()
    else if (code === undefined) ws.close()
    else ws.close(code, reason)
    await waitFor(() => owner.closes.length > before, { timeoutMs: 5000 })
    const want = code === 'terminate' ? 1006 : code ?? 1005
    expect(owner.closes.at(-1)).toEqual({ code: want, reason })
  })

  it('closeAll ends every bridge with the given code on both sides', async () => {
    const a = await opened()
    const b = await opened()
    const before = owner.closes.length
    const ends = [closedWith(a), closedWith(b)]
    expect(front.ws.bridges).toBe(2)
    await within(5000, front.ws.closeAll(1001, 2000), 'closeAll')
    expect(await Promise.all(ends)).toEqual([{ code: 1001, reason: 'replica shutting down' }, { code: 1001, reason: 'replica shutting down' }])
    await waitFor(() => owner.closes.length === before + 2, { timeoutMs: 5000 })
    expect(owner.closes.slice(before).map((c) => c.code)).toEqual([1001, 1001])
    expect(front.ws.bridges).toBe(0)
  })

  it('an upgrade whose routing fails is a 503 problem; a malformed one is refused as a 400 problem before the owner is asked', async () => {
    const r = await refusalOf(front.url, '/v1/boom')
    expect(r.status).toBe(503)
    expect(JSON.parse(r.body)).toMatchObject({ code: 'replica_unavailable', detail: 'cannot route this upgrade: the directory is down' })
    const before = owner.closes.length
    const bad = await rawRequest(front.url, 'GET', '/v1/scripted', '', { connection: 'Upgrade', upgrade: 'websocket', 'sec-websocket-version': '13', 'sec-websocket-key': 'short' })
    expect(bad.status).toBe(400)
    expect(JSON.parse(bad.body)).toMatchObject({ code: 'invalid_argument' })
    expect(owner.closes.length).toBe(before)
  })

  it('an owner that accepts the connection but never answers the handshake is a 503 within the bound', async () => {
    const held = new Set<Socket>()
    const silent = createNetServer((s) => { s.on('error', () => {}); held.add(s) })
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve))
    const f = await startFront(`http://127.0.0.1:${(silent.address() as AddressInfo).port}`, { replicaId: 'front-silent', secret: deriveReplicaSecret({ tokenSecret: randomBytes(32), tokenSecrets: [] }) })
    try {
      const t0 = Date.now()
      const r = await refusalOf(f.url, '/v1/execs/ex_x/stream')
      expect(r.status).toBe(503)
      expect(JSON.parse(r.body)).toMatchObject({ code: 'replica_unavailable' })
      expect(Date.now() - t0).toBeLessThan(6000)
    } finally {
      await f.close()
      await new Promise<void>((resolve) => { silent.close(() => resolve()); for (const c of held) c.destroy() })
    }
  }, 20_000)
})
