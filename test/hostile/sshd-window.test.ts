import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import WebSocket from 'ws'
import { expectHonestUnharmed, startHostileWorld, type AttackReport, type HostileWorld } from './harness.js'
import { NO_RATE_LIMIT, refusalCounts, startHostileSandbox, wire, type HostileExec, type HostileSandbox } from './hostile-sshd.js'
import { sleep, waitFor } from '../helpers/wait.js'

// A sandbox SSH daemon that ignores the SSH window. ssh2's client only checked `window === 0`:
// a packet that crossed it drove the window negative and every later packet was buffered (with
// a reader slower than the daemon the gateway grew by 3 GiB in ~24 s; with 30,000-byte packets
// here, by ~60 MiB/s), and packets that met it exactly were dropped without a word (output
// lost). Now the first byte beyond the window the gateway granted ends that connection.

const FLOOD_LIMIT_BYTES = 2 * 1024 ** 3
const FLOOD_BOUND_MS = 15_000
// Packets that do not divide the window overshoot it; packets that do meet it exactly.
const PACKET_BYTES = { stdout: 30_000, stderr: 32 * 1024 } as const

// Sends as fast as the daemon's socket takes it, window or not, until the gateway hangs up;
// resolves with the bytes sent. It yields on every packet: a closed socket takes writes
// without ever asking to drain, and a loop that did not yield would stall this process.
async function flood (x: HostileExec, stream: 'stdout' | 'stderr', sent: number[]): Promise<void> {
  const until = performance.now() + FLOOD_BOUND_MS
  let bytes = 0
  const sock = x.conn.sock
  const packet = Buffer.alloc(PACKET_BYTES[stream], 0x61)
  while (bytes < FLOOD_LIMIT_BYTES && performance.now() < until && sock.writable && !sock.destroyed) {
    if (stream === 'stdout') x.conn.channelData(x.id, packet)
    else x.conn.raw(wire.msg(95, wire.u32(x.id), wire.u32(1), wire.str(packet)))
    bytes += packet.length
    if (sock.writableNeedDrain) await x.conn.drained()
    else await new Promise((resolve) => setImmediate(resolve))
  }
  sent.push(bytes)
}

describe('a sandbox SSH daemon that ignores the SSH window', () => {
  let world: HostileWorld
  let sb: HostileSandbox
  const sent: number[] = []
  beforeAll(async () => {
    // Retention small, so that what the gateway keeps of each flood's (accepted) output does
    // not hide what it would have buffered beyond the window.
    world = await startHostileWorld({ extraArgs: ['--retention-bytes', String(1024 * 1024), ...NO_RATE_LIMIT] })
    sb = await startHostileSandbox(world, 'window-flood', {
      onExec: (x) => {
        if (x.command.includes('hostile-flood-stdout')) return flood(x, 'stdout', sent)
        if (x.command.includes('hostile-flood-stderr')) return flood(x, 'stderr', sent)
        return 'honest'
      }
    })
  })
  afterAll(async () => {
    await sb?.stop()
    await world?.stop()
  })

  // The exec's only reader is a WebSocket that never reads: the gateway holds the window shut.
  async function floodWithPausedReader (stream: 'stdout' | 'stderr'): Promise<any> {
    const res = await fetch(`${world.publicUrl}/v1/sandboxes/${sb.id}/execs`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ command: ['echo', `hostile-flood-${stream}`] })
    })
    expect(res.status).toBe(201)
    const { id } = await res.json() as { id: string }
    const ws = new WebSocket(`${world.publicUrl.replace('http', 'ws')}/v1/execs/${id}/stream`, ['exec-gateway.v1.binary'])
    ws.on('error', () => undefined)
    ws.on('open', () => ws.pause())
    try {
      let rec: any
      await waitFor(async () => {
        rec = await (await fetch(`${world.publicUrl}/v1/execs/${id}`)).json()
        return rec.status !== 'running' && rec.status !== 'pending'
      }, { timeoutMs: FLOOD_BOUND_MS + 5000, intervalMs: 100, description: 'the flooded exec to end' })
      return rec
    } finally {
      ws.terminate()
    }
  }

  // Each flood's legitimate part (what the paused reader's sockets absorb before the gateway
  // holds the window shut, ~9 MiB) costs what any honest exec writing as much costs, and on a
  // 2-core machine that shows in the honest sandbox's p99. The control measures exactly that
  // cost; the floods may not cost more.
  let control: AttackReport
  it('control: honest 9 MiB outputs on the same sandbox, at the same pace', async () => {
    control = await world.underAttack('window: honest 9 MiB outputs (control)', async (signal) => {
      while (!signal.aborted) {
        const e = await sb.exec(['head', '-c', String(9 * 1024 ** 2), '/dev/zero'])
        expect(e.status).toBe(200)
        expect(e.body).toMatchObject({ exitCode: 0, stdoutBytes: 9 * 1024 ** 2 })
        await sleep(200)
      }
    }, { durationMs: 8000 })
    expect(control.underAttack.failures).toEqual([])
  })

  for (const stream of ['stdout', 'stderr'] as const) {
    it(`${stream} in ${PACKET_BYTES[stream]}-byte packets: the first beyond the window fails the connection (ssh_failed, window_overrun); memory stays flat`, async () => {
      const before = await refusalCounts(world.publicUrl)
      const records: any[] = []
      sent.length = 0
      const r = await world.underAttack(`window flood (${stream}), paused reader`, async (signal) => {
        while (!signal.aborted) {
          records.push(await floodWithPausedReader(stream))
          await sleep(200)
        }
      }, { durationMs: 8000 })
      expectHonestUnharmed(r, { p99Factor: 2 * Math.max(1, control.underAttack.p99Ms / r.quiet.p99Ms), p99SlackMs: 250 })
      expect(records.length).toBeGreaterThan(0)
      for (const rec of records) {
        expect(rec).toMatchObject({ status: 'failed', exitCode: null, error: { code: 'ssh_failed' } })
        expect(rec.error.detail).toMatch(new RegExp(`bytes of ${stream} with \\d+ bytes left in the SSH window the gateway granted`))
        // What the paused reader's sockets held, plus one window (2 MiB): then the cut.
        expect(rec[`${stream}Bytes`]).toBeLessThan(24 * 1024 ** 2)
      }
      const after = await refusalCounts(world.publicUrl)
      expect(after.window_overrun! - (before.window_overrun ?? 0)).toBe(records.length)
      // Unguarded, this grew by gigabytes (3 GiB in ~24 s). Output at line rate grows the heap
      // by itself (the honest control did), so the bound is the control's growth and a margin.
      const controlGrowth = control.peakRssBytes - control.baselineRssBytes
      expect(r.peakRssBytes - r.baselineRssBytes).toBeLessThan(Math.max(controlGrowth, 64 * 1024 ** 2) + 64 * 1024 ** 2)
      console.log(`window flood (${stream}): ${records.length} floods, accepted ${records.map((x) => ((x[`${stream}Bytes`] as number) / 2 ** 20).toFixed(1)).join('/')} MiB, daemon sent ${sent.map((b) => (b / 2 ** 20).toFixed(1)).join('/')} MiB, RSS +${((r.peakRssBytes - r.baselineRssBytes) / 2 ** 20).toFixed(0)} MiB`)
    })
  }

  it('an honest exec on the same sandbox afterwards still runs exactly', async () => {
    const e = await sb.exec(['sh', '-c', 'printf out; printf err >&2; exit 7'])
    expect(e.status).toBe(200)
    expect(e.body).toMatchObject({ stdout: 'out', stderr: 'err', exitCode: 7 })
  })
})
