import { describe, it, expect, beforeAll, afterAll } from 'vitest'
import { createHash, randomBytes } from 'node:crypto'
import WebSocket from 'ws'
import type { TestGateway } from '../helpers/gateway.js'
import { startSandbox, type Daemon, type TestSandbox } from '../helpers/sandbox.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { sandboxAccount } from '../helpers/openssh.js'
import { api, execStart, execWait } from '../helpers/api.js'
import { sleep, waitFor } from '../helpers/wait.js'
import { PENDING_STDIN_HIGH_WATER, STDIN_BUFFER_MAX_BYTES } from '../../src/execs/stdin-flow.js'
import { WS_MAX_PAYLOAD_BYTES } from '../../src/http/public-app.js'

// Stdin has backpressure and bounds: a client that sends stdin faster than the command reads
// it is not read any faster than the command reads (the gateway's memory does not grow by the
// flood), every byte arrives exactly once, and what waits in the gateway is capped.

const MiB = 1024 * 1024
const FRAME = 64 * 1024
// Frames the client lets its own socket hold before it waits: it floods as fast as the
// gateway reads, without growing this test process (which also runs the gateway) by the flood.
const CLIENT_OUTSTANDING = 64

type Framing = 'binary' | 'json'

interface Flood {
  // Bytes of stdin the client's socket has handed to the kernel, i.e. that the gateway's side
  // of the connection had room for.
  readonly flushed: number
  // Resolves once every frame is handed to ws (not necessarily flushed).
  readonly sent: Promise<void>
  readonly digest: string
  readonly bytes: number
}

function openSocket (g: TestGateway, execId: string, protocols: string[] = []): WebSocket {
  const ws = new WebSocket(`${g.publicUrl.replace(/^http/, 'ws')}/v1/execs/${execId}/stream`, protocols)
  ws.on('error', () => { /* reported through 'close' */ })
  return ws
}

async function opened (ws: WebSocket): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve())
    ws.once('close', (code) => reject(new Error(`socket closed (${code}) before it opened`)))
  })
}

// Resolves with the close code and reason, or rejects after ms: no test may wait forever.
async function closed (ws: WebSocket, ms: number): Promise<{ code: number, reason: string }> {
  if (ws.readyState === ws.CLOSED) throw new Error('already closed; listen before it can close')
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([
      new Promise<{ code: number, reason: string }>((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() }))),
      new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`socket not closed within ${ms} ms`)), ms) })
    ])
  } finally {
    clearTimeout(timer)
  }
}

// The stdout of an exec, as it arrives on this socket in either framing.
function collectStdout (ws: WebSocket, framing: Framing): { stdout: () => string, final: () => any } {
  const chunks: Buffer[] = []
  let final: any
  ws.on('message', (data: Buffer, isBinary) => {
    if (isBinary) { if (data[0] === 1) chunks.push(Buffer.from(data.subarray(1))); return }
    const ev = JSON.parse(data.toString())
    if (ev.type === 'stdout' && framing === 'json') chunks.push(Buffer.from(ev.data, 'utf8'))
    if (ev.type === 'exit' || ev.type === 'error') final = ev
  })
  return { stdout: () => Buffer.concat(chunks).toString(), final: () => final }
}

// Stdin in 64 KiB frames, each one unlike the others (so a lost, doubled or reordered frame
// changes the digest); JSON frames carry multi-byte characters so bytes, not characters, count.
function stdinFrame (framing: Framing, i: number, block: Buffer): { frame: Buffer | string, bytes: Buffer } {
  if (framing === 'binary') {
    const frame = Buffer.allocUnsafe(1 + block.length)
    frame[0] = 0
    block.copy(frame, 1)
    frame.writeUInt32BE(i, 1)
    return { frame, bytes: frame.subarray(1) }
  }
  const text = `${i}:é€ ${block.toString('base64').slice(0, FRAME - 24)}`
  return { frame: JSON.stringify({ type: 'stdin', data: text }), bytes: Buffer.from(text, 'utf8') }
}

function flood (ws: WebSocket, framing: Framing, total: number): Flood {
  const block = randomBytes(FRAME)
  const hash = createHash('sha256')
  let flushed = 0
  let bytes = 0
  let outstanding = 0
  let wake: (() => void) | undefined
  const sent = (async () => {
    for (let i = 0; bytes < total; i++) {
      // eslint-disable-next-line no-unmodified-loop-condition -- send callbacks lower it while the loop awaits
      while (outstanding >= CLIENT_OUTSTANDING) {
        if (ws.readyState !== ws.OPEN) throw new Error(`socket closed mid-flood after ${bytes} bytes`)
        // Woken by a send callback, or polled: ws may close without calling them all.
        let poll: NodeJS.Timeout | undefined
        await new Promise<void>((resolve) => { wake = resolve; poll = setTimeout(resolve, 50) })
        clearTimeout(poll)
      }
      if (ws.readyState !== ws.OPEN) throw new Error(`socket closed mid-flood after ${bytes} bytes`)
      const f = stdinFrame(framing, i, block)
      hash.update(f.bytes)
      bytes += f.bytes.length
      outstanding++
      ws.send(f.frame, { binary: framing === 'binary' }, () => { outstanding--; flushed += f.bytes.length; wake?.() })
    }
  })()
  sent.catch(() => { /* the test awaits it where it matters */ })
  return {
    get flushed () { return flushed },
    sent,
    get digest () { return hash.copy().digest('hex') },
    get bytes () { return bytes }
  }
}

// Binary sockets on one exec, all created before anything is awaited, so that the caller's
// finally can terminate every one of them.
function binarySockets (g: TestGateway, execId: string, count: number): WebSocket[] {
  return Array.from({ length: count }, () => openSocket(g, execId, ['exec-gateway.v1.binary']))
}

// Once every socket is open, a binary flood of `each` bytes on each, all started together. No
// socket can close before the caller's next line runs (no I/O between), so it may watch for that.
async function floodWhenOpen (sockets: WebSocket[], each: number): Promise<Flood[]> {
  await Promise.all(sockets.map(opened))
  return sockets.map((ws) => flood(ws, 'binary', each))
}

// What this process (the gateway and the client) holds after a full collection: buffered
// stdin would show here, the garbage a flood leaves behind would not (RSS is too noisy).
// Array buffers are released after the collection that finds them dead: collect twice.
async function liveBytes (): Promise<number> {
  const gc = global.gc
  if (gc === undefined) throw new Error('run with --expose-gc (vitest.config.ts sets it)')
  gc()
  await new Promise<void>((resolve) => setImmediate(resolve))
  gc()
  const m = process.memoryUsage()
  return m.heapUsed + m.arrayBuffers
}

async function waitRunning (g: TestGateway, id: string): Promise<void> {
  await waitFor(() => g.gw.execs.get(id)?.status === 'running', { timeoutMs: 10_000, intervalMs: 10 })
}

describe.each(['embedded', 'openssh'] as const)('stdin flow control through the %s daemon', (daemon: Daemon) => {
  let sb: TestSandbox
  let g: TestGateway
  const sandbox = `stdin-${daemon}`
  const extraSupervisors: SupervisorProcess[] = []

  beforeAll(async () => {
    // Long enough for the pending-exec test to hold an exec waiting for its sandbox.
    sb = await startSandbox(daemon, sandbox, { sessionWaitMs: 30_000 })
    g = sb.g
  })

  afterAll(async () => {
    for (const s of extraSupervisors) await s.stop()
    await sb?.close()
  })

  it.each(['binary', 'json'] as const)('64 MiB of %s stdin frames into a command that reads only after 3 s: the client is held back, and every byte arrives', async (framing) => {
    const total = 64 * MiB
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'sleep 3; exec sha256sum'], interactive: true, timeoutSeconds: 60 })
    await waitRunning(g, id)
    const startedAt = Date.now()
    const ws = openSocket(g, id, framing === 'binary' ? ['exec-gateway.v1.binary'] : [])
    const out = collectStdout(ws, framing)
    await opened(ws)
    const end = closed(ws, 50_000)
    const liveBefore = await liveBytes()
    try {
      const f = flood(ws, framing, total)
      // While the command sleeps nothing reads its stdin: the gateway takes the channel's
      // buffer and the SSH window, the kernel its socket buffers, and then stops reading.
      await sleep(Math.max(0, startedAt + 2500 - Date.now()))
      expect(f.flushed, 'stdin the client could hand over while the command slept').toBeLessThan(total / 2)
      expect(await liveBytes() - liveBefore, 'memory the gateway (and the client) hold while the command sleeps').toBeLessThan(total / 2)
      expect(g.gw.execs.get(id)!.status).toBe('running')
      await f.sent
      ws.send(JSON.stringify({ type: 'eof' }))
      const { code } = await end
      expect(code).toBe(1000)
      expect(out.final()).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
      expect(f.bytes).toBeGreaterThanOrEqual(total - FRAME)
      expect(out.stdout()).toBe(`${f.digest}  -\n`)
    } finally {
      ws.terminate()
    }
  }, 60_000)

  it('two sockets flooding one exec are each held back while its channel is congested, and the command gets every byte', async () => {
    const each = 32 * MiB
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', `sleep 3; head -c ${2 * each} | wc -c`], interactive: true, timeoutSeconds: 60 })
    await waitRunning(g, id)
    const startedAt = Date.now()
    const [a, b] = binarySockets(g, id, 2)
    const outA = collectStdout(a, 'binary')
    try {
      const [fa, fb] = await floodWhenOpen([a, b], each)
      const endA = closed(a, 50_000)
      const endB = closed(b, 50_000)
      await sleep(Math.max(0, startedAt + 2500 - Date.now()))
      expect(fa.flushed, 'socket a while the command slept').toBeLessThan(each * 3 / 4)
      expect(fb.flushed, 'socket b while the command slept').toBeLessThan(each * 3 / 4)
      await Promise.all([fa.sent, fb.sent])
      // No EOF: one socket's EOF could overtake the other socket's last frames. head stops
      // after exactly the bytes both sent; a lost byte shows as a timeout (exit 124).
      expect((await endA).code).toBe(1000)
      expect((await endB).code).toBe(1000)
      expect(outA.final()).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
      expect(Number(outA.stdout().trim())).toBe(fa.bytes + fb.bytes)
    } finally {
      a.terminate()
      b.terminate()
    }
  }, 60_000)

  it('a socket held back when the exec ends still closes at once (1000 after exit); one that leaves while held back only detaches', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'sleep 30'], interactive: true, timeoutSeconds: 60 })
    await waitRunning(g, id)
    const [leaving, held] = binarySockets(g, id, 2)
    const out = collectStdout(held, 'binary')
    try {
      const [fl, fh] = await floodWhenOpen([leaving, held], 32 * MiB)
      const end = closed(held, 10_000)
      await sleep(1500)
      expect(fl.flushed).toBeLessThan(24 * MiB)
      expect(fh.flushed).toBeLessThan(24 * MiB)
      leaving.terminate()
      await sleep(200)
      expect(g.gw.execs.get(id)!.status).toBe('running')
      // A held-back socket does not read: unless the gateway resumes it to close, the client's
      // close frame goes unread and ws holds the connection for its 30 s close timeout.
      const t0 = Date.now()
      expect((await api(g.publicUrl, 'POST', `/v1/execs/${id}/signal`, { signal: 'KILL' })).status).toBe(202)
      expect((await end).code).toBe(1000)
      expect(Date.now() - t0).toBeLessThan(5000)
      expect(out.final()).toEqual({ type: 'exit', exitCode: null, signal: 'KILL', timedOut: false })
    } finally {
      leaving.terminate()
      held.terminate()
    }
  }, 60_000)

  it('stdin sent before the exec starts: a flooding socket is paused, not dropped; sockets past the cap get 1008, a frame over the limit 1009; the gateway stays healthy', async () => {
    // Without its supervisor the sandbox cannot start the exec: it stays pending.
    await sb.sup.stop()
    await g.waitDisconnected(sandbox)
    const id = await execStart(g.publicUrl, sandbox, { command: ['wc', '-c'], interactive: true, timeoutSeconds: 60 })
    expect(g.gw.execs.get(id)!.status).toBe('pending')
    const a = openSocket(g, id, ['exec-gateway.v1.binary'])
    const outA = collectStdout(a, 'binary')
    // Each sends one JSON stdin frame: the queue is over the pause mark (a saw to that), so each
    // frame is taken and its socket paused, until the queue holds the cap beyond the mark.
    const others = [0, 1, 2, 3].map(() => openSocket(g, id))
    const big = openSocket(g, id)
    const sockets = [a, ...others, big]
    try {
      await Promise.all(sockets.map(opened))
      const endA = closed(a, 50_000)
      const ends = others.map((ws) => closed(ws, 50_000))
      const endBig = closed(big, 10_000)
      const total = 32 * MiB
      const fa = flood(a, 'binary', total)
      await sleep(1000)
      expect(fa.flushed, 'stdin the client could hand over while the exec was pending').toBeLessThan(total * 3 / 4)
      expect(a.readyState).toBe(a.OPEN)

      const frame = 700 * 1024
      // a holds 256 KiB and some; three frames keep the queue under the cap beyond the mark, so
      // the fourth finds it over.
      expect(PENDING_STDIN_HIGH_WATER + 3 * frame).toBeGreaterThan(PENDING_STDIN_HIGH_WATER + STDIN_BUFFER_MAX_BYTES)
      expect(PENDING_STDIN_HIGH_WATER + 100 * 1024 + 2 * frame).toBeLessThan(PENDING_STDIN_HIGH_WATER + STDIN_BUFFER_MAX_BYTES)
      for (const ws of others) {
        ws.send(JSON.stringify({ type: 'stdin', data: 'x'.repeat(frame) }))
        await sleep(300)
      }
      const refused = await ends[3]!
      expect(refused.code).toBe(1008)
      expect(refused.reason).toContain(String(STDIN_BUFFER_MAX_BYTES))
      for (const ws of others.slice(0, 3)) expect(ws.readyState).toBe(ws.OPEN)
      // A single frame over the limit never reaches the queue: ws refuses it as too big.
      big.send(Buffer.alloc(WS_MAX_PAYLOAD_BYTES + 1, 0))
      expect((await endBig).code).toBe(1009)
      expect((await api(g.publicUrl, 'GET', '/healthz')).status).toBe(200)
      expect(g.gw.execs.get(id)!.status).toBe('pending')
      expect(a.readyState).toBe(a.OPEN)

      // A pending exec that ends (here: deleted) closes a socket held back on it at once, not
      // after ws's 30 s close timeout: nothing drains, the close itself resumes the socket.
      const doomed = await execStart(g.publicUrl, sandbox, { command: ['cat'], interactive: true })
      const d = openSocket(g, doomed, ['exec-gateway.v1.binary'])
      try {
        const [fd] = await floodWhenOpen([d], 32 * MiB)
        const endD = closed(d, 10_000)
        await sleep(500)
        expect(fd.flushed).toBeLessThan(24 * MiB)
        const t0 = Date.now()
        expect((await api(g.publicUrl, 'DELETE', `/v1/execs/${doomed}`)).status).toBe(204)
        expect((await endD).code).toBe(1011)
        expect(Date.now() - t0).toBeLessThan(5000)
      } finally {
        d.terminate()
      }

      const sup = startSupervisorProcess({
        gatewayUrl: g.supervisorUrl,
        sandboxId: sandbox,
        token: g.token(sandbox),
        ...(sb.sshd === undefined ? {} : { sshTarget: `${sb.sshd.host}:${sb.sshd.port}`, sshUser: sandboxAccount() })
      })
      extraSupervisors.push(sup)
      await g.waitConnected(sandbox)
      await fa.sent
      // a's frames are in order on its socket, and the others' frames were queued before the
      // start: after a's EOF, stdin is complete.
      a.send(JSON.stringify({ type: 'eof' }))
      expect((await endA).code).toBe(1000)
      for (const end of ends.slice(0, 3)) expect((await end).code).toBe(1000)
      expect(outA.final()).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
      // Every byte of a's flood and of the three taken frames, none of the refused one.
      expect(Number(outA.stdout().trim())).toBe(fa.bytes + 3 * frame)
      const other = await execWait(g.publicUrl, sandbox, { command: ['echo', 'still fine'] })
      expect(other.body).toMatchObject({ exitCode: 0, stdout: 'still fine\n' })
    } finally {
      for (const ws of sockets) ws.terminate()
    }
  }, 60_000)
})
