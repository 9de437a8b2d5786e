import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { readFileSync } from 'node:fs'
import WebSocket from 'ws'
import { expectHonestUnharmed, startHostileWorld, type AttackReport, type HostileWorld } from './harness.js'
import { NO_RATE_LIMIT, startHostileSandbox, wire, type HostileSandbox } from './hostile-sshd.js'
import { H2_STREAM_WINDOW } from '../../src/relay/protocol.js'
import { sleep, waitFor } from '../helpers/wait.js'

// A sandbox SSH daemon that grants a huge SSH window for stdin and then never reads its relay.
// ssh2 writes whatever the window allows straight into the relay stream, so the channel never
// looks full and stdin from a WebSocket client piled up in the gateway. Now a relay holding
// 2 MiB it has not delivered pauses stdin writers as a full channel does: the client's own
// buffer grows instead (its bufferedAmount), and the gateway's memory stays flat.

const FRAME = Buffer.concat([Buffer.from([0]), Buffer.alloc(256 * 1024, 0x69)])
const SEND_MAX_BYTES = 256 * 1024 ** 2
const CLIENT_BUFFER_ENOUGH = 16 * 1024 ** 2
const CONTROL_BYTES = 40 * 1024 ** 2
// Long enough for the client's buffer to fill while the honest load runs beside it: locally it
// held 13 MiB after the default 6 s window, in CI 6 MiB, so within the default window the
// assertion below measured the machine's speed, not the gateway's hold.
const WINDOW_MS = 20_000

// The most the kernel lets one TCP socket buffer in that direction (the third field).
function tcpBufferMax (name: 'tcp_rmem' | 'tcp_wmem'): number {
  return Number(readFileSync(`/proc/sys/net/ipv4/${name}`, 'utf8').trim().split(/\s+/)[2])
}

describe('a sandbox SSH daemon that opens the stdin window wide and never reads', () => {
  let world: HostileWorld
  let sb: HostileSandbox
  beforeAll(async () => {
    world = await startHostileWorld({ extraArgs: NO_RATE_LIMIT })
    sb = await startHostileSandbox(world, 'stdin-sink', {
      onExec: (x) => {
        if (!x.command.includes('hostile-stdin-sink')) return 'honest'
        x.conn.raw(wire.msg(93, wire.u32(x.id), wire.u32(0xffff_ffff - 4 * 1024 ** 2)))
        // Nothing more is read from this connection: the supervisor's socket to it fills, and
        // the relay stops moving.
        setImmediate(() => x.conn.sock.pause())
      }
    })
  })
  afterAll(async () => {
    await sb?.stop()
    await world?.stop()
  })

  // Feeds stdin to an interactive exec over a binary WebSocket as fast as the gateway takes it,
  // until the client holds CLIENT_BUFFER_ENOUGH or `maxBytes` went out; then idles to the end.
  const feedStdin = async (command: string[], maxBytes: number, signal: AbortSignal): Promise<{ sent: number, clientHeld: number }> => {
    let sent = 0
    let clientHeld = 0
    const res = await fetch(`${world.publicUrl}/v1/sandboxes/${sb.id}/execs`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ command, interactive: true })
    })
    expect(res.status).toBe(201)
    const { id } = await res.json() as { id: string }
    const ws = new WebSocket(`${world.publicUrl.replace('http', 'ws')}/v1/execs/${id}/stream`, ['exec-gateway.v1.binary'])
    ws.on('error', () => undefined)
    try {
      await new Promise<void>((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject) })
      await waitFor(async () => (await (await fetch(`${world.publicUrl}/v1/execs/${id}`)).json() as any).status === 'running', { timeoutMs: 5000 })
      while (!signal.aborted && sent < maxBytes && ws.bufferedAmount < CLIENT_BUFFER_ENOUGH) {
        ws.send(FRAME)
        sent += FRAME.length
        await new Promise((resolve) => setImmediate(resolve))
      }
      await sleep(1000)
      clientHeld = ws.bufferedAmount
      while (!signal.aborted) await sleep(50)
    } finally {
      ws.terminate()
      await fetch(`${world.publicUrl}/v1/execs/${id}`, { method: 'DELETE' }).catch(() => undefined)
    }
    return { sent, clientHeld }
  }

  // The attack's legitimate part (the gateway taking up to ~40 MiB of stdin at full speed until
  // the relay holds its mark) costs what an honest client sending as much costs, and on a 2-core
  // machine that shows in the honest sandbox's p99 (CI measured 115 ms quiet, 245 ms under the
  // attack). The control measures exactly that cost; the attack may not cost more.
  let control: AttackReport
  it('control: an honest exec reading 40 MiB of stdin as fast as the client sends it', async () => {
    let fed = { sent: 0, clientHeld: 0 }
    control = await world.underAttack('stdin: honest 40 MiB to cat (control)', async (signal) => {
      fed = await feedStdin(['sh', '-c', 'cat >/dev/null'], CONTROL_BYTES, signal)
    }, { durationMs: WINDOW_MS })
    expect(control.underAttack.failures).toEqual([])
    expect(fed.sent).toBeGreaterThanOrEqual(CLIENT_BUFFER_ENOUGH)
  })

  it('holds the client back instead of buffering its stdin', async () => {
    let sent = 0
    let clientHeld = 0
    const r = await world.underAttack('stdin: wide window, unread relay', async (signal) => {
      ({ sent, clientHeld } = await feedStdin(['cat', 'hostile-stdin-sink'], SEND_MAX_BYTES, signal))
    }, { durationMs: WINDOW_MS })
    expectHonestUnharmed(r, { p99Factor: 2 * Math.max(1, control.underAttack.p99Ms / r.quiet.p99Ms) })
    // The client holds most of what it sent; the gateway took the relay's mark, the frames of
    // the read it was in, and what the sockets on the way hold: the kernel autotunes a loopback
    // socket's buffers up to tcp_rmem/tcp_wmem's maxima (32 MiB to receive on this machine: CI
    // once measured 47 MB in flight), so those bound it, and the RSS bound below is the
    // gateway's own share.
    expect(clientHeld).toBeGreaterThan(CLIENT_BUFFER_ENOUGH / 2)
    expect(sent - clientHeld).toBeLessThan(2 * (tcpBufferMax('tcp_rmem') + tcpBufferMax('tcp_wmem')) + H2_STREAM_WINDOW + 4 * 1024 ** 2)
    expect(r.peakRssBytes - r.baselineRssBytes).toBeLessThan(64 * 1024 ** 2)
    console.log(`stdin sink: the client sent ${(sent / 2 ** 20).toFixed(0)} MiB, holds ${(clientHeld / 2 ** 20).toFixed(0)} MiB; gateway RSS +${((r.peakRssBytes - r.baselineRssBytes) / 2 ** 20).toFixed(0)} MiB`)
  })
})
