import createClient, { type Client, type ClientOptions } from 'openapi-fetch'
import type { components, paths } from './schema.js'

// A typed client for exec-gateway. Every request and response type comes from sdk/schema.ts,
// which `npm run openapi` generates from the gateway's OpenAPI document: a route change that
// the SDK (or code using it) does not follow fails the type check instead of a user's call.

export type { components, paths } from './schema.js'

type Schemas = components['schemas']
export type Sandbox = Schemas['Sandbox']
export type Exec = Schemas['Exec']
export type ExecRequest = Schemas['ExecRequest']
export type ExecResult = Schemas['ExecResult']
export type ExecEvent = Schemas['ExecEvent']
export type OutputEvent = Schemas['StdoutEvent'] | Schemas['StderrEvent']
export type FinalEvent = Schemas['ExitEvent'] | Schemas['ErrorEvent']
export type ClientFrame = Schemas['ClientFrame']
export type Problem = Schemas['Problem']
export type SignalName = Schemas['SignalRequest']['signal']
export type Encoding = 'utf8' | 'base64'

export const BINARY_SUBPROTOCOL = 'exec-gateway.v1.binary'
export const JSON_SUBPROTOCOL = 'exec-gateway.v1.json'
export const BEARER_SUBPROTOCOL_PREFIX = 'exec-gateway.bearer.'

export interface GatewayClientOptions {
  // e.g. http://127.0.0.1:8080
  baseUrl: string
  // One of the gateway's --api-token values; not needed by a loopback gateway without tokens.
  token?: string
  headers?: Record<string, string>
  fetch?: ClientOptions['fetch']
}

export interface StreamEventsOptions {
  // NDJSON by default; SSE carries the same events.
  format?: 'ndjson' | 'sse'
  // Resume: output before these byte offsets is not resent.
  stdoutOffset?: number
  stderrOffset?: number
  encoding?: Encoding
  // Aborting detaches the reader; it never kills the exec.
  signal?: AbortSignal
}

export type WaitResult =
  | { data: ExecResult, error?: never, response: Response }
  | { data?: never, error: Problem, response: Response }

export interface GatewayClient extends Client<paths> {
  // The exec's events until the final `exit` or `error`. A refused request (404 ...) throws a
  // GatewayProblemError.
  streamEvents: (execId: string, opts?: StreamEventsOptions) => AsyncIterable<ExecEvent>
  // runExec (POST .../execs/run): the ExecResult, or the exec's error as a problem.
  runAndWait: (sandboxId: string, req: ExecRequest, opts?: { encoding?: Encoding, signal?: AbortSignal }) => Promise<WaitResult>
}

export class GatewayProblemError extends Error {
  readonly problem: Problem
  readonly status: number

  constructor (problem: Problem, status: number) {
    super(`${status} ${problem.code}: ${problem.detail}`)
    this.name = 'GatewayProblemError'
    this.problem = problem
    this.status = status
  }
}

export function createGatewayClient (opts: GatewayClientOptions): GatewayClient {
  const headers: Record<string, string> = { ...opts.headers }
  if (opts.token !== undefined) headers.authorization = `Bearer ${opts.token}`
  const client = createClient<paths>({ baseUrl: opts.baseUrl, headers, ...(opts.fetch === undefined ? {} : { fetch: opts.fetch }) })

  async function * streamEvents (execId: string, so: StreamEventsOptions = {}): AsyncGenerator<ExecEvent> {
    const sse = so.format === 'sse'
    const { data, error, response } = await client.GET('/v1/execs/{execId}/events', {
      params: { path: { execId }, query: { stdoutOffset: so.stdoutOffset, stderrOffset: so.stderrOffset, encoding: so.encoding } },
      headers: { accept: sse ? 'text/event-stream' : 'application/x-ndjson' },
      parseAs: 'stream',
      ...(so.signal === undefined ? {} : { signal: so.signal })
    })
    if (error !== undefined) throw new GatewayProblemError(error, response.status)
    if (data === null) throw new Error(`GET /v1/execs/${execId}/events: ${response.status} without a body`)
    yield * (sse ? sseEvents(data) : ndjsonEvents(data))
  }

  async function runAndWait (sandboxId: string, req: ExecRequest, wo: { encoding?: Encoding, signal?: AbortSignal } = {}): Promise<WaitResult> {
    return await client.POST('/v1/sandboxes/{sandboxId}/execs/run', {
      params: { path: { sandboxId }, query: { encoding: wo.encoding } },
      body: req,
      ...(wo.signal === undefined ? {} : { signal: wo.signal })
    })
  }

  return { ...client, streamEvents, runAndWait }
}

// The byte offset right after an output event: where a reader that saw it resumes.
export function endOffset (ev: OutputEvent, encoding: Encoding = 'utf8'): number {
  if (encoding === 'utf8') return ev.offset + new TextEncoder().encode(ev.data).length
  const padding = ev.data.endsWith('==') ? 2 : ev.data.endsWith('=') ? 1 : 0
  return ev.offset + (ev.data.length / 4) * 3 - padding
}

export function isFinal (ev: ExecEvent): ev is FinalEvent {
  return ev.type === 'exit' || ev.type === 'error'
}

async function * lines (body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const reader = body.getReader()
  const decoder = new TextDecoder()
  let buffered = ''
  try {
    for (;;) {
      const { value, done } = await reader.read()
      if (done) break
      // stream: true holds back a character cut between chunks.
      buffered += decoder.decode(value, { stream: true })
      let nl: number
      while ((nl = buffered.indexOf('\n')) >= 0) {
        yield buffered.slice(0, nl).replace(/\r$/, '')
        buffered = buffered.slice(nl + 1)
      }
    }
    buffered += decoder.decode()
    if (buffered !== '') yield buffered
  } finally {
    // A consumer that stops early closes the request (which detaches, never kills).
    await reader.cancel().catch(() => {})
  }
}

async function * ndjsonEvents (body: ReadableStream<Uint8Array>): AsyncGenerator<ExecEvent> {
  for await (const line of lines(body)) {
    if (line.trim() !== '') yield JSON.parse(line) as ExecEvent
  }
}

// Each SSE event's data is one ExecEvent; the event name and id repeat what it says.
async function * sseEvents (body: ReadableStream<Uint8Array>): AsyncGenerator<ExecEvent> {
  let data: string[] = []
  for await (const line of lines(body)) {
    if (line === '') {
      if (data.length > 0) yield JSON.parse(data.join('\n')) as ExecEvent
      data = []
    } else if (line.startsWith('data:')) {
      data.push(line.slice(line.startsWith('data: ') ? 6 : 5))
    }
  }
  if (data.length > 0) yield JSON.parse(data.join('\n')) as ExecEvent
}
