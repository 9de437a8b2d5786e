// Hostile input against a live gateway (in-process gateway, a real supervisor process, the
// embedded ssh2 daemon or OpenSSH's sshd, real commands): random and adversarial bodies, query
// strings, paths, headers and WebSocket frames must get a 2xx or a 4xx, never a 5xx or a crash;
// refusals are problem+json; every accepted exec ends properly; execs that other clients run
// meanwhile (the canaries) are unaffected; and argv built to break shell quoting reaches the
// process byte for byte, through both daemons.
//
// FUZZ_RUNS_SCALE=n multiplies every property's runs; FUZZ_SEED=s replays a run (fast-check
// prints the seed and path of a failure; the seed is also printed once at the start).
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import fc from 'fast-check'
import WebSocket from 'ws'
import { intEnv } from '../helpers/env.js'
import { startGateway, type TestGateway } from '../helpers/gateway.js'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import { api } from '../helpers/api.js'
import { waitFor } from '../helpers/wait.js'
import { rawRequest, targetOf, type RawHeader, type RawRequest, type RawResponse } from './raw-http.js'
import { startCanary, type Canary } from './canary.js'
import { assembleCommand, MAX_COMMAND_LINE_BYTES } from '../../src/execs/command.js'
import {
  MiB, SHELL_META, metaString, nearValidRequest, rawJsonText, sanitizeBody, weirdString, weirdValue
} from './arbitraries.js'

const SCALE = intEnv('FUZZ_RUNS_SCALE', 1, 1, 1000)
const SEED = seedFromEnv()

function seedFromEnv (): number {
  const raw = process.env.FUZZ_SEED
  if (raw === undefined || raw === '') return (Date.now() ^ Math.floor(Math.random() * 0x7fffffff)) | 0
  if (!/^-?\d+$/.test(raw)) throw new Error(`FUZZ_SEED must be an integer, got ${JSON.stringify(raw)}`)
  return Number(raw) | 0
}

// numRuns per property at scale 1; the file's total is their sum, 4,000 cases.
const RUNS = {
  bodies: 1000,
  rawBodies: 400,
  queriesAndPaths: 800,
  headers: 600,
  wsFrames: 400,
  argvEmbedded: 400,
  argvOpenssh: 400
} as const

function params (runs: number): fc.Parameters<unknown> {
  return { numRuns: runs * SCALE, seed: SEED }
}

// Generous: a failure shrinks against the live gateway too.
function budget (runs: number, msPerRun: number): number {
  return 60_000 + runs * SCALE * msPerRun
}

// Every line the contract allows runs: lines longer than one SSH packet are staged as a file
// first (INLINE_COMMAND_MAX_BYTES in src/execs/manager.ts). This bound only keeps bodies over the
// limit away from the live sandbox; validation answers them all the same.
const RUNNABLE_LINE_BYTES = MAX_COMMAND_LINE_BYTES

// Whether a request body's command line (exec tag included) is one the sandboxes can run today;
// bodies whose line is longer go to a sandbox that never connected, where validation still
// answers them in full (400, or 404 sandbox_not_found once valid).
function runnable (text: string): boolean {
  let v: any
  try { v = JSON.parse(text) } catch { return true }
  if (typeof v !== 'object' || v === null || !Array.isArray(v.command) || !v.command.every((a: unknown) => typeof a === 'string')) return true
  const env = typeof v.env === 'object' && v.env !== null && !Array.isArray(v.env) && Object.values(v.env).every((e) => typeof e === 'string') ? v.env : undefined
  const workdir = typeof v.workdir === 'string' ? v.workdir : undefined
  try {
    return Buffer.byteLength(assembleCommand({ command: v.command, env, workdir, execId: 'ex_' + 'x'.repeat(16) })) <= RUNNABLE_LINE_BYTES
  } catch {
    return true
  }
}

const NEVER_CONNECTED = 'fuzz-never-connected'
const SANDBOX = 'fuzz-embedded'
const SANDBOX_OPENSSH = 'fuzz-openssh'
const API_TOKEN = 'fuzz-token-☃-not-secret'
const SIGNALS = ['TERM', 'KILL', 'INT', 'HUP', 'QUIT', 'USR1', 'USR2']
const WS_BINARY = 'exec-gateway.v1.binary'
// Not ended: a refused or vanished client leaves the exec as it was (a fresh one may not have
// started yet).
const LIVE = ['pending', 'running']

// ---------------------------------------------------------------------------------------------
// Answers

function describeRes (res: RawResponse): string {
  return `${res.status} ${res.headers['content-type'] ?? '(no content-type)'} ${res.text.slice(0, 300)}`
}

// Never a 5xx; every 4xx is a problem (RFC 9457) with a string code, including the refusals
// made before any route runs (Node's parser, Fastify's router, Expect, CONNECT, no Host).
function expectAnswer (res: RawResponse, what: string, opts: { method?: string }): void {
  expect(res.status, `${what}: ${describeRes(res)}`).toBeGreaterThanOrEqual(100)
  expect(res.status, `${what}: ${describeRes(res)}`).toBeLessThan(500)
  if (res.status < 400) return
  // A HEAD answer has no body to carry the problem.
  if (opts.method === 'HEAD') return
  expect(res.headers['content-type'] ?? '', `${what}: ${describeRes(res)}`).toMatch(/^application\/problem\+json/)
  expect(typeof res.json?.code, `${what}: ${describeRes(res)}`).toBe('string')
  expect(res.json.status, `${what}: ${describeRes(res)}`).toBe(res.status)
  expect(typeof res.json.type, `${what}: ${describeRes(res)}`).toBe('string')
  expect(typeof res.json.title, `${what}: ${describeRes(res)}`).toBe('string')
  expect(typeof res.json.detail, `${what}: ${describeRes(res)}`).toBe('string')
}

async function waitEnded (baseUrl: string, execId: string): Promise<any> {
  let rec: any
  await waitFor(async () => {
    rec = (await api(baseUrl, 'GET', `/v1/execs/${execId}`)).body
    return rec.status === 'exited' || rec.status === 'failed'
  }, { timeoutMs: 15_000, intervalMs: 10, description: `exec ${execId} ends` })
  return rec
}

// An accepted exec ran to its end with a real exit status (these commands all end by themselves).
function expectExited (rec: any, what: string): void {
  expect(rec.status, `${what}: ${JSON.stringify(rec).slice(0, 500)}`).toBe('exited')
  expect(rec.error, what).toBeNull()
  expect(Number.isInteger(rec.exitCode) || typeof rec.signal === 'string', `${what}: ${JSON.stringify(rec).slice(0, 500)}`).toBe(true)
}

// 201 → the exec must end; 200 (wait=true) → it has ended.
async function expectAcceptedEnds (baseUrl: string, res: RawResponse, what: string): Promise<void> {
  if (res.status === 201) {
    expect(res.headers.location, what).toBe(`/v1/execs/${res.json.id as string}`)
    expectExited(await waitEnded(baseUrl, res.json.id), what)
  } else if (res.status === 200) {
    expectExited(res.json, what)
    expect(typeof res.json.stdout, what).toBe('string')
  } else if (res.status < 400) {
    throw new Error(`${what}: unexpected success ${describeRes(res)}`)
  }
}

// The events of a finished exec: NDJSON lines or SSE blocks, ending with its one final event.
// SSE ids are "<stdout offset>-<stderr offset>", two whole numbers (docs/api.md §4); the
// final event's id ends in "-end".
function expectEventsBody (res: RawResponse, final: unknown, what: string): void {
  const ct = res.headers['content-type'] ?? ''
  let events: any[]
  if (ct.startsWith('text/event-stream')) {
    const blocks = res.text.split('\n\n').filter((b) => b.trim() !== '')
    for (const b of blocks) {
      const id = b.split('\n').find((l) => l.startsWith('id: '))
      expect(id, `${what}: ${b}`).toBeDefined()
      const m = /^id: (\d+)-(\d+)(-end)?$/.exec(id!)
      expect(m?.[3] !== undefined, `${what}: only the final event's id ends in -end: ${b}`).toBe(/^event: (exit|error)$/m.test(b))
      expect(m, `${what}: SSE ${id!}`).not.toBeNull()
      expect(Number.isSafeInteger(Number(m![1])) && Number.isSafeInteger(Number(m![2])), `${what}: SSE ${id!}`).toBe(true)
    }
    events = blocks.map((b) => JSON.parse(b.split('\n').find((l) => l.startsWith('data: '))!.slice(6)))
  } else {
    expect(ct, what).toMatch(/^application\/x-ndjson/)
    events = res.text.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l))
  }
  expect(events.at(-1), what).toEqual(final)
  expect(events.filter((e) => e.type === 'exit' || e.type === 'error'), what).toHaveLength(1)
}

const protoSnapshot = Object.getOwnPropertyNames(Object.prototype).sort().join()

function expectNoPrototypePollution (what: string): void {
  expect(Object.getOwnPropertyNames(Object.prototype).sort().join(), what).toBe(protoSnapshot)
  expect(({} as Record<string, unknown>).polluted, what).toBeUndefined()
}

async function expectHealthy (sb: TestSandbox, canary: Canary): Promise<void> {
  expect((await api(sb.g.publicUrl, 'GET', '/healthz')).status).toBe(200)
  expect(sb.sup.proc.exitCode, `supervisor exited:\n${sb.sup.output().slice(-2000)}`).toBeNull()
  expect(sb.g.gw.registry.get(sb.id)?.session, 'sandbox still connected').toBeDefined()
  expectNoPrototypePollution('after the property')
  await canary.check()
}

// ---------------------------------------------------------------------------------------------
// Generators for requests

const jsonCt: RawHeader = ['Content-Type', 'application/json']

// A query string built from parameter names and values the routes do and do not know, with
// odd separators, repeats, percent-escapes (broken ones too) and raw bytes.
const queryKey = fc.oneof(
  fc.constantFrom('stdoutOffset', 'stderrOffset', 'encoding', 'wait', 'sandboxId', 'status', '__proto__', 'constructor', 'toString', 'hasOwnProperty', 'stdoutOffset[]', 'a[b]', 'wait[0]', '', '%00', '%', 'x%zz', 'WAIT', 'encoding%00'),
  fc.webSegment()
)
const queryValue = fc.oneof(
  fc.constantFrom('0', '1', '-1', '1.5', '1e3', '1e23', '1e308', '1e400', '9007199254740991', '9007199254740992', '9007199254740993', '18446744073709551616', '0x10', '00', '', ' ', '%20', '+', 'NaN', 'Infinity', '-0', 'true', 'false', 'TRUE', 'yes', 'base64', 'utf8', 'hex', 'utf-8', 'BASE64', 'binary', 'exited', 'running', 'pending', 'failed', '%', '%zz', '%ff', '%00', '%ED%A0%80', '%C0%AE', '😀', 'a&b', '1'.repeat(400), '[]', '{}', 'null'),
  fc.string({ unit: 'binary', maxLength: 12 }).map(encodeURIComponent),
  fc.string({ unit: 'grapheme-ascii', maxLength: 12 })
)
const queryString = fc.tuple(
  fc.array(fc.tuple(queryKey, fc.option(queryValue, { nil: undefined })), { maxLength: 5 }),
  fc.constantFrom('&', '&', '&', ';', '&&'),
  fc.constantFrom('?', '?', '?', '??', '?&', '')
).map(([pairs, sep, lead]) => pairs.length === 0 && lead === '' ? '' : lead + pairs.map(([k, v]) => v === undefined ? k : `${k}=${v}`).join(sep))

function segmentArb (ids: string[]): fc.Arbitrary<string> {
  return fc.oneof(
    { weight: 4, arbitrary: fc.constantFrom('v1', 'execs', 'sandboxes', ...ids, 'events', 'stream', 'signal', 'healthz', 'metrics', 'openapi.json', 'docs', 'V1', 'v2') },
    { weight: 3, arbitrary: fc.constantFrom('..', '.', '', '%', '%2', '%zz', '%2e%2e', '%2E', '%2F', '%2f..%2f', '%00', '%ff', '%C0%AE', '%E2%82', '%ED%A0%80', '%F0%9F%98%80', 'ü', '😀', '\u202e', ';', '~', '*', 'a;b=c', 'a'.repeat(300), '%61'.repeat(100), 'ex_%00', '\\', '..\\..', ' ', '\t', '#frag', '?') },
    { weight: 2, arbitrary: fc.webSegment() },
    { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 10 }).map(encodeURIComponent) },
    { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 6 }) }
  )
}

const METHODS = ['GET', 'GET', 'GET', 'POST', 'POST', 'DELETE', 'PUT', 'PATCH', 'HEAD', 'OPTIONS', 'TRACE', 'PROPFIND', 'get', 'G ET', 'CONNECT'] as const

// ---------------------------------------------------------------------------------------------

describe('hostile input against a gateway with the embedded SSH daemon', () => {
  let sb: TestSandbox
  let base: string
  let target: ReturnType<typeof targetOf>
  let canary: Canary
  let tokenGw: TestGateway
  // A finished exec with output on both streams, read by the events and header properties.
  let doneId: string
  let doneFinal: unknown
  // A finished exec the random paths may find, signal or DELETE.
  let victimId: string

  beforeAll(async () => {
    console.log(`[fuzz] seed ${SEED} (replay: FUZZ_SEED=${SEED}), runs scale ${SCALE}`)
    sb = await startSandbox('embedded', SANDBOX)
    base = sb.g.publicUrl
    target = targetOf(base)
    tokenGw = await startGateway({ apiTokens: [API_TOKEN] })
    canary = await startCanary(base, SANDBOX)
    const done = await api(base, 'POST', `/v1/sandboxes/${SANDBOX}/execs?wait=true`, { command: ['sh', '-c', "printf 'out ü\\n'; printf 'err 😀\\n' >&2; exit 4"] })
    expect(done.status).toBe(200)
    doneId = done.body.id
    doneFinal = { type: 'exit', exitCode: 4, signal: null, timedOut: false }
    const victim = await api(base, 'POST', `/v1/sandboxes/${SANDBOX}/execs?wait=true`, { command: ['true'] })
    victimId = victim.body.id
  })

  afterAll(async () => {
    await tokenGw?.close()
    await sb?.close()
  })

  it(`answers random and adversarial JSON bodies with 2xx or a 4xx problem (${RUNS.bodies} runs)`, async () => {
    const body = fc.oneof(
      { weight: 6, arbitrary: nearValidRequest.map((r) => JSON.stringify(sanitizeBody(r))) },
      { weight: 2, arbitrary: fc.jsonValue({ maxDepth: 4, stringUnit: 'binary' }).map((v) => JSON.stringify(sanitizeBody(v))) },
      { weight: 1, arbitrary: fc.anything({ maxDepth: 3, withNullPrototype: true, withObjectString: true, key: fc.oneof(weirdString, fc.constantFrom('__proto__', 'constructor', 'prototype', 'command', 'env')) }).map((v) => JSON.stringify(sanitizeBody(v)) ?? 'undefined') },
      { weight: 3, arbitrary: rawJsonText }
    )
    const query = fc.constantFrom('', '?wait=true', '?wait=true&encoding=base64', '?wait=false', '?encoding=utf8')
    await fc.assert(fc.asyncProperty(body, query, async (text, q) => {
      const sandbox = runnable(text) ? SANDBOX : NEVER_CONNECTED
      const res = await rawRequest(target, { method: 'POST', path: `/v1/sandboxes/${sandbox}/execs${q}`, headers: [jsonCt], body: text })
      const what = `POST /v1/sandboxes/${sandbox}/execs${q} ${text.slice(0, 300)}`
      if (sandbox === NEVER_CONNECTED) expect(res.status, `${what}: ${describeRes(res)}`).toBeGreaterThanOrEqual(400)
      expectAnswer(res, what, {})
      await expectAcceptedEnds(base, res, what)
      expectNoPrototypePollution(what)
    }), params(RUNS.bodies))
    await expectHealthy(sb, canary)
  }, budget(RUNS.bodies, 60))

  it(`answers raw bytes and wrong content types with 2xx or a 4xx problem (${RUNS.rawBodies} runs)`, async () => {
    const valid = JSON.stringify({ command: ['true', 'ü'] })
    const body = fc.oneof(
      fc.uint8Array({ maxLength: 200 }).map((b) => Buffer.from(b)),
      fc.constant(Buffer.from(valid)),
      fc.constant(Buffer.from(valid, 'utf16le')),
      fc.constant(Buffer.concat([Buffer.from([0xfe, 0xff]), Buffer.from(valid, 'utf16le')])),
      fc.constant(Buffer.from(valid, 'latin1')),
      fc.constant(Buffer.from('{"command":["true","\xff\xfe"]}', 'latin1')),
      fc.constant(Buffer.from([0xef, 0xbb, 0xbf, ...Buffer.from(valid)])),
      fc.tuple(fc.nat(valid.length), fc.uint8Array({ maxLength: 20 })).map(([cut, junk]) => Buffer.concat([Buffer.from(valid.slice(0, cut)), Buffer.from(junk)])),
      fc.constant(Buffer.alloc(0)),
      fc.constant(Buffer.from('command=true&command=x')),
      fc.constant(Buffer.from('--x\r\nContent-Disposition: form-data; name="command"\r\n\r\ntrue\r\n--x--\r\n'))
    )
    const contentType = fc.oneof(
      fc.constantFrom('application/json', 'application/json; charset=utf-8', 'application/JSON', 'Application/Json', 'application/json; charset=utf-16', 'application/json; charset=latin1', 'application/json;', 'application/json ; charset="utf-8"', 'application/json, text/plain',
        'text/plain', 'text/json', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/problem+json', 'application/json-seq', 'application/x-ndjson', 'application/octet-stream',
        '*/*', 'application/*', '', ';', 'application/', '/json', 'json', 'application/json\t', 'application/jsonx', 'application/vnd.api+json'),
      fc.string({ unit: 'grapheme-ascii', maxLength: 30 }),
      fc.constant(undefined)
    )
    const query = fc.constantFrom('', '?wait=true', '?wait=true&encoding=base64')
    await fc.assert(fc.asyncProperty(body, contentType, query, async (bytes, ct, q) => {
      const res = await rawRequest(target, { method: 'POST', path: `/v1/sandboxes/${SANDBOX}/execs${q}`, headers: ct === undefined ? [] : [['Content-Type', ct]], body: bytes })
      const what = `POST${q} content-type ${JSON.stringify(ct)} body ${JSON.stringify(bytes.toString('latin1').slice(0, 200))}`
      expectAnswer(res, what, {})
      await expectAcceptedEnds(base, res, what)
    }), params(RUNS.rawBodies))
    await expectHealthy(sb, canary)
  }, budget(RUNS.rawBodies, 60))

  it(`answers random query strings and paths with 2xx or 4xx (${RUNS.queriesAndPaths} runs)`, async () => {
    type Req = { kind: 'list' | 'get' | 'events' | 'stream' | 'create' | 'random', req: RawRequest }
    const reqArb: fc.Arbitrary<Req> = fc.oneof(
      queryString.map((q): Req => ({ kind: 'list', req: { method: 'GET', path: `/v1/execs${q}` } })),
      fc.tuple(fc.oneof(fc.constant(doneId), segmentArb([victimId, SANDBOX])), queryString).map(([id, q]): Req => ({ kind: 'get', req: { method: 'GET', path: `/v1/execs/${id}${q}` } })),
      fc.tuple(queryString, fc.constantFrom(undefined, 'text/event-stream', 'application/x-ndjson')).map(([q, accept]): Req => ({ kind: 'events', req: { method: 'GET', path: `/v1/execs/${doneId}/events${q}`, headers: accept === undefined ? [] : [['Accept', accept]] } })),
      queryString.map((q): Req => ({ kind: 'stream', req: { method: 'GET', path: `/v1/execs/${doneId}/stream${q}` } })),
      queryString.map((q): Req => ({ kind: 'create', req: { method: 'POST', path: `/v1/sandboxes/${SANDBOX}/execs${q}`, headers: [jsonCt], body: '{"command":["true"]}' } })),
      fc.tuple(fc.constantFrom(...METHODS), fc.array(segmentArb([victimId, SANDBOX]), { minLength: 0, maxLength: 6 }), fc.option(queryString, { nil: '' }), fc.constantFrom('/', '/', '/', '//', '', '/./', '\\'))
        .map(([method, segs, q, lead]): Req => ({ kind: 'random', req: { method, path: lead + segs.join('/') + q } }))
    )
    await fc.assert(fc.asyncProperty(reqArb, async ({ kind, req }) => {
      const res = await rawRequest(target, req)
      const what = `${kind}: ${req.method} ${String(req.path).slice(0, 300)}`
      expectAnswer(res, what, { method: req.method })
      if (kind === 'create') await expectAcceptedEnds(base, res, what)
      if (kind === 'events' && res.status === 200) expectEventsBody(res, doneFinal, what)
      if (kind !== 'random' && kind !== 'create') expect(res.status === 200 || res.status >= 400, `${what}: ${describeRes(res)}`).toBe(true)
      if (kind === 'random' && (res.status === 200 || res.status === 201) && req.method === 'POST') await expectAcceptedEnds(base, res, what)
    }), params(RUNS.queriesAndPaths))
    await expectHealthy(sb, canary)
  }, budget(RUNS.queriesAndPaths, 60))

  it(`answers random headers with 2xx or 4xx, with and without --api-token (${RUNS.headers} runs)`, async () => {
    const tokenTarget = targetOf(tokenGw.publicUrl)
    const port = target.port
    const host = fc.oneof(
      { weight: 3, arbitrary: fc.constant(undefined) },
      { weight: 3, arbitrary: fc.constantFrom(`localhost:${port}`, 'localhost', `127.0.0.1:${port}`, '127.0.0.1', `127.1.2.3:${port}`, `[::1]:${port}`, '[::1]', '::1', 'LOCALHOST', 'LocalHost:1', 'localhost.', 'localhost:', 'localhost:99999', 'localhost:-1', '127.0.0.1.nip.io', 'localhost.evil.com', 'evil.com', 'evil.com:80', '', ' ', '[::ffff:127.0.0.1]', '[::ffff:7f00:1]', '0.0.0.0', '127.0.0.1@evil.com', 'user@localhost', 'localhost/x', 'ⓛocalhost', '127.0.0.1, evil.com') },
      { weight: 1, arbitrary: fc.constant(null) },
      { weight: 1, arbitrary: fc.string({ unit: 'grapheme-ascii', maxLength: 20 }) }
    )
    const headerValue = fc.oneof(
      { weight: 4, arbitrary: fc.string({ unit: 'grapheme-ascii', maxLength: 40 }) },
      { weight: 2, arbitrary: fc.string({ unit: 'grapheme', maxLength: 20 }) },
      { weight: 1, arbitrary: fc.constantFrom('', ' ', '\t', 'a\u0000b', 'a\rb', '\u007f', 'x'.repeat(8000), 'x'.repeat(20000)) }
    )
    const b64 = (s: string): string => Buffer.from(s).toString('base64url')
    const header: fc.Arbitrary<RawHeader> = fc.oneof(
      fc.tuple(fc.constant('Accept'), fc.oneof(fc.constantFrom('text/event-stream', 'application/x-ndjson', '*/*', 'text/event-stream;q=0', 'application/json, text/event-stream', 'text/*', '', 'application/problem+json', 'text/html'), headerValue)),
      fc.tuple(fc.constant('Content-Type'), fc.oneof(fc.constantFrom('application/json', 'text/plain', 'application/json; charset=utf-16', ''), headerValue)),
      fc.tuple(fc.constant('Last-Event-ID'), fc.oneof(fc.constantFrom('1-2', '0-0', '3-0', '0-3', '99999999999999999999999-0', '0-99999999999999999999999', '9007199254740993-9007199254740993', '1e3-1', '-1-1', '1-', '-', 'a-b', '01-02', ' 1-2', '1-2-3', '١-٢'), headerValue)),
      fc.tuple(fc.constant('Origin'), fc.oneof(fc.constantFrom(`http://127.0.0.1:${port}`, `http://localhost:${port}`, 'null', 'http://evil.com', 'https://127.0.0.1', '', 'file://'), headerValue)),
      fc.tuple(fc.constant('Authorization'), fc.oneof(fc.constantFrom(`Bearer ${API_TOKEN}`, 'Bearer', 'Bearer ', 'bearer x', 'Basic dXNlcjpwYXNz', `Bearer ${API_TOKEN}x`, `Bearer  ${API_TOKEN} `, 'Bearer \u00ff', 'Bearer ' + 'x'.repeat(10000)), headerValue)),
      fc.tuple(fc.constant('Sec-WebSocket-Protocol'), fc.oneof(fc.constantFrom(WS_BINARY, `exec-gateway.bearer.${b64(API_TOKEN)}`, `exec-gateway.bearer.${b64(API_TOKEN)}, ${WS_BINARY}`, 'exec-gateway.bearer.', 'exec-gateway.bearer.!!!', 'exec-gateway.bearer.%%%', ',,,', 'a b', 'a,a', WS_BINARY + ',' + WS_BINARY, 'x'.repeat(5000)), headerValue)),
      fc.tuple(fc.constantFrom('Upgrade', 'Connection', 'Sec-WebSocket-Key', 'Sec-WebSocket-Version', 'Sec-WebSocket-Extensions'), fc.oneof(fc.constantFrom('websocket', 'WebSocket', 'h2c', 'Upgrade', 'upgrade, keep-alive', 'dGhlIHNhbXBsZSBub25jZQ==', 'short', '13', '8', '12', '', 'permessage-deflate', 'permessage-deflate; client_max_window_bits=99'), headerValue)),
      fc.tuple(fc.constantFrom('X-Forwarded-For', 'X-Forwarded-Host', 'Forwarded', 'Cookie', 'Expect', 'Range', 'If-None-Match', 'Accept-Encoding', 'Content-Encoding', 'Transfer-Encoding', 'TE', 'Via', 'Max-Forwards'), fc.oneof(fc.constantFrom('100-continue', 'bytes=0-1', 'gzip', 'chunked', 'identity', 'evil.com', '*'), headerValue)),
      fc.tuple(fc.stringMatching(/^[A-Za-z][A-Za-z0-9-]{0,20}$/), headerValue),
      fc.tuple(fc.constantFrom('', ' X', 'X Y', 'X:Y', 'ü'), headerValue)
    )
    const upgradeHeaders: RawHeader[] = [['Connection', 'Upgrade'], ['Upgrade', 'websocket'], ['Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ=='], ['Sec-WebSocket-Version', '13']]
    const endpoint = fc.constantFrom(
      { method: 'GET', path: '/healthz' },
      { method: 'GET', path: '/v1/execs' },
      { method: 'GET', path: '/v1/sandboxes' },
      { method: 'GET', path: `/v1/sandboxes/${SANDBOX}` },
      { method: 'GET', path: '/v1/execs/DONE' },
      { method: 'GET', path: '/v1/execs/DONE/events' },
      { method: 'GET', path: '/v1/execs/DONE/events?encoding=base64' },
      { method: 'GET', path: '/v1/execs/DONE/stream', upgrade: true },
      { method: 'GET', path: '/v1/execs/DONE/stream?encoding=base64', upgrade: true },
      { method: 'GET', path: '/v1/execs/nope/stream', upgrade: true },
      { method: 'POST', path: `/v1/sandboxes/${SANDBOX}/execs`, body: '{"command":["true"]}' },
      { method: 'POST', path: `/v1/sandboxes/${SANDBOX}/execs?wait=true`, body: '{"command":["true"]}' },
      { method: 'POST', path: '/v1/execs/DONE/signal', body: '{"signal":"TERM"}' },
      { method: 'GET', path: '/metrics' }
    )
    const caseArb = fc.record({
      withToken: fc.boolean(),
      endpoint,
      upgrade: fc.boolean(),
      host,
      headers: fc.array(header, { maxLength: 6 }),
      jsonCt: fc.boolean()
    })
    await fc.assert(fc.asyncProperty(caseArb, async (c) => {
      const e = c.endpoint as { method: string, path: string, body?: string, upgrade?: boolean }
      const path = e.path.replace('DONE', doneId)
      const headers: RawHeader[] = []
      if (e.upgrade === true && c.upgrade) headers.push(...upgradeHeaders)
      if (e.body !== undefined && c.jsonCt) headers.push(jsonCt)
      headers.push(...c.headers)
      const req: RawRequest = { method: e.method, path, headers, body: e.body, host: c.host }
      const res = await rawRequest(c.withToken ? tokenTarget : target, req)
      const what = `${c.withToken ? 'token gateway' : 'loopback gateway'} ${e.method} ${path} host ${JSON.stringify(c.host)} headers ${JSON.stringify(headers).slice(0, 600)}`
      expectAnswer(res, what, { method: e.method })
      // An upgrade that passes the guard is taken (on other routes @fastify/websocket closes it
      // at once); the socket is dropped here.
      if (res.status === 101) {
        expect(res.headers.upgrade?.toLowerCase(), what).toBe('websocket')
        return
      }
      if (!c.withToken && e.method === 'POST' && path.includes('/execs') && !path.includes('/signal')) await expectAcceptedEnds(base, res, what)
      if (!c.withToken && res.status === 200 && path.endsWith('/events')) expectEventsBody(res, doneFinal, what)
      if (!c.withToken && res.status === 200 && path.endsWith('/events?encoding=base64')) expectEventsBody(res, doneFinal, what)
    }), params(RUNS.headers))
    expect((await api(tokenGw.publicUrl, 'GET', '/healthz')).status).toBe(200)
    await expectHealthy(sb, canary)
  }, budget(RUNS.headers, 60))

  it(`keeps interactive execs and itself up under random WebSocket frames (${RUNS.wsFrames} runs)`, async () => {
    let execId: string | undefined
    const ensureTarget = async (): Promise<{ id: string, offset: number }> => {
      if (execId !== undefined) {
        const rec = (await api(base, 'GET', `/v1/execs/${execId}`)).body
        if (rec.status === 'running' || rec.status === 'pending') return { id: execId, offset: rec.stdoutBytes }
      }
      const r = await api(base, 'POST', `/v1/sandboxes/${SANDBOX}/execs`, { command: ['cat'], interactive: true })
      expect(r.status).toBe(201)
      execId = r.body.id as string
      return { id: execId, offset: 0 }
    }
    let caseNo = 0
    await fc.assert(fc.asyncProperty(wsCase, async (c) => {
      const { id, offset } = await ensureTarget()
      const marker = Buffer.from(`@@marker-${caseNo++}-${Math.random().toString(36).slice(2)}@@`)
      const outcome = modelFrames(c.frames)
      const query = `?stdoutOffset=${offset}${c.encoding === undefined ? '' : `&encoding=${c.encoding}`}`
      const ws = new WebSocket(`${base.replace(/^http/, 'ws')}/v1/execs/${id}/stream${query}`, c.binary ? [WS_BINARY] : [])
      const out: Buffer[] = []
      const events: any[] = []
      let sawMarker = false
      const result = await new Promise<{ code: number, reason: string }>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`websocket case timed out; frames ${describeFrames(c.frames)}`)), 20_000)
        ws.on('unexpected-response', (_q, r) => { clearTimeout(timer); reject(new Error(`upgrade refused: ${r.statusCode}`)) })
        ws.on('error', () => {})
        ws.on('open', () => {
          for (const f of c.frames) sendFrame(ws, f)
          ws.send(JSON.stringify({ type: 'stdin', data: `\n${marker.toString()}\n` }))
          if (c.abort) { ws.terminate() }
        })
        ws.on('message', (data, isBinary) => {
          const buf = Buffer.from(data as Buffer)
          if (isBinary) {
            if (buf[0] === 1) out.push(buf.subarray(1))
          } else {
            const ev = JSON.parse(buf.toString())
            events.push(ev)
            if (ev.type === 'stdout') out.push(c.encoding === 'base64' ? Buffer.from(ev.data, 'base64') : Buffer.from(ev.data, 'utf8'))
          }
          if (!sawMarker && Buffer.concat(out).includes(marker)) { sawMarker = true; ws.close(1000) }
        })
        ws.on('close', (code, reason) => { clearTimeout(timer); resolve({ code, reason: reason.toString() }) })
      })
      const what = `frames ${describeFrames(c.frames)} → close ${result.code} ${result.reason}, final ${JSON.stringify(events.filter((e) => e.type === 'exit' || e.type === 'error'))} (model ${JSON.stringify(outcome)})`
      const finals = events.filter((e) => e.type === 'exit' || e.type === 'error')
      expect(finals.filter((e) => e.type === 'error'), what).toHaveLength(0)
      // ws refuses an oversize or non-UTF-8 message itself (1009, 1007), even one that follows a
      // refusal; its close frame reaches the client (the gateway's errorHandler never terminates).
      const code = (expected: number): void => { expect(result.code, what).toBe(expected) }
      if (c.abort) {
        // The client vanished mid-conversation: whatever it managed to send, a refusal or a
        // disconnect never ends the exec. An eof or signal may or may not have got through: that
        // exec is killed and forgotten, so that it cannot end under the next case.
        if (!outcome.ends) expect(LIVE, what).toContain((await api(base, 'GET', `/v1/execs/${id}`)).body.status)
        else { await api(base, 'DELETE', `/v1/execs/${id}`); execId = undefined }
      } else if (outcome.refusal !== undefined) {
        // The first bad frame closes the socket with its code; frames after it are ignored. An
        // eof or signal before it may have ended the exec first (then 1000 after the exit).
        if (outcome.ends) {
          expectExited(await waitEnded(base, id), what)
          if (result.code !== 1000) code(outcome.refusal)
        } else {
          code(outcome.refusal)
          expect(sawMarker, what).toBe(false)
          expect(LIVE, what).toContain((await api(base, 'GET', `/v1/execs/${id}`)).body.status)
        }
      } else if (outcome.ends) {
        // An eof or a signal ends the exec: the socket closes with 1000 after the exit event.
        // A signal is delivered on a side channel, so cat may still echo the marker first (then
        // this client closed the socket itself).
        expectExited(await waitEnded(base, id), what)
        expect(result.code, what).toBe(1000)
        if (!sawMarker) {
          expect(finals, what).toHaveLength(1)
          expect(events.at(-1).type, what).toBe('exit')
        }
      } else {
        expect(sawMarker, what).toBe(true)
        expect(result.code, what).toBe(1000)
        expect(finals, what).toHaveLength(0)
        expect((await api(base, 'GET', `/v1/execs/${id}`)).body.status, what).toBe('running')
      }
    }), params(RUNS.wsFrames))
    if (execId !== undefined) await api(base, 'DELETE', `/v1/execs/${execId}`)
    await expectHealthy(sb, canary)
  }, budget(RUNS.wsFrames, 200))

  it(`delivers shell-hostile argv and env byte for byte through the embedded daemon (${RUNS.argvEmbedded} runs)`, async () => {
    await fc.assert(fc.asyncProperty(argvCase, async (c) => { await expectArgvExact(base, SANDBOX, c) }), params(RUNS.argvEmbedded))
    await expectHealthy(sb, canary)
  }, budget(RUNS.argvEmbedded, 150))

  // Regressions: inputs the properties above found, each failing before its fix.

  it('refuses lone surrogates, which UTF-8 cannot carry, instead of sending U+FFFD', async () => {
    // Was 200: the process received EF BF BD for "\ud800".
    for (const [body, field] of [
      ['{"command":["printf","%s","\\ud800"]}', 'command[2]'],
      ['{"command":["true","a\\udc00b"]}', 'command[1]'],
      ['{"command":["true"],"env":{"A":"\\udfff\\ud800"}}', 'env.A'],
      ['{"command":["true"],"workdir":"/tmp/\\ud800"}', 'workdir'],
      ['{"command":["cat"],"stdin":"x\\ud83d"}', 'stdin']
    ] as const) {
      const res = await rawRequest(target, { method: 'POST', path: `/v1/sandboxes/${SANDBOX}/execs?wait=true`, headers: [jsonCt], body })
      expectAnswer(res, body, {})
      expect(res.status, body).toBe(400)
      expect(res.json.code).toBe('invalid_argument')
      expect(res.json.detail, body).toContain(field)
    }
    // A well-formed pair is one character and passes untouched.
    const ok = await api(base, 'POST', `/v1/sandboxes/${SANDBOX}/execs?wait=true&encoding=base64`, { command: ['printf', '%s', '\ud83d\ude00'] })
    expect(Buffer.from(ok.body.stdout, 'base64').toString('hex')).toBe('f09f9880')
  })

  it('answers a malformed upgrade on a route that is not a WebSocket with a problem (seed 935545915)', async () => {
    const res = await rawRequest(target, { method: 'GET', path: '/healthz', headers: [['Upgrade', 'websocket'], ['Connection', 'Upgrade']] })
    expectAnswer(res, 'upgrade without a key on /healthz', {})
    expect(res.status).toBe(400)
    expect(res.json.detail).toMatch(/Sec-WebSocket-Key/)
  })

  it('answers a plain GET on the WebSocket route with a problem, not an empty 404', async () => {
    const res = await rawRequest(target, { method: 'GET', path: `/v1/execs/${doneId}/stream` })
    expectAnswer(res, 'plain GET /stream', {})
    expect(res.status).toBe(400)
    expect(res.json.detail).toMatch(/WebSocket/)
    const unknown = await rawRequest(target, { method: 'GET', path: '/v1/execs/ex_nope/stream' })
    expect(unknown.status).toBe(404)
    expect(unknown.json.code).toBe('exec_not_found')
  })

  it('answers a malformed WebSocket handshake with a problem, not ws\'s text/html 400', async () => {
    const good: RawHeader[] = [['Connection', 'Upgrade'], ['Upgrade', 'websocket'], ['Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ=='], ['Sec-WebSocket-Version', '13']]
    const swap = (name: string, value: string | undefined): RawHeader[] => [...good.filter(([n]) => n !== name), ...(value === undefined ? [] : [[name, value] as RawHeader])]
    const cases: Array<[RawHeader[], string]> = [
      [swap('Sec-WebSocket-Key', 'short'), 'Sec-WebSocket-Key'],
      [swap('Sec-WebSocket-Key', undefined), 'Sec-WebSocket-Key'],
      [swap('Sec-WebSocket-Version', '12'), 'Sec-WebSocket-Version'],
      [swap('Upgrade', 'h2c'), 'Upgrade'],
      [[...good, ['Sec-WebSocket-Protocol', 'a b']], 'Sec-WebSocket-Protocol'],
      [[...good, ['Sec-WebSocket-Protocol', `${WS_BINARY}, ${WS_BINARY}`]], 'Sec-WebSocket-Protocol'],
      [[...good, ['Sec-WebSocket-Protocol', ',x']], 'Sec-WebSocket-Protocol']
    ]
    for (const [headers, field] of cases) {
      const res = await rawRequest(target, { method: 'GET', path: `/v1/execs/${doneId}/stream`, headers })
      const what = JSON.stringify(headers)
      expectAnswer(res, what, {})
      expect(res.status, what).toBe(400)
      expect(res.json.detail, what).toContain(field)
    }
    // The same handshake with good headers still upgrades.
    const up = await rawRequest(target, { method: 'GET', path: `/v1/execs/${doneId}/stream`, headers: [...good, ['Sec-WebSocket-Protocol', `x, ${WS_BINARY}`]] })
    expect(up.status).toBe(101)
  })

  it('keeps SSE ids whole byte counts whatever offsets or Last-Event-ID a client sends', async () => {
    // Was "id: 1e+23-1" for Last-Event-ID 99999999999999999999999-1 (and for ?stdoutOffset=1e23).
    const sse: RawHeader = ['Accept', 'text/event-stream']
    for (const lastId of ['99999999999999999999999-1', '1-9007199254740993', '9007199254740992-0']) {
      const res = await rawRequest(target, { method: 'GET', path: `/v1/execs/${doneId}/events`, headers: [sse, ['Last-Event-ID', lastId]] })
      expect(res.status).toBe(200)
      expectEventsBody(res, doneFinal, `Last-Event-ID ${lastId}`)
    }
    // An id it cannot use is ignored: the whole output is replayed.
    const replay = await rawRequest(target, { method: 'GET', path: `/v1/execs/${doneId}/events`, headers: [sse, ['Last-Event-ID', '99999999999999999999999-0']] })
    expect(replay.text).toContain('out ü')
    for (const q of ['stdoutOffset=1e23', 'stderrOffset=9007199254740993', 'stdoutOffset=1e400']) {
      for (const path of [`/v1/execs/${doneId}/events?${q}`, `/v1/execs/${doneId}/stream?${q}`]) {
        const upgrade: RawHeader[] = [['Connection', 'Upgrade'], ['Upgrade', 'websocket'], ['Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ=='], ['Sec-WebSocket-Version', '13']]
        const res = await rawRequest(target, { method: 'GET', path, headers: path.includes('/stream') ? upgrade : [sse] })
        expectAnswer(res, path, {})
        expect(res.status, path).toBe(400)
        expect(res.json.detail, path).toMatch(/std(out|err)Offset/)
      }
    }
  })

  it('acts on no frame after the one it refused', async () => {
    // Was: ws delivered the eof that followed a refused frame, and the exec ended.
    const id = (await api(base, 'POST', `/v1/sandboxes/${SANDBOX}/execs`, { command: ['cat'], interactive: true })).body.id as string
    const ws = new WebSocket(`${base.replace(/^http/, 'ws')}/v1/execs/${id}/stream`)
    const closed = new Promise<number>((resolve) => ws.on('close', (code) => resolve(code)))
    ws.on('open', () => {
      ws.send(JSON.stringify({ type: 'nonsense' }))
      ws.send(JSON.stringify({ type: 'eof' }))
      ws.send(JSON.stringify({ type: 'signal', signal: 'KILL' }))
    })
    expect(await closed).toBe(1008)
    await new Promise((resolve) => setTimeout(resolve, 300))
    expect(LIVE).toContain((await api(base, 'GET', `/v1/execs/${id}`)).body.status)
    expect((await api(base, 'DELETE', `/v1/execs/${id}`)).status).toBe(204)
  })

  it('the canary execs ran undisturbed: exact output, true exit status', async () => {
    await canary.finish()
    expect((await api(base, 'GET', '/healthz')).status).toBe(200)
  })
})

describe('hostile input against a gateway with OpenSSH', () => {
  let sb: TestSandbox
  let canary: Canary

  beforeAll(async () => {
    sb = await startSandbox('openssh', SANDBOX_OPENSSH)
    canary = await startCanary(sb.g.publicUrl, SANDBOX_OPENSSH)
  })

  afterAll(async () => { await sb?.close() })

  it(`delivers shell-hostile argv and env byte for byte through OpenSSH (${RUNS.argvOpenssh} runs)`, async () => {
    await fc.assert(fc.asyncProperty(argvCase, async (c) => { await expectArgvExact(sb.g.publicUrl, SANDBOX_OPENSSH, c) }), params(RUNS.argvOpenssh))
    await expectHealthy(sb, canary)
  }, budget(RUNS.argvOpenssh, 150))

  it('the canary execs ran undisturbed: exact output, true exit status', async () => {
    await canary.finish()
    expect((await api(sb.g.publicUrl, 'GET', '/healthz')).status).toBe(200)
  })
})

// ---------------------------------------------------------------------------------------------
// WebSocket frames and what the contract says happens to them

type WsFrame =
  | { kind: 'text', data: string, split?: number }
  | { kind: 'badUtf8', data: Buffer }
  | { kind: 'binary', data: Buffer, split?: number }
  | { kind: 'ping', data: Buffer }

function frameBytes (f: WsFrame): Buffer {
  return f.kind === 'text' ? Buffer.from(f.data, 'utf8') : f.data
}

function sendFrame (ws: WebSocket, f: WsFrame): void {
  if (f.kind === 'ping') { ws.ping(f.data); return }
  const bytes = frameBytes(f)
  const binary = f.kind === 'binary'
  const split = f.kind === 'badUtf8' ? undefined : f.split
  // One message in two fragments: the gateway sees it whole.
  if (split !== undefined && bytes.length > 1) {
    const at = 1 + (split % (bytes.length - 1))
    ws.send(bytes.subarray(0, at), { binary, fin: false })
    ws.send(bytes.subarray(at), { binary, fin: true })
  } else {
    ws.send(bytes, { binary })
  }
}

function describeFrames (frames: WsFrame[]): string {
  return JSON.stringify(frames.map((f) => {
    const b = frameBytes(f)
    const head = f.kind === 'text' ? f.data.slice(0, 120) : b.subarray(0, 40).toString('hex')
    return `${f.kind}[${b.length}]${'split' in f && f.split !== undefined ? '~' : ''}:${head}`
  }))
}

// Section 4: client frames are stdin (interactive), eof, resize (tty only: the exec here has no
// tty, so even a valid one is refused), signal;
// binary frames start with channel byte 0; anything else is refused with 1008, a message over
// 1 MiB with 1009, a text frame that is not UTF-8 with 1007. `ends`: an eof (cat then exits) or
// a signal reached the exec before the first refused frame.
function modelFrames (frames: WsFrame[]): { refusal?: number, ends: boolean, wsError: boolean } {
  const wsError = frames.some((f) => f.kind === 'badUtf8' || (f.kind !== 'ping' && frameBytes(f).length > MiB))
  return { ...modelActions(frames), wsError }
}

function modelActions (frames: WsFrame[]): { refusal?: number, ends: boolean } {
  let ends = false
  for (const f of frames) {
    if (f.kind === 'ping') continue
    const bytes = frameBytes(f)
    if (bytes.length > MiB) return { refusal: 1009, ends }
    if (f.kind === 'badUtf8') return { refusal: 1007, ends }
    if (f.kind === 'binary') {
      if (bytes.length === 0 || bytes[0] !== 0) return { refusal: 1008, ends }
      continue
    }
    let msg: any
    try { msg = JSON.parse(bytes.toString('utf8')) } catch { return { refusal: 1008, ends } }
    if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) return { refusal: 1008, ends }
    switch (msg.type) {
      case 'stdin':
        if (typeof msg.data !== 'string') return { refusal: 1008, ends }
        break
      case 'eof':
        ends = true
        break
      case 'resize':
        return { refusal: 1008, ends }
      case 'signal':
        if (typeof msg.signal !== 'string' || !SIGNALS.includes(msg.signal)) return { refusal: 1008, ends }
        ends = true
        break
      default:
        return { refusal: 1008, ends }
    }
  }
  return { ends }
}

const stdinData = fc.oneof(fc.string({ unit: 'binary', maxLength: 30 }), metaString, fc.string({ unit: 'grapheme', maxLength: 10 }))
const textFrame = (v: fc.Arbitrary<unknown>): fc.Arbitrary<WsFrame> =>
  fc.tuple(v, fc.option(fc.nat(), { nil: undefined })).map(([o, split]) => ({ kind: 'text', data: typeof o === 'string' ? o : JSON.stringify(o) ?? 'undefined', split }))
const bigText = (size: number): WsFrame => {
  const head = '{"type":"stdin","data":"'
  return { kind: 'text', data: head + 'y'.repeat(size - head.length - 2) + '"}' }
}
const bigBinary = (size: number): WsFrame => ({ kind: 'binary', data: Buffer.concat([Buffer.from([0]), Buffer.alloc(size - 1, 0x7a)]) })

const wsFrame: fc.Arbitrary<WsFrame> = fc.oneof(
  { weight: 6, arbitrary: textFrame(fc.record({ type: fc.constant('stdin'), data: stdinData })) },
  { weight: 2, arbitrary: textFrame(fc.record({ type: fc.constant('stdin'), data: weirdValue })) },
  { weight: 2, arbitrary: textFrame(fc.record({ type: fc.constant('resize'), cols: fc.oneof(fc.integer({ min: 1, max: 10000 }), weirdValue), rows: fc.oneof(fc.integer({ min: 1, max: 10000 }), weirdValue) })) },
  { weight: 2, arbitrary: textFrame(fc.record({ type: fc.constant('signal'), signal: fc.oneof(fc.constantFrom('SIGTERM', 'term', 'KILL ', '', 'STOP', 'CONT', 'WINCH', '9', 'TERM\0'), weirdValue) })) },
  { weight: 1, arbitrary: textFrame(fc.record({ type: fc.constant('signal'), signal: fc.constantFrom(...SIGNALS) })) },
  { weight: 1, arbitrary: textFrame(fc.constant({ type: 'eof' })) },
  { weight: 2, arbitrary: textFrame(fc.record({ type: weirdValue, data: stdinData }, { requiredKeys: [] })) },
  { weight: 2, arbitrary: textFrame(fc.jsonValue({ maxDepth: 3, stringUnit: 'binary' })) },
  { weight: 2, arbitrary: textFrame(fc.oneof(fc.string({ unit: 'binary', maxLength: 40 }), fc.constantFrom('', ' ', 'null', '[]', '{', '{"type":"stdin","data":"x"', '{"type":"stdin","data":"x","type":"eof"}', '{"__proto__":{"type":"eof"}}', '{"type":"stdin","data":"\\ud800"}', '{"type":"stdin","data":"a","__proto__":{"x":1}}', '{"type":"resize","cols":1e400,"rows":1}', '{"type":"resize","cols":80.0,"rows":24}'))) },
  { weight: 1, arbitrary: fc.constantFrom(Buffer.from([0xff]), Buffer.from([0xc3]), Buffer.from([0xed, 0xa0, 0x80]), Buffer.from([0xc0, 0xaf]), Buffer.from('{"type":"stdin","data":"\xff"}', 'latin1')).map((data): WsFrame => ({ kind: 'badUtf8', data })) },
  { weight: 5, arbitrary: fc.tuple(fc.uint8Array({ maxLength: 60 }), fc.option(fc.nat(), { nil: undefined })).map(([b, split]): WsFrame => ({ kind: 'binary', data: Buffer.concat([Buffer.from([0]), Buffer.from(b)]), split })) },
  { weight: 2, arbitrary: fc.uint8Array({ maxLength: 20 }).map((b): WsFrame => ({ kind: 'binary', data: Buffer.from(b) })) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 125 }).map((b): WsFrame => ({ kind: 'ping', data: Buffer.from(b) })) },
  { weight: 1, arbitrary: fc.constantFrom(MiB - 1, MiB, MiB + 1, MiB + 1000).map(bigText) },
  { weight: 1, arbitrary: fc.constantFrom(MiB - 1, MiB, MiB + 1).map(bigBinary) }
)

const wsCase = fc.record({
  binary: fc.boolean(),
  encoding: fc.constantFrom(undefined, 'utf8', 'base64'),
  frames: fc.array(wsFrame, { minLength: 1, maxLength: 6 }),
  // Now and then the client vanishes right after sending, without a close handshake.
  abort: fc.integer({ min: 0, max: 9 }).map((n) => n === 0)
})

// ---------------------------------------------------------------------------------------------
// argv and env byte for byte

// Arguments made to break a naive quoting: metacharacters, quote-escape sequences, leading
// dashes, empty strings, every Unicode plane. No NUL (argv cannot carry it) and no lone
// surrogates (not representable in UTF-8).
const argString = fc.oneof(
  { weight: 5, arbitrary: metaString },
  { weight: 3, arbitrary: fc.string({ unit: 'binary', maxLength: 20 }) },
  { weight: 2, arbitrary: fc.string({ unit: 'grapheme', maxLength: 10 }) },
  // eslint-disable-next-line no-template-curly-in-string -- shell expansions, literally
  { weight: 2, arbitrary: fc.constantFrom('', '-', '--', '-n', '-e', '--help', '-c', "'\\''", "'", '"', '\\', '$(id)', '`id`', '${HOME}', '$HOME', '~', '~root', '*', '.*', '[a]', '{a,b}', '!!', '#', '&&', '||', ';', '\n', '\r\n', '\t', ' ', "it's", 'a b', '$\'x\'', '%s', '%%', '%b', '\\0', '\\x41') },
  { weight: 1, arbitrary: fc.string({ unit: fc.constantFrom(...SHELL_META), minLength: 100, maxLength: 2000 }) }
).filter((s) => !s.includes('\0') && !/\p{Cs}/u.test(s))

const argvCase = fc.oneof(
  { weight: 4, arbitrary: fc.record({ mode: fc.constant('argv' as const), args: fc.array(argString, { minLength: 1, maxLength: 12 }) }) },
  { weight: 1, arbitrary: fc.record({ mode: fc.constant('argv' as const), args: fc.array(fc.string({ unit: fc.constantFrom(...SHELL_META), maxLength: 4 }), { minLength: 100, maxLength: 300 }) }) },
  // One big argument of quotes (each quotes to 4 bytes), backslashes, "$(" or emoji.
  { weight: 1, arbitrary: fc.record({ mode: fc.constant('argv' as const), args: fc.constantFrom(["'".repeat(7000)], Array(7).fill('\\'.repeat(30000)), Array(4).fill('$('.repeat(15000)), ['😀'.repeat(7000)]) }) },
  // env values may not hold CR or LF.
  { weight: 2, arbitrary: fc.record({ mode: fc.constant('env' as const), args: fc.array(argString.map((s) => s.replace(/[\r\n]/g, '')), { minLength: 1, maxLength: 8 }) }) }
).filter((c) => Buffer.byteLength(assembleCommand(c.mode === 'argv' ? { command: ['printf', '%s\\0', ...c.args] } : { command: ['sh', '-c', 'x'.repeat(12 * c.args.length)], env: Object.fromEntries(c.args.map((a, i) => [`V${i}`, a])) })) <= RUNNABLE_LINE_BYTES)

async function expectArgvExact (baseUrl: string, sandboxId: string, c: { mode: 'argv' | 'env', args: readonly string[] }): Promise<void> {
  const req = c.mode === 'argv'
    ? { command: ['printf', '%s\\0', ...c.args] }
    : {
        command: ['sh', '-c', `printf '%s\\0' ${c.args.map((_, i) => `"$V${i}"`).join(' ')}`],
        env: Object.fromEntries(c.args.map((a, i) => [`V${i}`, a]))
      }
  const r = await api(baseUrl, 'POST', `/v1/sandboxes/${sandboxId}/execs?wait=true&encoding=base64`, req)
  const what = `${c.mode} ${JSON.stringify(c.args).slice(0, 500)}`
  expect(r.status, `${what}: ${r.text.slice(0, 300)}`).toBe(200)
  expect(r.body.exitCode, `${what}: stderr ${Buffer.from(r.body.stderr ?? '', 'base64').toString()}`).toBe(0)
  expect(r.body.stderr, what).toBe('')
  const expected = Buffer.concat(c.args.flatMap((a) => [Buffer.from(a, 'utf8'), Buffer.from([0])]))
  const got = Buffer.from(r.body.stdout, 'base64')
  if (!got.equals(expected)) {
    expect(got.toString('hex'), `${what}: bytes differ`).toBe(expected.toString('hex'))
  }
}
