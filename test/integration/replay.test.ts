import { describe, it, expect, beforeAll, afterAll } from 'vitest'
import WebSocket from 'ws'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import { execStart } from '../helpers/api.js'
import { waitFor } from '../helpers/wait.js'

// Issue 11, items 3 and 4, against a real gateway and both daemons: a replay shows stdout and
// stderr in the order they were streamed live, on every transport, and a resume inside a UTF-8
// character starts at the next character, never with U+FFFD.

type Ev = Record<string, any>

const isOutput = (e: Ev): boolean => e.type === 'stdout' || e.type === 'stderr'
const withoutHeartbeats = (events: Ev[]): Ev[] => events.filter((e) => e.type !== 'heartbeat')

async function ndjson (baseUrl: string, id: string, query = ''): Promise<Ev[]> {
  const res = await fetch(`${baseUrl}/v1/execs/${id}/events${query}`, { headers: { accept: 'application/x-ndjson' } })
  const text = await res.text()
  return withoutHeartbeats(text.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l)))
}

async function sse (baseUrl: string, id: string, lastEventId?: string): Promise<Ev[]> {
  const headers: Record<string, string> = { accept: 'text/event-stream' }
  if (lastEventId !== undefined) headers['last-event-id'] = lastEventId
  const res = await fetch(`${baseUrl}/v1/execs/${id}/events`, { headers })
  const blocks = (await res.text()).split('\n\n').filter((b) => b !== '')
  const data = (block: string): string => block.split('\n').find((l) => l.startsWith('data: '))!.slice('data: '.length)
  return withoutHeartbeats(blocks.map((block) => JSON.parse(data(block))))
}

// Every frame in the order it came: JSON events as they are, binary output frames as
// { type, raw } so that their order among the JSON control events is kept too.
async function websocket (baseUrl: string, id: string, query = '', binary = false): Promise<Ev[]> {
  const ws = new WebSocket(`${baseUrl.replace(/^http/, 'ws')}/v1/execs/${id}/stream${query}`, binary ? ['exec-gateway.v1.binary'] : [])
  const events: Ev[] = []
  return await new Promise((resolve, reject) => {
    ws.on('message', (data, isBinary) => {
      const buf = Buffer.from(data as Buffer)
      events.push(isBinary ? { type: buf[0] === 1 ? 'stdout' : 'stderr', raw: buf.subarray(1) } : JSON.parse(buf.toString()))
    })
    ws.on('unexpected-response', (_req, res) => reject(new Error(`websocket refused: ${res.statusCode}`)))
    ws.on('error', reject)
    ws.on('close', () => resolve(withoutHeartbeats(events)))
  })
}

// A transport-neutral view: which stream, which text, in which order (binary frames carry no
// offset, so offsets are checked on the JSON transports).
const shape = (events: Ev[]): Array<[string, string]> =>
  events.map((e) => [e.type, isOutput(e) ? (e.raw !== undefined ? e.raw.toString('utf8') : e.data) : ''])

describe.each(['embedded', 'openssh'] as const)('replays through the %s daemon', (target) => {
  let sb: TestSandbox
  const sandbox = `replay-${target}`
  const url = (): string => sb.g.publicUrl

  beforeAll(async () => { sb = await startSandbox(target, sandbox) })
  afterAll(async () => { await sb?.close() })

  const finished = async (id: string): Promise<void> => { await waitFor(() => sb.g.gw.execs.get(id)?.finished === true, { timeoutMs: 10_000 }) }

  it('a finished exec replays stdout and stderr in their live order on WS JSON, WS binary, SSE and NDJSON', async () => {
    // The leading sleep lets the live readers attach before the first byte.
    const id = await execStart(url(), sandbox, { command: ['sh', '-c', 'sleep 0.3; printf 1; sleep 0.2; printf 2 >&2; sleep 0.2; printf 3; sleep 0.2; printf 4 >&2'] })
    const live = await Promise.all([websocket(url(), id), websocket(url(), id, '', true), sse(url(), id), ndjson(url(), id)])
    await finished(id)
    const replay = await Promise.all([websocket(url(), id), websocket(url(), id, '', true), sse(url(), id), ndjson(url(), id)])
    const expected = [
      { type: 'stdout', offset: 0, data: '1' },
      { type: 'stderr', offset: 0, data: '2' },
      { type: 'stdout', offset: 1, data: '3' },
      { type: 'stderr', offset: 1, data: '4' },
      { type: 'exit', exitCode: 0, signal: null, timedOut: false }
    ]
    for (const [i, events] of [...live, ...replay].entries()) {
      const name = `${i < 4 ? 'live' : 'replay'} ${['ws json', 'ws binary', 'sse', 'ndjson'][i % 4]}`
      expect(shape(events), name).toEqual(shape(expected))
      if (i % 4 !== 1) expect(events, name).toEqual(expected)
    }
  })

  it('resumes from offsets keep the interleaving of what follows, on every transport', async () => {
    const id = await execStart(url(), sandbox, { command: ['sh', '-c', 'printf o1; sleep 0.2; printf e1 >&2; sleep 0.2; printf o2; sleep 0.2; printf e2 >&2; sleep 0.2; printf o3'] })
    await finished(id)
    const exit = { type: 'exit', exitCode: 0, signal: null, timedOut: false }
    const fromStdout2 = [
      { type: 'stderr', offset: 0, data: 'e1' },
      { type: 'stdout', offset: 2, data: 'o2' },
      { type: 'stderr', offset: 2, data: 'e2' },
      { type: 'stdout', offset: 4, data: 'o3' },
      exit
    ]
    expect(await ndjson(url(), id, '?stdoutOffset=2')).toEqual(fromStdout2)
    expect(await websocket(url(), id, '?stdoutOffset=2')).toEqual(fromStdout2)
    expect(shape(await websocket(url(), id, '?stdoutOffset=2', true))).toEqual(shape(fromStdout2))
    expect(await sse(url(), id, '2-0')).toEqual(fromStdout2)
    const fromBoth2 = fromStdout2.slice(1)
    expect(await ndjson(url(), id, '?stdoutOffset=2&stderrOffset=2')).toEqual(fromBoth2)
    expect(await websocket(url(), id, '?stdoutOffset=2&stderrOffset=2')).toEqual(fromBoth2)
    expect(shape(await websocket(url(), id, '?stdoutOffset=2&stderrOffset=2', true))).toEqual(shape(fromBoth2))
    expect(await sse(url(), id, '2-2')).toEqual(fromBoth2)
  })

  describe('resume inside a multi-byte character', () => {
    // 'aé€😀b' (a=0, é=1..2, €=3..5, 😀=6..9, b=10), written in pieces that split the
    // characters across packets and interleave with stderr.
    const BYTES = Buffer.from('aé€😀b', 'utf8')
    const script = "printf 'a\\303'; sleep 0.1; printf x >&2; printf '\\251\\342'; sleep 0.1; printf '\\202\\254\\360\\237'; sleep 0.1; printf y >&2; sleep 0.1; printf '\\230\\200b'"
    const nextBoundary = (o: number): number => { let n = o; while (n < BYTES.length && (BYTES[n]! & 0xc0) === 0x80) n++; return n }
    let id: string

    beforeAll(async () => {
      id = await execStart(url(), sandbox, { command: ['sh', '-c', script] })
      await finished(id)
      expect(sb.g.gw.execs.get(id)!.stdout.total).toBe(BYTES.length)
    })

    it('as text, every offset starts at the next character boundary and no event carries U+FFFD', async () => {
      for (let o = 0; o <= BYTES.length; o++) {
        const boundary = nextBoundary(o)
        const transports = {
          ndjson: await ndjson(url(), id, `?stdoutOffset=${o}`),
          ws: await websocket(url(), id, `?stdoutOffset=${o}`),
          sse: await sse(url(), id, `${o}-0`)
        }
        for (const [name, events] of Object.entries(transports)) {
          const what = `${name} from ${o}`
          const out = events.filter((e) => e.type === 'stdout')
          expect(JSON.stringify(events), what).not.toContain('\\ufffd')
          expect(events.some((e) => e.data?.includes('\uFFFD')), what).toBe(false)
          expect(events.some((e) => e.type === 'gap'), what).toBe(false)
          expect(out.map((e) => e.data).join(''), what).toBe(BYTES.subarray(boundary).toString('utf8'))
          if (boundary < BYTES.length) expect(out[0].offset, what).toBe(boundary)
          else expect(out, what).toEqual([])
          expect(events.filter((e) => e.type === 'stderr').map((e) => e.data).join(''), what).toBe('xy')
          expect(events.at(-1), what).toMatchObject({ type: 'exit', exitCode: 0 })
        }
      }
    })

    it('as bytes (base64, binary subprotocol), every offset starts exactly there', async () => {
      for (let o = 0; o <= BYTES.length; o++) {
        const b64 = (await ndjson(url(), id, `?stdoutOffset=${o}&encoding=base64`)).filter((e) => e.type === 'stdout')
        expect(Buffer.concat(b64.map((e) => Buffer.from(e.data, 'base64'))).equals(BYTES.subarray(o)), `base64 from ${o}`).toBe(true)
        if (o < BYTES.length) expect(b64[0].offset, `base64 from ${o}`).toBe(o)
        const bin = (await websocket(url(), id, `?stdoutOffset=${o}`, true)).filter((e) => e.type === 'stdout')
        expect(Buffer.concat(bin.map((e) => e.raw as Buffer)).equals(BYTES.subarray(o)), `binary from ${o}`).toBe(true)
      }
    })
  })
})
