import WebSocket from 'ws'
import { afterEach, describe, expect, it } from 'vitest'
import { BINARY_SUBPROTOCOL } from '../../sdk/index.js'
import { api, execStart } from '../helpers/api.js'
import { createFaultKit, FAST } from '../helpers/fault-kit.js'
import type { TestGateway } from '../helpers/gateway.js'
import { sandboxAccount } from '../helpers/openssh.js'
import type { TcpProxy } from '../helpers/tcp-proxy.js'
import { sleep, waitFor } from '../helpers/wait.js'
import { runBySh, within } from '../helpers/restart-readers.js'

// The `relay` event (docs/api.md §4, §5 rule 4) as each transport frames it: a reader attached
// across a supervisor connection reset gets one `lost`, then one `restored`, then the output
// where it stopped and the final event: on the WebSocket (JSON text frames, and the binary
// subprotocol where it stays a JSON text frame among binary output), in SSE (`event: relay`
// with the id of the position it came at) and in NDJSON (one line). A target that does not keep
// execs (OpenSSH) sends none of it: the reset is a 503, as it always was. Real processes: an
// in-process gateway, a supervisor process from dist/ behind a TCP proxy the test resets.

const REATTACH_MS = 6000
const READ_BOUND_MS = REATTACH_MS + 20_000
const kit = createFaultKit({ ...FAST, reattachTimeoutMs: REATTACH_MS })
afterEach(async () => { await kit.cleanup() })

// target: where the supervisor's SSH goes (default: its embedded daemon), set up once the
// gateway (and so the key the target must authorize) exists.
type Target = (g: TestGateway) => Promise<{ sshTarget: string, sshUser: string }>

async function sandbox (id: string, target?: Target): Promise<{ g: TestGateway, proxy: TcpProxy }> {
  const g = await kit.gateway()
  const extra = target === undefined ? {} : await target(g)
  const url = new URL(g.supervisorUrl)
  const proxy = await kit.proxyTo(url.hostname, Number(url.port))
  kit.supervisor(g, id, { gatewayUrl: `http://${proxy.host}:${proxy.port}`, ...extra })
  await g.waitConnected(id)
  return { g, proxy }
}

type Stream = 'stdout' | 'stderr'
// What a reader got, in the order it got it. Output carries its bytes (and its offset, where
// the transport gives one); every other event its JSON, and in SSE its event name and id.
type Item =
  | { kind: 'output', stream: Stream, offset: number | undefined, bytes: Buffer }
  | { kind: 'event', ev: any, sseName?: string, sseId?: string }

interface Reader {
  name: string
  items: Item[]
  // Resolves once the transport has ended (the WebSocket's close code; 0 for HTTP).
  done: Promise<number>
  ready: Promise<void>
}

function outputItem (ev: any, encoding: 'utf8' | 'base64'): Item {
  return { kind: 'output', stream: ev.type, offset: ev.offset, bytes: Buffer.from(ev.data, encoding) }
}

function wsReader (g: TestGateway, execId: string, binary: boolean): Reader {
  const ws = new WebSocket(`${g.publicUrl.replace(/^http/, 'ws')}/v1/execs/${execId}/stream`, binary ? [BINARY_SUBPROTOCOL] : [])
  kit.defer(() => { ws.terminate() })
  const items: Item[] = []
  const ready = new Promise<void>((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject) })
  const done = within(new Promise<number>((resolve, reject) => {
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      if (isBinary) {
        items.push({ kind: 'output', stream: data[0] === 1 ? 'stdout' : 'stderr', offset: undefined, bytes: Buffer.from(data.subarray(1)) })
        return
      }
      const ev = JSON.parse(data.toString())
      items.push(ev.type === 'stdout' || ev.type === 'stderr' ? outputItem(ev, 'utf8') : { kind: 'event', ev })
    })
    ws.on('error', reject)
    ws.on('close', (code) => resolve(code))
  }), READ_BOUND_MS, `websocket${binary ? ' (binary)' : ''} reader`)
  ready.catch(() => {})
  done.catch(() => {})
  return { name: binary ? 'ws-binary' : 'ws-json', items, done, ready }
}

// SSE (base64 output, so bytes are exact) or NDJSON (UTF-8), parsed from the wire as sent.
function httpReader (g: TestGateway, execId: string, format: 'sse' | 'ndjson'): Reader {
  const items: Item[] = []
  const signal = AbortSignal.timeout(READ_BOUND_MS)
  let onReady!: () => void
  const ready = new Promise<void>((resolve) => { onReady = resolve })
  const done = (async () => {
    try {
      const res = await fetch(`${g.publicUrl}/v1/execs/${execId}/events${format === 'sse' ? '?encoding=base64' : ''}`, {
        headers: { accept: format === 'sse' ? 'text/event-stream' : 'application/x-ndjson' },
        signal
      })
      expect(res.status).toBe(200)
      onReady()
      const decoder = new TextDecoder()
      let buf = ''
      for await (const chunk of res.body!) {
        buf += decoder.decode(chunk as Uint8Array, { stream: true })
        const sep = format === 'sse' ? '\n\n' : '\n'
        let at: number
        while ((at = buf.indexOf(sep)) !== -1) {
          const record = buf.slice(0, at)
          buf = buf.slice(at + sep.length)
          if (format === 'ndjson') {
            const ev = JSON.parse(record)
            items.push(ev.type === 'stdout' || ev.type === 'stderr' ? outputItem(ev, 'utf8') : { kind: 'event', ev })
            continue
          }
          const fields = Object.fromEntries(record.split('\n').map((l) => [l.slice(0, l.indexOf(': ')), l.slice(l.indexOf(': ') + 2)]))
          const ev = JSON.parse(fields.data!)
          expect(fields.event, 'SSE event name is the event type').toBe(ev.type)
          items.push(ev.type === 'stdout' || ev.type === 'stderr' ? outputItem(ev, 'base64') : { kind: 'event', ev, sseName: fields.event, sseId: fields.id })
        }
      }
      expect(buf, `${format}: nothing after the last record`).toBe('')
      return 0
    } catch (err) {
      if (signal.aborted) throw new Error(`${format} reader of ${execId}: no end within ${READ_BOUND_MS} ms`)
      throw err
    }
  })()
  done.catch(() => {})
  return { name: format, items, done, ready }
}

function allReaders (g: TestGateway, execId: string): Reader[] {
  return [wsReader(g, execId, false), wsReader(g, execId, true), httpReader(g, execId, 'sse'), httpReader(g, execId, 'ndjson')]
}

const relayStates = (r: Reader): string[] => r.items.flatMap((i) => i.kind === 'event' && i.ev.type === 'relay' ? [i.ev.state] : [])
const outputBytes = (items: Item[]): number => items.reduce((n, i) => n + (i.kind === 'output' ? i.bytes.length : 0), 0)

async function execJson (g: TestGateway, execId: string): Promise<any> {
  return (await api(g.publicUrl, 'GET', `/v1/execs/${execId}`)).body
}

// Ticks on both streams for a few seconds, so output is still coming when the relay is back.
const TICKS = "i=0; while [ $i -lt 60 ]; do printf 'tick %03d\\n' $i; printf 'tock %03d\\n' $i >&2; i=$((i+1)); sleep 0.05; done; exit 5"

describe('relay events per transport', () => {
  it('after a reset, WS (JSON and binary), SSE and NDJSON readers each get one lost, one restored, then the output where it stopped and the exit', async () => {
    const { g, proxy } = await sandbox('relay-events')
    const expected = await runBySh(TICKS)
    const execId = await execStart(g.publicUrl, 'relay-events', { command: ['sh', '-c', TICKS] })
    const readers = allReaders(g, execId)
    await within(Promise.all(readers.map(async (r) => await r.ready)), 5000, 'readers attached')
    await waitFor(() => readers.every((r) => outputBytes(r.items) > 0), { timeoutMs: 10_000, description: 'every reader has output' })

    // Reset, and hold the supervisor's reconnect for a while: output made meanwhile waits in
    // the daemon and must come after `restored`, not before.
    proxy.resetAll()
    proxy.blackholeAll()
    await waitFor(() => readers.every((r) => relayStates(r).includes('lost')), { timeoutMs: 5000, intervalMs: 10, description: 'every reader got relay lost' })
    await sleep(700)
    for (const r of readers) expect(relayStates(r), r.name).toEqual(['lost'])
    proxy.setMode('pass')

    const codes = await Promise.all(readers.map(async (r) => await r.done))
    expect(codes).toEqual([1000, 1000, 0, 0])
    expect(await execJson(g, execId)).toMatchObject({ status: 'exited', exitCode: 5, error: null })
    for (const r of readers) {
      const what = r.name
      const events = r.items.flatMap((i) => i.kind === 'event' ? [i] : [])
      expect(relayStates(r), what).toEqual(['lost', 'restored'])
      expect(events.some((i) => i.ev.type === 'gap'), `${what}: no gap`).toBe(false)
      const last = r.items.at(-1)!
      expect(last.kind === 'event' ? last.ev : last, `${what}: final event`).toEqual({ type: 'exit', exitCode: 5, signal: null, timedOut: false })
      for (const i of events) if (i.ev.type === 'relay') expect(Object.keys(i.ev).sort(), what).toEqual(['state', 'type'])

      const lostAt = r.items.findIndex((i) => i.kind === 'event' && i.ev.type === 'relay' && i.ev.state === 'lost')
      const restoredAt = r.items.findIndex((i) => i.kind === 'event' && i.ev.type === 'relay' && i.ev.state === 'restored')
      expect(restoredAt, what).toBeGreaterThan(lostAt)
      // Soft, so a failure names every transport and the checks below still run.
      expect.soft(r.items.slice(lostAt + 1, restoredAt).flatMap((i) => i.kind === 'output' ? [`${i.stream}@${i.offset ?? '?'}+${i.bytes.length}`] : []), `${what}: no output between lost and restored`).toEqual([])
      expect(outputBytes(r.items.slice(0, lostAt)), `${what}: output before the loss`).toBeGreaterThan(0)
      expect(outputBytes(r.items.slice(restoredAt + 1)), `${what}: output continues after the restore`).toBeGreaterThan(0)

      // Each stream continues exactly where it stopped: the same bytes as /bin/sh gives, and
      // where the transport carries offsets, each chunk starting where the last one ended.
      for (const stream of ['stdout', 'stderr'] as const) {
        const chunks = r.items.flatMap((i) => i.kind === 'output' && i.stream === stream ? [i] : [])
        let next = 0
        for (const c of chunks) {
          if (c.offset !== undefined) expect(c.offset, `${what} ${stream} offset`).toBe(next)
          next += c.bytes.length
        }
        expect(Buffer.concat(chunks.map((c) => c.bytes)).toString('latin1'), `${what} ${stream}`).toBe(expected[stream].toString('latin1'))
      }

      if (r.name === 'sse') {
        // A relay event's id is the position it came at, so a reconnect there resumes with no gap.
        const position = (upTo: number): string => {
          const seen = { stdout: 0, stderr: 0 }
          for (const i of r.items.slice(0, upTo)) if (i.kind === 'output') seen[i.stream] += i.bytes.length
          return `${seen.stdout}-${seen.stderr}`
        }
        for (const at of [lostAt, restoredAt]) {
          const i = r.items[at]!
          expect(i.kind === 'event' && i.sseName, 'SSE event name').toBe('relay')
          expect(i.kind === 'event' && i.sseId, 'SSE id of a relay event').toBe(position(at))
        }
      }
    }
    expect(expected.code).toBe(5)
  })

  it('an OpenSSH target under a reset keeps the old behaviour: 503 relay_unavailable on every transport, no relay event, no reattach wait', async () => {
    const { g, proxy } = await sandbox('relay-openssh', async (gw) => {
      const sshd = await kit.openssh(gw)
      return { sshTarget: `${sshd.host}:${sshd.port}`, sshUser: sandboxAccount() }
    })
    const execId = await execStart(g.publicUrl, 'relay-openssh', { command: ['sh', '-c', 'echo started; sleep 30'] })
    const readers = allReaders(g, execId)
    await within(Promise.all(readers.map(async (r) => await r.ready)), 5000, 'readers attached')
    await waitFor(() => readers.every((r) => outputBytes(r.items) === 8), { timeoutMs: 10_000, description: 'every reader has the first line' })
    const t0 = performance.now()
    proxy.resetAll()
    const codes = await Promise.all(readers.map(async (r) => await r.done))
    expect(performance.now() - t0, 'no reattach wait').toBeLessThan(REATTACH_MS)
    expect(codes).toEqual([1011, 1011, 0, 0])
    const exec = await execJson(g, execId)
    expect(exec).toMatchObject({ status: 'failed', exitCode: null, error: { code: 'relay_unavailable', status: 503 } })
    for (const r of readers) {
      expect(relayStates(r), r.name).toEqual([])
      const last = r.items.at(-1)!
      expect(last.kind === 'event' ? last.ev : last, r.name).toEqual({ type: 'error', code: 'relay_unavailable', status: 503, detail: exec.error.detail, message: exec.error.detail })
    }
  })
})
