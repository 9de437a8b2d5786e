import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import http2, { type ClientHttp2Session, type ClientHttp2Stream } from 'node:http2'
import { expectHonestUnharmed, refusalCounts, refusalDiff, startHostileWorld, type AttackReport, type HostileWorld } from './harness.js'
import { sleep, waitFor } from '../helpers/wait.js'
import { startFakeSupervisor } from '../helpers/fake-supervisor.js'
import { SESSION_PATH } from '../../src/relay/protocol.js'

// A hostile sandbox on its session stream: its supervisor holds the sandbox's valid token and
// sends whatever it likes. Each attack runs beside the honest sandbox's steady exact-output
// execs on a gateway child process, is bounded in time and count, and asserts the gateway
// lives, the honest execs all succeed unslowed, and the hostile stream or connection was ended
// where it should be (seen from the attacker's side and in the gateway's refusal counters).

const MiB = 2 ** 20
// The honest sandbox's bounds under attack: every exec exact, RSS under 300 MiB, p99 within
// 3× the quiet run or 500 ms above it, and the gateway's own CPU under 80 % of one core. The
// attacker, the gateway, the honest supervisor and the test's HTTP clients share two cores with
// whatever else the machine runs; profiles of the gateway during the p99 outliers show it idle,
// so the p99 bound is loose and the CPU bound is the one the gateway answers for. A gateway
// that stalls for seconds (as before: 30 s, 12.9 s) fails either.
const UNHARMED = { maxRssBytes: 300 * MiB, p99Factor: 3, p99SlackMs: 500 }
function expectUnharmed (r: AttackReport): void {
  expectHonestUnharmed(r, UNHARMED)
  expect(r.cpuSeconds, `${r.attack}: gateway CPU ${r.cpuSeconds} s in ${r.wallSeconds} s`).toBeLessThanOrEqual(0.8 * r.wallSeconds)
}

interface Conn {
  client: ClientHttp2Session
  goaways: number[]
  closed: Promise<void>
  isClosed: () => boolean
}

function connect (world: HostileWorld): Conn {
  const client = http2.connect(world.supervisorUrl, { settings: { initialWindowSize: 1 << 20 } })
  const goaways: number[] = []
  let closed = false
  client.on('error', () => {})
  client.on('goaway', (code) => goaways.push(code))
  // Closed for the attacker once a GOAWAY came or the session is gone: no new stream fits.
  return { client, goaways, closed: new Promise((resolve) => client.once('close', () => { closed = true; resolve() })), isClosed: () => closed || client.closed || client.destroyed || goaways.length > 0 }
}

interface Session { stream: ClientHttp2Stream, status: Promise<number>, closed: Promise<void>, isClosed: () => boolean }

// Throws only when the connection is already gone: callers check conn.isClosed() first.
function openSession (conn: Conn, token: string): Session {
  const stream = conn.client.request({ ':method': 'POST', ':path': SESSION_PATH, authorization: `Bearer ${token}` }, { endStream: false })
  let closed = false
  stream.on('error', () => {})
  stream.resume()
  return {
    stream,
    status: new Promise((resolve) => {
      stream.once('response', (h) => resolve(Number(h[':status'])))
      stream.once('close', () => resolve(0))
    }),
    closed: new Promise((resolve) => stream.once('close', () => { closed = true; resolve() })),
    isClosed: () => closed
  }
}

// The attacker shares the test process with the honest load's HTTP clients: it yields often,
// so what the honest execs measure is the gateway, not a blocked test event loop.
const breathe = async (): Promise<void> => { await new Promise((resolve) => setImmediate(resolve)) }

const within = async <T>(p: Promise<T>, ms: number, what: string): Promise<T> =>
  await Promise.race([p, sleep(ms).then(() => { throw new Error(`${what} did not happen within ${ms} ms`) })])

// The lines that crashed the gateway before the decoder (4 of these 14 did), and the values a
// careless String() or property read trips on.
const CRASH_LINES = [
  'null', 'true', '0', '"x"', '[]', '{}', '{"type":null}', '{"type":{"toString":{}}}',
  '{"type":"relay_failed","relayId":"r1","reason":{"toString":{}}}',
  '{"type":"relay_failed","relayId":{"toString":{}},"reason":"x"}',
  '{"type":"relay_failed","relayId":"r1","reason":null}',
  '{"type":"hello","instanceId":{"toString":{}}}',
  '{"type":"hello","sshUser":{"valueOf":{},"toString":{}},"sshHostKey":[1]}',
  '{"type":"hello","instanceId":"' + 'i'.repeat(60_000) + '"}'
]

describe('hostile session streams (default budgets)', () => {
  let world: HostileWorld
  beforeAll(async () => { world = await startHostileWorld({ extraArgs: ['--relay-open-timeout-ms', '2000'] }) })
  afterAll(async () => { await world?.stop() })

  it('the lines that used to crash the gateway are refused one by one; the process lives', async () => {
    const before = await refusalCounts(world.publicUrl)
    let sent = 0
    const r = await world.underAttack('crash lines on the session stream', async (signal) => {
      const conn = connect(world)
      try {
        for (const line of CRASH_LINES) {
          if (signal.aborted) break
          // Each on a fresh session, before any hello: no hello was needed to crash it.
          const s = openSession(conn, world.token('hostile-crash'))
          expect(await within(s.status, 5000, 'the session response')).toBe(200)
          s.stream.write(line + '\n')
          sent++
          await sleep(50)
          s.stream.close()
          await within(s.closed, 5000, 'the session close')
        }
      } finally { conn.client.destroy() }
    }, { durationMs: 3000, quietMs: 2000 })
    expectUnharmed(r)
    expect(sent).toBe(CRASH_LINES.length)
    const d = refusalDiff(await refusalCounts(world.publicUrl), before)
    expect(d.bad_message).toBe(CRASH_LINES.length)
    expect(d.handler_error).toBeUndefined()
  })

  it('never-ending lines on every stream it can open: each session ends at 64 KiB, RSS stays bounded', async () => {
    const before = await refusalCounts(world.publicUrl)
    let accepted = 0
    let connections = 0
    let closedByGateway = 0
    const calm: number[] = []
    const r = await world.underAttack('never-ending 0xFF lines over many streams', async (signal) => {
      const chunk = Buffer.alloc(64 * 1024, 0xff)
      while (!signal.aborted) {
        const conn = connect(world)
        connections++
        // First the sessions the sandbox may hold, each sent a line that never ends ...
        const held: Session[] = []
        for (let i = 0; i < 4 && !conn.isClosed(); i++) {
          const s = openSession(conn, world.token('hostile-lines'))
          held.push(s)
          if (await within(s.status, 5000, 'the session response') !== 200) continue
          accepted++
          s.stream.write(chunk)
          s.stream.write(chunk)
        }
        await Promise.race([Promise.all(held.map(async (s) => await s.closed)), sleep(3000)])
        // ... then far more than it may hold, each sent the same: the rest are refused, and
        // the refusals close the connection once the budget is spent.
        for (let i = 0; i < 600; i++) {
          if (i % 25 === 0) await breathe()
          if (conn.isClosed()) break
          const s = openSession(conn, world.token('hostile-lines'))
          s.stream.write(chunk)
          void s.status.then((st) => { if (st === 200) accepted++ })
        }
        await Promise.race([conn.closed, sleep(3000)])
        if (conn.isClosed()) closedByGateway++
        calm.push(...conn.goaways)
        conn.client.destroy()
      }
    }, { durationMs: 6000 })
    expectUnharmed(r)
    const d = refusalDiff(await refusalCounts(world.publicUrl), before)
    expect(d.line_too_long).toBeGreaterThanOrEqual(1)
    expect(d.session_streams).toBeGreaterThan(100)
    expect(d.refused_streams).toBeGreaterThanOrEqual(1)
    expect(closedByGateway).toBeGreaterThanOrEqual(1)
    expect(calm).toContain(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM)
    // Sessions that got a 200 were ended for their line; a connection the sandbox could not
    // have (its four are still closing) was refused outright.
    expect(d.line_too_long).toBeGreaterThanOrEqual(4)
    expect(d.line_too_long).toBeLessThanOrEqual(accepted)
    console.log(`never-ending lines: ${connections} connections, ${accepted} sessions accepted, peak RSS ${(r.peakRssBytes / MiB).toFixed(0)} MiB (baseline ${(r.baselineRssBytes / MiB).toFixed(0)} MiB), refusals ${JSON.stringify(d)}`)
  })

  it('a flood of session streams: never more than 4 at once for the sandbox, and the connection is closed', async () => {
    const before = await refusalCounts(world.publicUrl)
    let maxOpen = 0
    let closedByGateway = 0
    const r = await world.underAttack('session stream flood', async (signal) => {
      while (!signal.aborted) {
        const conn = connect(world)
        let open = 0
        for (let i = 0; i < 2000; i++) {
          if (i % 25 === 0) await breathe()
          if (conn.isClosed()) break
          const s = openSession(conn, world.token('hostile-sessions'))
          void s.status.then((st) => {
            if (st !== 200) return
            open++
            maxOpen = Math.max(maxOpen, open)
            void s.closed.then(() => { open-- })
          })
          s.stream.write('{"type":"hello"}\n')
        }
        await Promise.race([conn.closed, sleep(3000)])
        if (conn.isClosed() && conn.goaways.includes(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM)) closedByGateway++
        conn.client.destroy()
        await sleep(20)
      }
    }, { durationMs: 5000 })
    expectUnharmed(r)
    const d = refusalDiff(await refusalCounts(world.publicUrl), before)
    expect(maxOpen).toBeGreaterThanOrEqual(1)
    expect(maxOpen).toBeLessThanOrEqual(4)
    expect(d.session_streams).toBeGreaterThan(200)
    expect(closedByGateway).toBeGreaterThanOrEqual(1)
  })

  it('8 MiB of bad lines: the gateway\'s log output about the sandbox stays a few lines a second', async () => {
    const before = await refusalCounts(world.publicUrl)
    let hostileLogLines = 0
    const countHostile = (c: Buffer): void => { hostileLogLines += c.toString().split('"sandboxId":"hostile-flood"').length - 1 }
    world.gateway.proc.stdout!.on('data', countHostile)
    world.gateway.proc.stderr!.on('data', countHostile)
    let bytes = 0
    let sessions = 0
    const lines0 = world.logLines()
    const r = await world.underAttack('log flood: 8 MiB of "x\\n"', async (signal) => {
      const chunk = Buffer.from('x\n'.repeat(32 * 1024))
      const conn = connect(world)
      try {
        while (!signal.aborted && bytes < 8 * MiB && !conn.isClosed()) {
          const s = openSession(conn, world.token('hostile-flood'))
          sessions++
          if (await within(s.status, 5000, 'the session response') !== 200) { await sleep(50); continue }
          s.stream.write(chunk)
          bytes += chunk.length
          // The gateway ends the session at the message rate.
          await within(s.closed, 5000, 'the gateway ending a flooding session')
        }
      } finally { conn.client.destroy() }
    }, { durationMs: 6000 })
    world.gateway.proc.stdout!.off('data', countHostile)
    world.gateway.proc.stderr!.off('data', countHostile)
    expectUnharmed(r)
    const d = refusalDiff(await refusalCounts(world.publicUrl), before)
    expect(bytes).toBeGreaterThanOrEqual(4 * MiB)
    expect(d.message_rate).toBeGreaterThanOrEqual(sessions - 1)
    // 60 lines a minute per sandbox, plus the summaries of what was not logged.
    expect(hostileLogLines).toBeLessThanOrEqual(75)
    console.log(`log flood: ${(bytes / MiB).toFixed(1)} MiB in ${sessions} sessions → ${hostileLogLines} log lines about the sandbox; ${world.logLines() - lines0} gateway log lines in all (honest execs included), ${r.logBytes} bytes`)
  })

  it('sandbox strings stay bounded: a relay_failed reason becomes at most 1024 characters of error detail', async () => {
    const execFor = async (reason: string): Promise<{ status: number, body: any }> => {
      const fake = await startFakeSupervisor({ supervisorUrl: world.supervisorUrl, token: world.token('hostile-reason'), onRelay: 'fail', failReason: reason })
      try {
        const res = await fetch(`${world.publicUrl}/v1/sandboxes/hostile-reason/execs?wait=true`, {
          method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ command: ['true'] }), signal: AbortSignal.timeout(15_000)
        })
        return { status: res.status, body: await res.json() }
      } finally { await fake.close() }
    }
    const exact = await execFor('r'.repeat(1024))
    expect(exact.status).toBe(503)
    expect(exact.body.code).toBe('relay_unavailable')
    expect(exact.body.detail).toContain('r'.repeat(1024))
    expect(exact.body.detail.length).toBeLessThan(1200)
    // Over the bound, the message is refused whole: the exec ends at the relay-open bound with
    // the gateway's own words, none of the sandbox's.
    const huge = await execFor('R'.repeat(50_000))
    expect(huge.status).toBe(504)
    expect(huge.body.code).toBe('relay_open_timeout')
    expect(huge.body.detail).not.toContain('RRRR')
    world.assertAlive()
    expect((await world.honestExec()).ok).toBe(true)
  })
})

describe('hostile session streams (every line looked at)', () => {
  let world: HostileWorld
  beforeAll(async () => { world = await startHostileWorld({ extraArgs: ['--session-messages-per-second', '100000'] }) })
  afterAll(async () => { await world?.stop() })

  it('every JSON value in every field of every message, before and after hello', async () => {
    const values = ['null', 'true', 'false', '0', '-1', '1e308', '""', '"x"', JSON.stringify('a'.repeat(20_000)), '[]', '{}', '{"toString":{}}', '{"valueOf":{},"toString":{}}', '[[[[[[[[]]]]]]]]']
    const messages: Record<string, Record<string, string>> = {
      hello: { type: '"hello"', instanceId: '"i-1"', sshHostKey: '"ssh-ed25519 AAAA"', sshUser: '"runner"' },
      heartbeat: { type: '"heartbeat"' },
      relay_failed: { type: '"relay_failed"', relayId: '"r-1"', reason: '"no"' }
    }
    const lines: string[] = [...values]
    for (const base of Object.values(messages)) {
      for (const field of Object.keys(base)) {
        for (const v of values) lines.push('{' + Object.entries({ ...base, [field]: v }).map(([k, x]) => `"${k}":${x}`).join(',') + '}')
      }
    }
    const before = await refusalCounts(world.publicUrl)
    let rounds = 0
    const r = await world.underAttack('every JSON value in every field', async (signal) => {
      const conn = connect(world)
      try {
        while (!signal.aborted && rounds < 4) {
          for (const withHello of [false, true]) {
            const s = openSession(conn, world.token('hostile-values'))
            expect(await within(s.status, 5000, 'the session response')).toBe(200)
            if (withHello) s.stream.write('{"type":"hello","instanceId":"hostile-values-1"}\n')
            s.stream.write(lines.join('\n') + '\n')
            await sleep(300)
            // Bad lines are skipped, not fatal.
            expect(s.isClosed()).toBe(false)
            s.stream.close()
            await within(s.closed, 5000, 'the session close')
          }
          rounds++
        }
      } finally { conn.client.destroy() }
    }, { durationMs: 4000, quietMs: 2000 })
    expectUnharmed(r)
    expect(rounds).toBeGreaterThanOrEqual(1)
    const d = refusalDiff(await refusalCounts(world.publicUrl), before)
    expect(d.bad_message).toBeGreaterThan(100 * rounds)
    expect(d.handler_error).toBeUndefined()
    await waitFor(async () => (await world.honestExec()).ok, { timeoutMs: 5000 })
  })
})
