// The ways a client reads an exec, each turned into one Observation: what arrived on each stream
// (from which offset, after which gap), the final event, the Exec record, and every protocol
// violation noticed on the way (offsets that skip or repeat, events after the final one, a gap
// after data, an SSE id that disagrees with the offsets, ...). Every reader takes an AbortSignal
// and lets go of its connection when it fires, so a case that hangs can be abandoned cleanly.
import { setMaxListeners } from 'node:events'
import WebSocket from 'ws'
import { BINARY_SUBPROTOCOL, JSON_SUBPROTOCOL } from '../../sdk/index.js'
import { STREAMS, type StreamName } from './programs.js'

export type Transport = 'ndjson' | 'sse' | 'ws-json' | 'ws-binary'
export type Encoding = 'utf8' | 'base64'

interface StreamObs {
  requested: number
  gap: { from: number, to: number } | undefined
  data: Buffer
}

export interface Observation {
  execId: string
  streams: Record<StreamName, StreamObs>
  final: any
  record: any
  // ExecResult (wait=true) only.
  truncated?: Record<StreamName, boolean>
  closeCode?: number
  problems: string[]
  heartbeats: number
}

export interface Offsets { stdout: number, stderr: number }

export interface Pause { afterBytes: number, ms: number }

/** Pauses that actually happened (a pause point past the end of the output never comes). */
export const pauseStats = { taken: 0 }

function short (v: unknown): string {
  const s = JSON.stringify(v) ?? String(v)
  return s.length > 200 ? s.slice(0, 200) + '…' : s
}

function abortError (signal: AbortSignal): Error {
  return signal.reason instanceof Error ? signal.reason : new Error('aborted')
}

async function sleepUnlessAborted (ms: number, signal: AbortSignal): Promise<void> {
  await new Promise<void>((resolve) => {
    const t = setTimeout(done, ms)
    function done (): void { clearTimeout(t); signal.removeEventListener('abort', done); resolve() }
    signal.addEventListener('abort', done, { once: true })
  })
}

// ---------------------------------------------------------------------------------------------
// Events → streams, checking the protocol on the way

class EventCollector {
  readonly problems: string[] = []
  final: any
  heartbeats = 0
  readonly #encoding: Encoding | 'binary'
  readonly #requested: Offsets
  readonly #next: Offsets
  readonly #gap: Record<StreamName, { from: number, to: number } | undefined> = { stdout: undefined, stderr: undefined }
  readonly #chunks: Record<StreamName, Buffer[]> = { stdout: [], stderr: [] }
  #events = 0

  constructor (offsets: Offsets, encoding: Encoding | 'binary') {
    this.#requested = { ...offsets }
    this.#next = { ...offsets }
    this.#encoding = encoding
  }

  /** The SSE id the gateway must give the last event: the offsets just past it (the final event's ends in -end). */
  get position (): string { return `${this.#next.stdout}-${this.#next.stderr}` }

  event (ev: any): void {
    this.#events++
    if (this.final !== undefined) this.problems.push(`event after the final event: ${short(ev)}`)
    if (typeof ev !== 'object' || ev === null) { this.problems.push(`not an event object: ${short(ev)}`); return }
    switch (ev.type) {
      case 'stdout':
      case 'stderr': {
        const s: StreamName = ev.type
        if (this.#encoding === 'binary') this.problems.push(`JSON ${s} event on the binary subprotocol: ${short(ev)}`)
        if (typeof ev.data !== 'string') { this.problems.push(`${s} event without string data: ${short(ev)}`); return }
        const bytes = Buffer.from(ev.data, this.#encoding === 'base64' ? 'base64' : 'utf8')
        if (this.#encoding === 'base64' && bytes.toString('base64') !== ev.data) this.problems.push(`${s} event data is not canonical base64 at offset ${String(ev.offset)}`)
        if (ev.offset !== this.#next[s]) this.problems.push(`${s} event at offset ${String(ev.offset)}, expected ${this.#next[s]} (${ev.offset < this.#next[s] ? 'repeated' : 'skipped'} bytes)`)
        this.#next[s] = (typeof ev.offset === 'number' ? ev.offset : this.#next[s]) + bytes.length
        this.#chunks[s].push(bytes)
        return
      }
      case 'gap': {
        const s = ev.stream as StreamName
        if (s !== 'stdout' && s !== 'stderr') { this.problems.push(`gap for unknown stream: ${short(ev)}`); return }
        if (this.#gap[s] !== undefined) this.problems.push(`second gap on ${s}: ${short(ev)}`)
        if (this.#chunks[s].length > 0) this.problems.push(`gap on ${s} after data: ${short(ev)}`)
        if (ev.from !== this.#next[s]) this.problems.push(`gap on ${s} from ${String(ev.from)}, expected ${this.#next[s]}`)
        if (!(typeof ev.to === 'number' && ev.to > ev.from)) this.problems.push(`empty or backward gap: ${short(ev)}`)
        this.#gap[s] = { from: ev.from, to: ev.to }
        this.#next[s] = ev.to
        return
      }
      case 'heartbeat':
        this.heartbeats++
        return
      case 'exit':
      case 'error':
        this.final = ev
        return
      case 'relay':
        this.problems.push(`relay event in a run without faults: ${short(ev)}`)
        return
      default:
        this.problems.push(`unknown event type: ${short(ev)}`)
    }
  }

  binary (frame: Buffer): void {
    this.#events++
    if (this.final !== undefined) this.problems.push('binary frame after the final event')
    if (this.#encoding !== 'binary') { this.problems.push('binary frame on a JSON WebSocket'); return }
    const ch = frame[0]
    if (ch !== 1 && ch !== 2) { this.problems.push(`binary frame with channel byte ${String(ch)}`); return }
    const s: StreamName = ch === 1 ? 'stdout' : 'stderr'
    const bytes = frame.subarray(1)
    this.#next[s] += bytes.length
    this.#chunks[s].push(bytes)
  }

  /** `partial`: the reader left on purpose before the end, so no final event is due. */
  finish (partial = false): { streams: Record<StreamName, StreamObs>, final: any, problems: string[], heartbeats: number, position: Offsets } {
    if (this.final === undefined && !partial) this.problems.push(`no final event (after ${this.#events} events)`)
    const streams = {} as Record<StreamName, StreamObs>
    for (const s of STREAMS) streams[s] = { requested: this.#requested[s], gap: this.#gap[s], data: Buffer.concat(this.#chunks[s]) }
    return { streams, final: this.final, problems: this.problems, heartbeats: this.heartbeats, position: { ...this.#next } }
  }
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP

async function json (res: Response): Promise<any> {
  const text = await res.text()
  try { return JSON.parse(text) } catch { return text }
}

export async function createExec (baseUrl: string, sandboxId: string, body: Record<string, unknown>, signal: AbortSignal): Promise<string> {
  const res = await fetch(`${baseUrl}/v1/sandboxes/${sandboxId}/execs`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), signal })
  const b = await json(res)
  if (res.status !== 201 || typeof b?.id !== 'string') throw new Error(`exec create: ${res.status} ${short(b)}`)
  return b.id
}

export async function getExec (baseUrl: string, execId: string, signal: AbortSignal): Promise<any> {
  const res = await fetch(`${baseUrl}/v1/execs/${execId}`, { signal })
  const b = await json(res)
  if (res.status !== 200) throw new Error(`GET exec ${execId}: ${res.status} ${short(b)}`)
  return b
}

export async function deleteExec (baseUrl: string, execId: string): Promise<void> {
  try {
    await fetch(`${baseUrl}/v1/execs/${execId}`, { method: 'DELETE', signal: AbortSignal.timeout(5000) })
  } catch { /* best effort */ }
}

/** Polls the record until the exec has ended (nobody attached meanwhile). */
export async function pollEnded (baseUrl: string, execId: string, signal: AbortSignal): Promise<any> {
  for (;;) {
    if (signal.aborted) throw abortError(signal)
    const rec = await getExec(baseUrl, execId, signal)
    if (rec.status === 'exited' || rec.status === 'failed') return rec
    await sleepUnlessAborted(30, signal)
  }
}

/** POST ?wait=true: the ExecResult, as an Observation of the tails it carries. */
export async function runWait (baseUrl: string, sandboxId: string, body: Record<string, unknown>, encoding: Encoding, signal: AbortSignal): Promise<Observation> {
  const res = await fetch(`${baseUrl}/v1/sandboxes/${sandboxId}/execs?wait=true&encoding=${encoding}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), signal })
  const r = await json(res)
  if (res.status !== 200) throw new Error(`wait=true: ${res.status} ${short(r)}`)
  const problems: string[] = []
  const streams = {} as Record<StreamName, StreamObs>
  const truncated = {} as Record<StreamName, boolean>
  for (const s of STREAMS) {
    if (typeof r[s] !== 'string') problems.push(`ExecResult.${s} is not a string`)
    const data = Buffer.from(String(r[s] ?? ''), encoding)
    streams[s] = { requested: 0, gap: undefined, data }
    truncated[s] = r[`${s}Truncated`]
  }
  const { stdout: _o, stderr: _e, stdoutTruncated: _ot, stderrTruncated: _et, ...record } = r
  return {
    execId: r.id,
    streams,
    truncated,
    record,
    final: { type: 'exit', exitCode: r.exitCode, signal: r.signal, timedOut: r.timedOut },
    problems,
    heartbeats: 0
  }
}

function eventsQuery (offsets: Offsets, encoding: Encoding | 'binary'): string {
  const q = new URLSearchParams()
  if (offsets.stdout !== 0) q.set('stdoutOffset', String(offsets.stdout))
  if (offsets.stderr !== 0) q.set('stderrOffset', String(offsets.stderr))
  if (encoding === 'base64') q.set('encoding', 'base64')
  const s = q.toString()
  return s === '' ? '' : '?' + s
}

export interface ReadOptions {
  transport: Transport
  encoding: Encoding
  offsets: Offsets
  signal: AbortSignal
  // Stop reading for `ms` once `afterBytes` have arrived (a paused reader), in order.
  pauses?: Pause[]
  // Runs once the reader is attached (the server has answered), e.g. to release a gated command;
  // a WebSocket reader passes its socket.
  onAttached?: (ws?: WebSocket) => void
  // Leave (close the socket, abort the request) once this many bytes have arrived: a client that
  // drops its connection and comes back later.
  leaveAfterBytes?: number
  // SSE only: resume with this Last-Event-ID header instead of offsets in the query.
  lastEventId?: string
}

export type ReadResult = ReturnType<EventCollector['finish']> & { closeCode?: number, left: boolean, lastEventId?: string }

export async function readExec (baseUrl: string, execId: string, opts: ReadOptions): Promise<ReadResult> {
  if (opts.transport === 'ws-json' || opts.transport === 'ws-binary') return await readWebSocket(baseUrl, execId, opts)
  return await readHttpEvents(baseUrl, execId, opts)
}

// /events as NDJSON or SSE, parsed as it streams.
async function readHttpEvents (baseUrl: string, execId: string, opts: ReadOptions): Promise<ReadResult> {
  const sse = opts.transport === 'sse'
  const col = new EventCollector(opts.offsets, opts.encoding)
  // Aborted by the case's bound or by leaving on purpose.
  const leave = new AbortController()
  setMaxListeners(0, leave.signal)
  const onOuterAbort = (): void => leave.abort(opts.signal.reason)
  if (opts.signal.aborted) onOuterAbort()
  else opts.signal.addEventListener('abort', onOuterAbort, { once: true })
  const signal = leave.signal
  const headers: Record<string, string> = { accept: sse ? 'text/event-stream' : 'application/x-ndjson' }
  if (opts.lastEventId !== undefined) headers['last-event-id'] = opts.lastEventId
  const query = opts.lastEventId !== undefined ? eventsQuery({ stdout: 0, stderr: 0 }, opts.encoding) : eventsQuery(opts.offsets, opts.encoding)
  const res = await fetch(`${baseUrl}/v1/execs/${execId}/events${query}`, { headers, signal })
  if (res.status !== 200) throw new Error(`/events: ${res.status} ${short(await json(res))}`)
  const ct = res.headers.get('content-type') ?? ''
  if (!ct.startsWith(sse ? 'text/event-stream' : 'application/x-ndjson')) col.problems.push(`/events content-type ${ct}`)
  opts.onAttached?.()
  const pauses = [...(opts.pauses ?? [])]
  const reader = res.body!.getReader()
  const decoder = new TextDecoder('utf-8', { fatal: true })
  let received = 0
  let buf = ''
  let lastEventId: string | undefined
  const sep = sse ? '\n\n' : '\n'
  const onBlock = (block: string): void => {
    if (block === '') return
    if (!sse) { col.event(JSON.parse(block)); return }
    const lines = block.split('\n')
    const field = (name: string): string | undefined => lines.find((l) => l.startsWith(name + ': '))?.slice(name.length + 2)
    const data = field('data')
    if (data === undefined) { col.problems.push(`SSE block without data: ${short(block)}`); return }
    const ev = JSON.parse(data)
    if (field('event') !== ev.type) col.problems.push(`SSE event name ${String(field('event'))} for a ${String(ev.type)} event`)
    col.event(ev)
    const id = field('id')
    lastEventId = id
    // The final event's id ends in -end (a reconnect with it gets 204, which stops an EventSource).
    const want = ev.type === 'exit' || ev.type === 'error' ? `${col.position}-end` : col.position
    if (id !== want) col.problems.push(`SSE id ${String(id)} after a ${String(ev.type)} event, expected ${want}`)
  }
  try {
    for (;;) {
      const { done, value } = await reader.read()
      if (done) break
      received += value.length
      buf += decoder.decode(value, { stream: true })
      let i: number
      while ((i = buf.indexOf(sep)) !== -1) {
        const block = buf.slice(0, i)
        buf = buf.slice(i + sep.length)
        onBlock(block)
      }
      if (opts.leaveAfterBytes !== undefined && received >= opts.leaveAfterBytes && col.final === undefined) {
        leave.abort()
        return { ...col.finish(true), left: true, ...(lastEventId === undefined ? {} : { lastEventId }) }
      }
      while (pauses.length > 0 && received >= pauses[0]!.afterBytes) {
        pauseStats.taken++
        await sleepUnlessAborted(pauses.shift()!.ms, opts.signal)
      }
    }
  } catch (err) {
    if (opts.signal.aborted) throw abortError(opts.signal)
    throw err
  } finally {
    opts.signal.removeEventListener('abort', onOuterAbort)
  }
  if (buf.trim() !== '') col.problems.push(`/events ended inside an event: ${short(buf)}`)
  return { ...col.finish(), left: false, ...(lastEventId === undefined ? {} : { lastEventId }) }
}

// GET /stream: JSON frames (with or without naming the JSON subprotocol) or binary frames.
async function readWebSocket (baseUrl: string, execId: string, opts: ReadOptions): Promise<ReadResult> {
  const binary = opts.transport === 'ws-binary'
  const col = new EventCollector(opts.offsets, binary ? 'binary' : opts.encoding)
  const q = eventsQuery(opts.offsets, binary ? 'binary' : opts.encoding)
  const protocols = binary ? [BINARY_SUBPROTOCOL] : (opts.offsets.stdout + opts.offsets.stderr) % 2 === 0 ? [] : [JSON_SUBPROTOCOL]
  const ws = new WebSocket(`${baseUrl.replace(/^http/, 'ws')}/v1/execs/${execId}/stream${q}`, protocols)
  const pauses = [...(opts.pauses ?? [])]
  let received = 0
  let left = false
  let pausedUntil: NodeJS.Timeout | undefined
  return await new Promise<ReadResult>((resolve, reject) => {
    const onAbort = (): void => { clearTimeout(pausedUntil); ws.terminate(); reject(abortError(opts.signal)) }
    if (opts.signal.aborted) { onAbort(); return }
    opts.signal.addEventListener('abort', onAbort, { once: true })
    ws.on('open', () => {
      if (binary && ws.protocol !== BINARY_SUBPROTOCOL) col.problems.push(`server selected subprotocol ${JSON.stringify(ws.protocol)}`)
      opts.onAttached?.(ws)
    })
    ws.on('message', (data: Buffer, isBinary) => {
      received += data.length
      try {
        if (isBinary) col.binary(Buffer.from(data))
        else col.event(JSON.parse(data.toString('utf8')))
      } catch (err) {
        col.problems.push(`unparsable frame: ${String(err)}`)
      }
      if (opts.leaveAfterBytes !== undefined && received >= opts.leaveAfterBytes && !left && col.final === undefined) {
        // Frames already on their way are still read (and counted) until the close completes.
        left = true
        ws.close(1000)
      }
      if (pauses.length > 0 && received >= pauses[0]!.afterBytes && pausedUntil === undefined) {
        const p = pauses.shift()!
        pauseStats.taken++
        ws.pause()
        pausedUntil = setTimeout(() => { pausedUntil = undefined; ws.resume() }, p.ms)
      }
    })
    ws.on('unexpected-response', (_req, res) => { opts.signal.removeEventListener('abort', onAbort); reject(new Error(`WebSocket refused: ${String(res.statusCode)}`)) })
    ws.on('error', (err) => { opts.signal.removeEventListener('abort', onAbort); reject(err) })
    ws.on('close', (code) => {
      clearTimeout(pausedUntil)
      opts.signal.removeEventListener('abort', onAbort)
      resolve({ ...col.finish(left), closeCode: code, left: left && col.final === undefined })
    })
  })
}

/** Sends stdin EOF over a WebSocket of its own and closes it (for readers that cannot send). */
export async function sendEof (baseUrl: string, execId: string, signal: AbortSignal): Promise<void> {
  const ws = new WebSocket(`${baseUrl.replace(/^http/, 'ws')}/v1/execs/${execId}/stream`)
  await new Promise<void>((resolve, reject) => {
    const onAbort = (): void => { ws.terminate(); reject(abortError(signal)) }
    signal.addEventListener('abort', onAbort, { once: true })
    ws.on('open', () => { ws.send(JSON.stringify({ type: 'eof' }), () => ws.close(1000)) })
    ws.on('error', (err) => { signal.removeEventListener('abort', onAbort); reject(err) })
    ws.on('unexpected-response', (_req, res) => { signal.removeEventListener('abort', onAbort); reject(new Error(`eof WebSocket refused: ${String(res.statusCode)}`)) })
    ws.on('close', () => { signal.removeEventListener('abort', onAbort); resolve() })
  })
}
