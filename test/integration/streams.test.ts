import { describe, it, expect, beforeAll, afterAll } from 'vitest'
import type { TestGateway } from '../helpers/gateway.js'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import { execStart, execWait, outputOf, readEvents, readWebSocket } from '../helpers/api.js'
import { waitFor } from '../helpers/wait.js'

// Streams that never lose a byte: offsets, gaps past retention, SSE resume, characters split
// across SSH packets, base64 for bytes, heartbeats during silence.

interface SseEvent { id: string, event: string, data: any }

// Reads SSE until `stopAfter` events arrived (then aborts, like a dropped connection) or the end.
async function readSse (url: string, headers: Record<string, string> = {}, stopAfter = Infinity): Promise<SseEvent[]> {
  const ac = new AbortController()
  const res = await fetch(url, { headers: { accept: 'text/event-stream', ...headers }, signal: ac.signal })
  const events: SseEvent[] = []
  let buf = ''
  const decoder = new TextDecoder()
  try {
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      buf += decoder.decode(chunk, { stream: true })
      let sep: number
      while ((sep = buf.indexOf('\n\n')) !== -1) {
        const block = buf.slice(0, sep)
        buf = buf.slice(sep + 2)
        const field = (name: string): string => block.split('\n').find((l) => l.startsWith(name + ': '))?.slice(name.length + 2) ?? ''
        events.push({ id: field('id'), event: field('event'), data: JSON.parse(field('data')) })
        if (events.length >= stopAfter) { ac.abort(); return events }
      }
    }
  } catch (err) {
    if ((err as Error).name !== 'AbortError') throw err
  }
  return events
}

describe.each(['embedded', 'openssh'] as const)('streams through the %s daemon', (target) => {
  let sb: TestSandbox
  let g: TestGateway
  const sandbox = `streams-${target}`

  beforeAll(async () => {
    sb = await startSandbox(target, sandbox, { retentionBytes: 1024, heartbeatIntervalMs: 300 })
    g = sb.g
  })

  afterAll(async () => { await sb?.close() })

  it('a reader from offset 0 past retention gets one gap with exact bounds, then exactly the retained bytes', async () => {
    // 5000 bytes: "0000 0001 0002 …" so every byte's position is checkable.
    const r = await execWait(g.publicUrl, sandbox, { command: ['sh', '-c', 'i=0; while [ $i -lt 1000 ]; do printf "%04d " $i; i=$((i+1)); done'] })
    expect(r.body.stdoutBytes).toBe(5000)
    expect(r.body.stdoutTruncated).toBe(true)
    const full = Array.from({ length: 1000 }, (_, i) => String(i).padStart(4, '0') + ' ').join('')
    expect(r.body.stdout).toBe(full.slice(5000 - 1024))
    for (const events of [await readEvents(g.publicUrl, r.body.id), (await readWebSocket(g.publicUrl, r.body.id)).events]) {
      expect(events[0]).toEqual({ type: 'gap', stream: 'stdout', from: 0, to: 5000 - 1024 })
      const out = events.filter((e) => e.type === 'stdout')
      expect(out[0].offset).toBe(5000 - 1024)
      expect(outputOf(events, 'stdout')).toBe(full.slice(5000 - 1024))
      expect(events.at(-1)).toMatchObject({ type: 'exit', exitCode: 0 })
    }
    // Resuming inside the retained window is exact, with no gap.
    const rest = await readEvents(g.publicUrl, r.body.id, 'application/x-ndjson', '?stdoutOffset=4500')
    expect(rest.some((e) => e.type === 'gap')).toBe(false)
    expect(outputOf(rest, 'stdout')).toBe(full.slice(4500))
  })

  it('SSE resumes exactly from Last-Event-ID after a dropped connection', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'for i in 1 2 3 4 5 6; do echo out$i; echo err$i >&2; sleep 0.1; done; exit 6'] })
    const url = `${g.publicUrl}/v1/execs/${id}/events`
    const first = await readSse(url, {}, 3)
    const outputSoFar = first.filter((e) => e.event === 'stdout' || e.event === 'stderr')
    expect(outputSoFar.length).toBeGreaterThan(0)
    const lastId = first.at(-1)!.id
    expect(lastId).toMatch(/^\d+-\d+$/)
    const rest = await readSse(url, { 'last-event-id': lastId })
    const all = [...first, ...rest].map((e) => e.data)
    expect(outputOf(all, 'stdout')).toBe('out1\nout2\nout3\nout4\nout5\nout6\n')
    expect(outputOf(all, 'stderr')).toBe('err1\nerr2\nerr3\nerr4\nerr5\nerr6\n')
    expect(rest.at(-1)!.data).toEqual({ type: 'exit', exitCode: 6, signal: null, timedOut: false })
  })

  it('SSE after the end: the final event\'s id ends in -end, and a reconnect with it gets 204 (an EventSource stops); one with the last output\'s id still gets the final event once', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'echo one; echo two >&2; exit 3'] })
    const url = `${g.publicUrl}/v1/execs/${id}/events`
    const all = await readSse(url)
    const final = all.at(-1)!
    expect(final.event).toBe('exit')
    expect(final.id).toMatch(/^\d+-\d+-end$/)
    const lastOutput = all.filter((e) => e.event === 'stdout' || e.event === 'stderr').at(-1)!
    expect(final.id).toBe(`${lastOutput.id}-end`)
    // Reconnecting after the final event, as an EventSource does by itself about every 3 s.
    const again = await fetch(url, { headers: { accept: 'text/event-stream', 'last-event-id': final.id } })
    expect(again.status).toBe(204)
    expect(await again.text()).toBe('')
    // Cut off between the last output and the final event: the final event comes, once.
    const rest = await readSse(url, { 'last-event-id': lastOutput.id })
    expect(rest.map((e) => e.event)).toEqual(['exit'])
    expect(rest[0]!.data).toEqual({ type: 'exit', exitCode: 3, signal: null, timedOut: false })
  })

  it('a 4-byte UTF-8 character split across SSH packets arrives whole, at its first byte\'s offset', async () => {
    // 😀 = F0 9F 98 80, written in two halves 300 ms apart so they travel in separate packets.
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', "printf 'a\\360\\237'; sleep 0.3; printf '\\230\\200b'"] })
    const ws = await readWebSocket(g.publicUrl, id)
    const out = ws.events.filter((e) => e.type === 'stdout')
    expect(outputOf(ws.events, 'stdout')).toBe('a😀b')
    expect(out.every((e) => !e.data.includes('\uFFFD'))).toBe(true)
    const emoji = out.find((e) => e.data.includes('😀'))
    expect(emoji.offset).toBe(emoji.data.startsWith('a') ? 0 : 1)
    expect(g.gw.execs.get(id)!.stdout.total).toBe(6)
  })

  it('?encoding=base64 carries arbitrary bytes exactly', async () => {
    const r = await execWait(g.publicUrl, sandbox, { command: ['sh', '-c', "printf '\\377\\376\\000\\001'; printf '\\200' >&2"] }, '&encoding=base64')
    expect(Buffer.from(r.body.stdout, 'base64')).toEqual(Buffer.from([0xff, 0xfe, 0x00, 0x01]))
    const events = await readEvents(g.publicUrl, r.body.id, 'application/x-ndjson', '?encoding=base64')
    expect(Buffer.concat(events.filter((e) => e.type === 'stdout').map((e) => Buffer.from(e.data, 'base64')))).toEqual(Buffer.from([0xff, 0xfe, 0x00, 0x01]))
    expect(Buffer.concat(events.filter((e) => e.type === 'stderr').map((e) => Buffer.from(e.data, 'base64')))).toEqual(Buffer.from([0x80]))
  })

  it('sends heartbeat events while the command is silent, on the WebSocket and in SSE', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'sleep 1.2; echo done'] })
    const [ws, sse] = await Promise.all([readWebSocket(g.publicUrl, id), readSse(`${g.publicUrl}/v1/execs/${id}/events`)])
    for (const events of [ws.events, sse.map((e) => e.data)]) {
      const beats = events.filter((e) => e.type === 'heartbeat')
      expect(beats.length).toBeGreaterThanOrEqual(2)
      expect(Number.isNaN(Date.parse(beats[0].time))).toBe(false)
      expect(events.at(-1)).toMatchObject({ type: 'exit', exitCode: 0 })
    }
  })

  it('detach then a later reader replays the whole output', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'echo one; sleep 0.4; echo two'] })
    const early = await readSse(`${g.publicUrl}/v1/execs/${id}/events`, {}, 1)
    expect(early[0].data).toMatchObject({ type: 'stdout', data: 'one\n' })
    await waitFor(() => g.gw.execs.get(id)!.finished, { timeoutMs: 5000 })
    const late = await readEvents(g.publicUrl, id)
    expect(outputOf(late, 'stdout')).toBe('one\ntwo\n')
    expect(g.gw.execs.get(id)!.readers).toBe(0)
  })
})

describe('event streams', () => {
  it('answers /events with its 200 and headers at once, before a silent command has printed anything (SSE and NDJSON)', async () => {
    // The default heartbeat (15 s): nothing but the flushed head can answer within the bound.
    const sb = await startSandbox('embedded', 'streams-head')
    const g = sb.g
    try {
      const id = await execStart(g.publicUrl, 'streams-head', { command: ['sh', '-c', 'sleep 3; echo hi'] })
      for (const accept of ['text/event-stream', 'application/x-ndjson']) {
        const ac = new AbortController()
        const started = performance.now()
        const res = await fetch(`${g.publicUrl}/v1/execs/${id}/events`, { headers: { accept }, signal: ac.signal })
        const ms = performance.now() - started
        ac.abort()
        expect(res.status).toBe(200)
        expect(res.headers.get('content-type')).toContain(accept)
        expect(ms).toBeLessThan(1000)
      }
    } finally { await sb.close() }
  })
})
