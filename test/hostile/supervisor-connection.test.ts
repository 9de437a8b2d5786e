import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import http2, { type ClientHttp2Session } from 'node:http2'
import net from 'node:net'
import { readdirSync } from 'node:fs'
import { expectHonestUnharmed, refusalCounts, refusalDiff, startHostileWorld, type AttackReport, type HostileWorld } from './harness.js'
import { sleep, waitFor } from '../helpers/wait.js'
import { RELAY_PATH_PREFIX, SESSION_PATH } from '../../src/relay/protocol.js'

// A hostile peer of the supervisor listener below the session protocol: idle TCP connections
// that never authenticate, floods of refused streams, and HTTP/2 abuse (rapid reset, PING and
// SETTINGS floods, header blocks too big or too many, frames nghttp2 rejects, a peer that
// never reads), written frame by frame on a raw socket where node:http2 would refuse to. Each
// runs beside the honest sandbox's steady execs on a gateway child process, bounded in time
// and count, and asserts: the gateway lives, the honest execs all succeed unslowed, the hostile
// connection was closed by the gateway (GOAWAY ENHANCE_YOUR_CALM where it is ours to send) and
// its socket released.

const MiB = 2 ** 20
// The honest sandbox's bounds under attack: every exec exact, RSS under 300 MiB, p99 within
// 3× the quiet run or 500 ms above it, and the gateway's own CPU under 80 % of one core. The
// attacker, the gateway, the honest supervisor and the test's HTTP clients share two cores with
// whatever else the machine runs; profiles of the gateway during the p99 outliers show it idle,
// so the p99 bound is loose and the CPU bound is the one the gateway answers for. A gateway
// that stalls for seconds (as before: 30 s, 12.9 s) fails either.
const UNHARMED = { maxRssBytes: 300 * MiB, p99Factor: 3, p99SlackMs: 500 }
// Attacks that reconnect as fast as the attacker can: each new connection costs the gateway its
// TCP and HTTP/2 setup and the parsing of the first batch of frames before the connection is
// closed (measured ~4 ms of CPU each), so the attacker's connect rate sets the gateway's CPU;
// p99 gets a second of slack, which still fails the stalls of seconds this suite is about.
const UNHARMED_CHURN = { ...UNHARMED, p99SlackMs: 1000 }
function expectUnharmed (r: AttackReport, bounds = UNHARMED): void {
  expectHonestUnharmed(r, bounds)
  expect(r.cpuSeconds, `${r.attack}: gateway CPU ${r.cpuSeconds} s in ${r.wallSeconds} s`).toBeLessThanOrEqual(0.8 * r.wallSeconds)
}
const ENHANCE_YOUR_CALM = http2.constants.NGHTTP2_ENHANCE_YOUR_CALM
// The world's budgets, made small where the test must wait for them.
const AUTH_TIMEOUT_MS = 1000
const PING_INTERVAL_MS = 1000
const PING_TIMEOUT_MS = 1000

const fds = (world: HostileWorld): number => readdirSync(`/proc/${world.gateway.pid}/fd`).length

// The attacker shares the test process with the honest load's HTTP clients: it yields often.
const breathe = async (): Promise<void> => { await new Promise((resolve) => setImmediate(resolve)) }

// ---- HTTP/2 frames by hand ------------------------------------------------------------------

const FRAME = { DATA: 0, HEADERS: 1, RST_STREAM: 3, SETTINGS: 4, PING: 6, GOAWAY: 7, CONTINUATION: 9 } as const
const END_STREAM = 0x1
const END_HEADERS = 0x4

function frame (type: number, flags: number, streamId: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(9)
  h.writeUIntBE(payload.length, 0, 3)
  h[3] = type
  h[4] = flags
  h.writeUInt32BE(streamId, 5)
  return Buffer.concat([h, payload])
}

// HPACK integers with an N-bit prefix (RFC 7541 §5.1).
function hpackInt (n: number, bits: number): number[] {
  const max = (1 << bits) - 1
  if (n < max) return [n]
  const out = [max]
  let rest = n - max
  while (rest >= 128) { out.push((rest % 128) + 128); rest = Math.floor(rest / 128) }
  out.push(rest)
  return out
}

// Literal header fields without indexing, no Huffman: every byte of the block is ours.
function headerBlock (pairs: ReadonlyArray<readonly [string, string]>): Buffer {
  return Buffer.concat(pairs.flatMap(([k, v]) => {
    const kb = Buffer.from(k)
    const vb = Buffer.from(v)
    return [Buffer.from([0]), Buffer.from(hpackInt(kb.length, 7)), kb, Buffer.from(hpackInt(vb.length, 7)), vb]
  }))
}

const request = (path: string, token: string, extra: ReadonlyArray<readonly [string, string]> = []): ReadonlyArray<readonly [string, string]> =>
  [[':method', 'POST'], [':scheme', 'http'], [':authority', 'gateway'], [':path', path], ['authorization', `Bearer ${token}`], ...extra]

class RawH2 {
  readonly socket: net.Socket
  readonly goaways: number[] = []
  rstFrames = 0
  closedAtMs: number | undefined
  readonly #t0 = performance.now()
  #in: Buffer = Buffer.alloc(0)
  #nextId = 1
  #weClosed = false

  private constructor (socket: net.Socket, read: boolean) {
    this.socket = socket
    socket.on('error', () => {})
    socket.on('close', () => { this.closedAtMs = performance.now() - this.#t0 })
    if (read) socket.on('data', (c: Buffer) => this.#read(c))
    socket.write(Buffer.concat([Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'), frame(FRAME.SETTINGS, 0, 0)]))
  }

  static async connect (url: string, opts: { read?: boolean } = {}): Promise<RawH2> {
    const u = new URL(url)
    const socket = net.connect(Number(u.port), u.hostname)
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('raw h2: no TCP connection within 5 s')), 5000)
      socket.once('connect', () => { clearTimeout(t); resolve() })
      socket.once('error', (e) => { clearTimeout(t); reject(e) })
    })
    return new RawH2(socket, opts.read ?? true)
  }

  get closedByGateway (): boolean { return this.closedAtMs !== undefined && !this.#weClosed }
  get closed (): boolean { return this.closedAtMs !== undefined || this.socket.destroyed }
  nextStream (): number { const id = this.#nextId; this.#nextId += 2; return id }

  // Writes with backpressure; resolves once written, drained, or the socket is gone.
  async send (buf: Buffer): Promise<void> {
    if (this.closed) return
    if (this.socket.write(buf)) return
    await new Promise<void>((resolve) => {
      const t = setTimeout(done, 2000)
      function done (): void { clearTimeout(t); resolve() }
      this.socket.once('drain', done)
      this.socket.once('close', done)
    })
  }

  async waitClosed (ms: number): Promise<boolean> {
    if (!this.closed) await Promise.race([new Promise((resolve) => this.socket.once('close', resolve)), sleep(ms)])
    return this.closed
  }

  destroy (): void {
    if (!this.closed) this.#weClosed = true
    this.socket.destroy()
  }

  #read (c: Buffer): void {
    this.#in = this.#in.length === 0 ? c : Buffer.concat([this.#in, c])
    while (this.#in.length >= 9) {
      const len = this.#in.readUIntBE(0, 3)
      if (this.#in.length < 9 + len) break
      const type = this.#in[3]!
      const flags = this.#in[4]!
      const payload = this.#in.subarray(9, 9 + len)
      if (type === FRAME.GOAWAY) this.goaways.push(payload.readUInt32BE(4))
      if (type === FRAME.RST_STREAM) this.rstFrames++
      // A well-behaved peer in everything but the attack: SETTINGS and PINGs are answered.
      if (type === FRAME.SETTINGS && (flags & 1) === 0) this.socket.write(frame(FRAME.SETTINGS, 1, 0))
      if (type === FRAME.PING && (flags & 1) === 0) this.socket.write(frame(FRAME.PING, 1, 0, Buffer.from(payload)))
      this.#in = this.#in.subarray(9 + len)
    }
  }
}

// Runs `batch` (frames for one write) until the gateway closes the connection, the window ends
// or `max` batches went out; reconnects after each close when `again` says so.
async function flood (world: HostileWorld, signal: AbortSignal, build: (raw: RawH2, i: number) => Buffer, opts: { max?: number, again?: boolean, authenticate?: string } = {}): Promise<RawH2[]> {
  const conns: RawH2[] = []
  do {
    const raw = await RawH2.connect(world.supervisorUrl)
    conns.push(raw)
    if (opts.authenticate !== undefined) {
      // One valid stream first: the connection then speaks for the sandbox, past the auth deadline.
      await raw.send(frame(FRAME.HEADERS, END_HEADERS | END_STREAM, raw.nextStream(), headerBlock(request(RELAY_PATH_PREFIX + 'warm-up', opts.authenticate))))
      await sleep(50)
    }
    for (let i = 0; i < (opts.max ?? 100_000) && !raw.closed && !signal.aborted; i++) {
      await raw.send(build(raw, i))
      await breathe()
    }
    await raw.waitClosed(3000)
    raw.destroy()
  } while (opts.again === true && !signal.aborted)
  return conns
}

// Every connection of a flood but the last (cut by the window's end) was closed by the gateway,
// and its GOAWAY ENHANCE_YOUR_CALM reached at least one of them: a flooding peer's kernel may
// drop the GOAWAY it had not read yet when the gateway's reset arrives.
function expectClosedByGateway (conns: RawH2[], what: string, codes: readonly number[] = [ENHANCE_YOUR_CALM], countedByBudget = false): void {
  expect(conns.length, what).toBeGreaterThanOrEqual(2)
  for (const c of conns.slice(0, -1)) expect(c.closedByGateway, what).toBe(true)
  if (countedByBudget) return
  expect(conns.flatMap((c) => c.goaways).some((code) => codes.includes(code)), `${what}: GOAWAY codes ${JSON.stringify(conns.flatMap((c) => c.goaways))}`).toBe(true)
}

describe('hostile supervisor connections', () => {
  let world: HostileWorld
  beforeAll(async () => {
    world = await startHostileWorld({
      extraArgs: [
        '--supervisor-auth-timeout-ms', String(AUTH_TIMEOUT_MS),
        '--h2-ping-interval-ms', String(PING_INTERVAL_MS),
        '--h2-ping-timeout-ms', String(PING_TIMEOUT_MS)
      ]
    })
  })
  afterAll(async () => { await world?.stop() })

  it('20,000 relay-claim streams with a valid token: each connection is closed at its budget, the sandbox\'s budget carries over', async () => {
    const before = await refusalCounts(world.publicUrl)
    let streams = 0
    let connections = 0
    let calm = 0
    const r = await world.underAttack('20,000 relay-claim streams', async (signal) => {
      const token = world.token('hostile-claims')
      while (!signal.aborted && streams < 20_000) {
        const client: ClientHttp2Session = http2.connect(world.supervisorUrl)
        connections++
        client.on('error', () => {})
        let goaway: number | undefined
        client.on('goaway', (code) => { goaway ??= code })
        const closed = new Promise((resolve) => client.once('close', resolve))
        for (let i = 0; i < 1000 && streams < 20_000; i++) {
          if (i % 50 === 0) await breathe()
          if (client.closed || client.destroyed || goaway !== undefined) break
          const s = client.request({ ':method': 'POST', ':path': `${RELAY_PATH_PREFIX}${i}-nobody-asked`, authorization: `Bearer ${token}` })
          s.on('error', () => {})
          s.resume()
          streams++
        }
        await Promise.race([closed, sleep(3000)])
        if (goaway === ENHANCE_YOUR_CALM) calm++
        client.destroy()
      }
    }, { durationMs: 8000 })
    const d = refusalDiff(await refusalCounts(world.publicUrl), before)
    console.log(`relay claims: ${streams} streams over ${connections} connections, ${calm} closed with ENHANCE_YOUR_CALM; refusals ${JSON.stringify(d)}; honest p99 ${r.quiet.p99Ms.toFixed(0)} → ${r.underAttack.p99Ms.toFixed(0)} ms`)
    expectUnharmed(r, UNHARMED_CHURN)
    expect(streams).toBeGreaterThan(2000)
    // Each connection was closed by the gateway: those that got to speak with GOAWAY
    // ENHANCE_YOUR_CALM, the reconnects that came right after one dropped before any HTTP/2.
    expect(calm).toBeGreaterThanOrEqual(1)
    expect(calm + (d.address_penalty ?? 0)).toBeGreaterThanOrEqual(connections - 1)
    // A fresh connection does not refill the sandbox's budget: far fewer claims than streams
    // reached the refusal path.
    expect(d.unclaimed_relay ?? 0).toBeLessThan(streams)
    expect(d.refused_streams).toBeGreaterThanOrEqual(1)
  })

  it('2,000 idle TCP connections that never authenticate: beyond the cap closed at once, the rest at the auth deadline', async () => {
    const before = await refusalCounts(world.publicUrl)
    // Taken when the attack starts: the honest load's keep-alive sockets are open by then.
    let fds0 = 0
    let peakFds = 0
    // Per socket, from its TCP connect to its close by the gateway.
    const lifetimes: number[] = []
    let closed = 0
    const r = await world.underAttack('2,000 unauthenticated idle connections', async (signal) => {
      fds0 = fds(world)
      peakFds = fds0
      const u = new URL(world.supervisorUrl)
      const sockets: net.Socket[] = []
      for (let i = 0; i < 2000 && !signal.aborted; i++) {
        const s = net.connect(Number(u.port), u.hostname)
        s.on('error', () => {})
        // Never a byte out; reading (and dropping) what comes is how a socket sees its end.
        s.resume()
        let connectedAt: number | undefined
        s.once('connect', () => { connectedAt = performance.now() })
        s.once('close', () => {
          closed++
          if (connectedAt !== undefined) lifetimes.push(performance.now() - connectedAt)
        })
        sockets.push(s)
        // Paced, so the listen backlog holds them: a dropped SYN would be retried a second
        // later and measure the kernel, not the gateway.
        if (i % 50 === 0) { await sleep(5); peakFds = Math.max(peakFds, fds(world)) }
      }
      const sampler = setInterval(() => { try { peakFds = Math.max(peakFds, fds(world)) } catch { /* gone */ } }, 50)
      try {
        await waitFor(() => closed === sockets.length, { timeoutMs: AUTH_TIMEOUT_MS + 8000, intervalMs: 20, description: 'the gateway closing every idle connection' })
      } finally {
        clearInterval(sampler)
        for (const s of sockets) s.destroy()
      }
    }, { durationMs: 4000 })
    expectUnharmed(r)
    const d = refusalDiff(await refusalCounts(world.publicUrl), before)
    expect(closed).toBe(2000)
    expect(lifetimes.length).toBe(2000)
    const last = Math.max(...lifetimes)
    expect(last).toBeLessThan(AUTH_TIMEOUT_MS + 1500)
    // Those over the cap went at once, the others at the deadline (a lifetime also counts the
    // wait in the kernel's accept queue, which a loaded machine stretches).
    const atOnce = lifetimes.filter((ms) => ms < AUTH_TIMEOUT_MS / 2).length
    expect(atOnce).toBeGreaterThanOrEqual((d.connection_limit ?? 0) / 2)
    expect(d.connection_limit).toBeGreaterThanOrEqual(1)
    expect(d.auth_timeout).toBeGreaterThanOrEqual(200)
    expect((d.connection_limit ?? 0) + (d.auth_timeout ?? 0)).toBeGreaterThanOrEqual(2000)
    // Never much more than the cap held at once, and every socket released after.
    expect(peakFds - fds0).toBeLessThanOrEqual(256 + 64)
    await waitFor(() => fds(world) <= fds0 + 8, { timeoutMs: 5000, intervalMs: 50, description: 'the gateway releasing the sockets' })
    console.log(`idle connections: the longest lived ${last.toFixed(0)} ms, ${atOnce} closed at once; gateway fds ${fds0} → peak ${peakFds}; refusals ${JSON.stringify(d)}`)
  })

  it('rapid reset (HEADERS then RST_STREAM, on the session route and the relay route): closed with ENHANCE_YOUR_CALM', async () => {
    for (const path of [SESSION_PATH, RELAY_PATH_PREFIX + 'x']) {
      let conns: RawH2[] = []
      const r = await world.underAttack(`rapid reset on ${path}`, async (signal) => {
        const token = world.token('hostile-reset')
        const block = headerBlock(request(path, token))
        conns = await flood(world, signal, (raw) => Buffer.concat(Array.from({ length: 100 }, () => {
          const id = raw.nextStream()
          return Buffer.concat([frame(FRAME.HEADERS, END_HEADERS, id, block), frame(FRAME.RST_STREAM, 0, id, Buffer.from([0, 0, 0, 8]))])
        })), { again: true })
      }, { durationMs: 4000, quietMs: 2000 })
      expectUnharmed(r, UNHARMED_CHURN)
      expectClosedByGateway(conns, path)
    }
  })

  it('PING and SETTINGS floods: closed at the control-frame budget (or by nghttp2 at its own flood limit)', async () => {
    for (const [name, f] of [['PING', frame(FRAME.PING, 0, 0, Buffer.alloc(8))], ['SETTINGS', frame(FRAME.SETTINGS, 0, 0)]] as const) {
      let conns: RawH2[] = []
      const before = await refusalCounts(world.publicUrl)
      const r = await world.underAttack(`${name} flood`, async (signal) => {
        conns = await flood(world, signal, () => Buffer.concat(Array.from({ length: 200 }, () => f)), { again: true, authenticate: world.token('hostile-frames') })
      }, { durationMs: 3000, quietMs: 2000 })
      expectUnharmed(r)
      // Ours (ENHANCE_YOUR_CALM, at the budget) or nghttp2's own (INTERNAL_ERROR, when a read
      // holds more than a thousand frames to acknowledge): whichever comes first. A flooding
      // peer's kernel may drop every GOAWAY it had not read when the reset arrives (seen in CI
      // on 2 busy cores); the budget's own count then says who closed them.
      const floods = refusalDiff(await refusalCounts(world.publicUrl), before).frame_flood ?? 0
      expectClosedByGateway(conns, name, [ENHANCE_YOUR_CALM, http2.constants.NGHTTP2_INTERNAL_ERROR], floods > 0)
    }
  })

  it('header blocks: too many pairs, over 16 KiB, a CONTINUATION flood, a frame over the frame size: each connection closed and released', async () => {
    const token = world.token('hostile-headers')
    const attacks: Array<[string, (raw: RawH2) => Buffer, boolean]> = [
      // Refused by Node below the stream handler, one by one: counted from the stream ids.
      ['100 header pairs per stream', (raw) => Buffer.concat(Array.from({ length: 50 }, () => frame(FRAME.HEADERS, END_HEADERS | END_STREAM, raw.nextStream(), headerBlock(request(RELAY_PATH_PREFIX + 'x', token, Array.from({ length: 100 }, (_, i) => [`x-h${i}`, 'v'] as const)))))), true],
      ['20 KiB header lists in CONTINUATIONs', (raw) => {
        const id = raw.nextStream()
        const block = headerBlock(request(RELAY_PATH_PREFIX + 'x', token, [['x-big', 'a'.repeat(20_000)]]))
        return Buffer.concat([frame(FRAME.HEADERS, END_STREAM, id, block.subarray(0, 10_000)), frame(FRAME.CONTINUATION, END_HEADERS, id, block.subarray(10_000))])
      }, true],
      ['a CONTINUATION flood', (() => {
        let id = 0
        return (raw: RawH2) => {
          const parts: Buffer[] = []
          if (id === 0) { id = raw.nextStream(); parts.push(frame(FRAME.HEADERS, END_STREAM, id, headerBlock(request(RELAY_PATH_PREFIX + 'x', token)))) }
          for (let i = 0; i < 20; i++) parts.push(frame(FRAME.CONTINUATION, 0, id, headerBlock([['x-c', 'a'.repeat(1000)]])))
          return Buffer.concat(parts)
        }
      })(), false],
      // nghttp2 answers with GOAWAY FRAME_SIZE_ERROR and stops reading, but Node keeps the
      // socket: the gateway's PING finds it dead.
      ['a HEADERS frame over the frame size', (raw) => frame(FRAME.HEADERS, END_HEADERS | END_STREAM, raw.nextStream(), headerBlock(request(RELAY_PATH_PREFIX + 'x', token, [['x-big', 'a'.repeat(17_000)]]))), false]
    ]
    for (const [name, build, ours] of attacks) {
      let fds0 = 0
      const before = await refusalCounts(world.publicUrl)
      let conns: RawH2[] = []
      const r = await world.underAttack(`header blocks: ${name}`, async (signal) => {
        fds0 = fds(world)
        conns = await flood(world, signal, build, { authenticate: token, max: 2000 })
      }, { durationMs: 3000, quietMs: 1500 })
      expectUnharmed(r)
      const c = conns[0]!
      expect(await c.waitClosed(PING_INTERVAL_MS + PING_TIMEOUT_MS + 2000), name).toBe(true)
      expect(c.closedByGateway, name).toBe(true)
      // Ours: closed at the refused-stream budget (its GOAWAY may be lost to a peer that had
      // not read it when the reset came). Otherwise nghttp2 ended it or the PING found it dead.
      if (ours) expect(refusalDiff(await refusalCounts(world.publicUrl), before).refused_streams, name).toBeGreaterThanOrEqual(1)
      console.log(`header blocks, ${name}: closed after ${c.closedAtMs?.toFixed(0)} ms, GOAWAY codes ${JSON.stringify(c.goaways)}`)
      await waitFor(() => fds(world) <= fds0 + 4, { timeoutMs: 5000, intervalMs: 50, description: `the socket released after ${name}` })
    }
  })

  it('a peer that never reads: the gateway closes it and releases the socket', async () => {
    let fds0 = 0
    let raw: RawH2 | undefined
    const r = await world.underAttack('streams never read', async (signal) => {
      fds0 = fds(world)
      raw = await RawH2.connect(world.supervisorUrl, { read: false })
      const token = world.token('hostile-deaf')
      const session = raw.nextStream()
      await raw.send(frame(FRAME.HEADERS, END_HEADERS, session, headerBlock(request(SESSION_PATH, token))))
      await raw.send(frame(FRAME.DATA, 0, session, Buffer.from('{"type":"hello"}\n')))
      // Every answer the gateway writes (responses, PING and SETTINGS ACKs) piles up unread.
      for (let i = 0; i < 5000 && !signal.aborted && !raw.closed; i++) {
        await raw.send(Buffer.concat([
          frame(FRAME.HEADERS, END_HEADERS | END_STREAM, raw.nextStream(), headerBlock(request(RELAY_PATH_PREFIX + 'x', token))),
          frame(FRAME.PING, 0, 0, Buffer.alloc(8))
        ]))
        if (i % 20 === 0) await breathe()
      }
      while (!signal.aborted && !raw.closed) await sleep(50)
    }, { durationMs: 4000 })
    expectUnharmed(r)
    // Read now: whatever is left, then the end the gateway wrote (or its reset).
    raw!.socket.resume()
    expect(await raw!.waitClosed(PING_INTERVAL_MS + PING_TIMEOUT_MS + 2000)).toBe(true)
    expect(raw!.closedByGateway).toBe(true)
    await waitFor(() => fds(world) <= fds0 + 4, { timeoutMs: 5000, intervalMs: 50, description: 'the socket released' })
  })
})
