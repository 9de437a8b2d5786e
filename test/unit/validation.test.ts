// Request validation over real HTTP through the app, with no sandbox connected: a request that
// passes validation reaches the sandbox lookup (404 sandbox_not_found); one that fails is a
// 400 invalid_argument problem naming the field.
import { request as httpRequest } from 'node:http'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import WebSocket from 'ws'
import { startGateway, type TestGateway } from '../helpers/gateway.js'

let gw: TestGateway
let base: string

beforeAll(async () => {
  gw = await startGateway()
  base = gw.publicUrl
})

afterAll(async () => {
  await gw?.close()
})

interface Res { status: number, contentType: string, body: any, text: string }

async function send (method: string, path: string, body?: string, headers: Record<string, string> = {}): Promise<Res> {
  const res = await fetch(base + path, { method, headers, body })
  const text = await res.text()
  let parsed: any = text
  try { parsed = JSON.parse(text) } catch { /* not JSON */ }
  return { status: res.status, contentType: res.headers.get('content-type') ?? '', body: parsed, text }
}

async function postExec (req: unknown, query = ''): Promise<Res> {
  return await send('POST', `/v1/sandboxes/nope/execs${query}`, JSON.stringify(req), { 'content-type': 'application/json' })
}

function expectProblem (res: Res, status: number, code: string): void {
  expect(res.status, res.text.slice(0, 500)).toBe(status)
  expect(res.contentType).toMatch(/^application\/problem\+json/)
  expect(Object.keys(res.body).sort()).toEqual(expect.arrayContaining(['code', 'detail', 'status', 'title', 'type']))
  expect(res.body.status).toBe(status)
  expect(res.body.code).toBe(code)
  expect(typeof res.body.type).toBe('string')
  expect(typeof res.body.title).toBe('string')
  expect(typeof res.body.detail).toBe('string')
}

async function passes (req: unknown): Promise<void> {
  const res = await postExec(req)
  expectProblem(res, 404, 'sandbox_not_found')
}

async function fails (req: unknown, field: string | RegExp): Promise<void> {
  const res = await postExec(req)
  expectProblem(res, 400, 'invalid_argument')
  if (typeof field === 'string') expect(res.body.detail, res.body.detail).toContain(field)
  else expect(res.body.detail).toMatch(field)
}

const MiB = 1024 * 1024

describe('command', () => {
  it('a plain command passes validation', async () => {
    await passes({ command: ['echo', 'hi'] })
  })

  it('1024 args pass, 1025 fail', async () => {
    await passes({ command: Array.from({ length: 1024 }, (_, i) => `a${i}`) })
    await fails({ command: Array.from({ length: 1025 }, (_, i) => `a${i}`) }, 'command')
  })

  it('an arg of 32768 bytes passes, 32769 fails', async () => {
    await passes({ command: ['echo', 'a'.repeat(32768)] })
    await fails({ command: ['echo', 'a'.repeat(32769)] }, 'command')
  })

  it('multi-byte args are measured in bytes: 8192 × 😀 passes, one more byte fails', async () => {
    const emoji = '😀'.repeat(8192)
    expect(Buffer.byteLength(emoji)).toBe(32768)
    await passes({ command: ['echo', emoji] })
    await fails({ command: ['echo', emoji + 'a'] }, 'command')
    // 2-byte characters, too: 16384 × é is 32768 bytes.
    await passes({ command: ['é'.repeat(16384)] })
    await fails({ command: ['é'.repeat(16384) + 'x'] }, 'command')
  })

  it('NUL in an arg fails; newlines are allowed', async () => {
    await fails({ command: ['echo', 'a\u0000b'] }, 'command')
    await fails({ command: ['\u0000'] }, 'command')
    await passes({ command: ['echo', 'line1\nline2\r\n'] })
  })

  it('missing, empty, not an array, non-string elements fail', async () => {
    await fails({}, 'command')
    await fails({ env: { A: '1' } }, 'command')
    await fails({ command: [] }, 'command')
    await fails({ command: 'echo hi' }, 'command')
    await fails({ command: { 0: 'echo' } }, 'command')
    await fails({ command: null }, 'command')
    await fails({ command: [1] }, 'command')
    await fails({ command: ['echo', 2] }, 'command')
    await fails({ command: ['echo', null] }, 'command')
    await fails({ command: [['echo']] }, 'command')
  })

  it('the assembled command line over 262144 bytes fails', async () => {
    // Each arg is within its own limit; together they are 288000 bytes.
    await fails({ command: Array.from({ length: 9 }, () => 'a'.repeat(32000)) }, 'command')
    // Quoting counts: 8 args of 32768 bytes of quotes quote to far more than the limit.
    await fails({ command: ['echo', ...Array.from({ length: 3 }, () => "'".repeat(32768))] }, 'command')
    // Just under: 8 × 32000 + separators passes.
    await passes({ command: Array.from({ length: 8 }, () => 'a'.repeat(32000)) })
  })

  it('the exec tag is not counted against the caller', async () => {
    // Built to land exactly on the limit without the tag.
    const args = Array.from({ length: 7 }, () => 'a'.repeat(32768))
    const line = 'exec ' + args.join(' ')
    const room = 262144 - Buffer.byteLength(line) - 1
    expect(room).toBeGreaterThan(0)
    await passes({ command: [...args, 'b'.repeat(room)] })
    await fails({ command: [...args, 'b'.repeat(room + 1)] }, 'command')
  })
})

describe('env', () => {
  it('bad keys fail, good keys pass', async () => {
    await fails({ command: ['true'], env: { '1A': 'x' } }, '1A')
    await fails({ command: ['true'], env: { 'A-B': 'x' } }, 'A-B')
    await fails({ command: ['true'], env: { '': 'x' } }, 'env')
    await fails({ command: ['true'], env: { 'A B': 'x' } }, 'env')
    await fails({ command: ['true'], env: { 'A=B': 'x' } }, 'env')
    await fails({ command: ['true'], env: { É: 'x' } }, 'env')
    await passes({ command: ['true'], env: { _a1: 'x', A: '', Z9_: 'y', _: 'z' } })
  })

  it('a value of 32768 bytes passes, 32769 fails (ASCII and multi-byte)', async () => {
    await passes({ command: ['true'], env: { A: 'v'.repeat(32768) } })
    await fails({ command: ['true'], env: { A: 'v'.repeat(32769) } }, 'env')
    await passes({ command: ['true'], env: { A: 'é'.repeat(16384) } })
    await fails({ command: ['true'], env: { A: 'é'.repeat(16384) + 'v' } }, 'env.A')
  })

  it('CR, LF and NUL in a value fail', async () => {
    await fails({ command: ['true'], env: { A: 'a\rb' } }, 'env.A')
    await fails({ command: ['true'], env: { A: 'a\nb' } }, 'env.A')
    await fails({ command: ['true'], env: { A: 'a\u0000b' } }, 'env.A')
  })

  it('values must be strings; env must be an object', async () => {
    await fails({ command: ['true'], env: { A: 1 } }, 'env')
    await fails({ command: ['true'], env: { A: null } }, 'env')
    await fails({ command: ['true'], env: ['A=1'] }, 'env')
    await fails({ command: ['true'], env: 'A=1' }, 'env')
  })
})

describe('workdir', () => {
  it('4096 bytes pass, 4097 fail, multi-byte measured in bytes', async () => {
    await passes({ command: ['true'], workdir: '/' + 'd'.repeat(4095) })
    await fails({ command: ['true'], workdir: '/' + 'd'.repeat(4096) }, 'workdir')
    await passes({ command: ['true'], workdir: 'é'.repeat(2048) })
    await fails({ command: ['true'], workdir: 'é'.repeat(2048) + 'x' }, 'workdir')
  })

  it('newline, CR and NUL fail', async () => {
    await fails({ command: ['true'], workdir: '/tmp\n' }, 'workdir')
    await fails({ command: ['true'], workdir: '/tmp\rx' }, 'workdir')
    await fails({ command: ['true'], workdir: '/tmp\u0000' }, 'workdir')
    await passes({ command: ['true'], workdir: "/tmp/it's a dir $(x)" })
  })
})

describe('stdin', () => {
  it('stdin and stdinBase64 together fail', async () => {
    await fails({ command: ['cat'], stdin: 'a', stdinBase64: 'YQ==' }, /stdin/)
  })

  it('stdin with interactive: true fails', async () => {
    await fails({ command: ['cat'], stdin: 'a', interactive: true }, 'stdin')
    await fails({ command: ['cat'], stdinBase64: 'YQ==', interactive: true }, 'stdinBase64')
    await passes({ command: ['cat'], interactive: true })
    await passes({ command: ['cat'], stdin: 'a', interactive: false })
  })

  it('stdinBase64 that is not base64 fails', async () => {
    await fails({ command: ['cat'], stdinBase64: 'not base64!' }, 'stdinBase64')
    await fails({ command: ['cat'], stdinBase64: 'YQ=' }, 'stdinBase64')
    await fails({ command: ['cat'], stdinBase64: '====' }, 'stdinBase64')
    await passes({ command: ['cat'], stdinBase64: 'YQ==' })
    await passes({ command: ['cat'], stdinBase64: '' })
  })

  it('1 MiB passes, 1 MiB + 1 fails (text and base64, measured decoded)', async () => {
    await passes({ command: ['cat'], stdin: 's'.repeat(MiB) })
    await fails({ command: ['cat'], stdin: 's'.repeat(MiB + 1) }, 'stdin')
    await fails({ command: ['cat'], stdin: 'é'.repeat(MiB / 2) + 's' }, 'stdin')
    await passes({ command: ['cat'], stdinBase64: Buffer.alloc(MiB, 7).toString('base64') })
    await fails({ command: ['cat'], stdinBase64: Buffer.alloc(MiB + 1, 7).toString('base64') }, 'stdinBase64')
  })
})

describe('timeoutSeconds and other fields', () => {
  it('-1, 604801, 1.5 and "5" fail; 0 and 604800 pass', async () => {
    for (const t of [-1, 604801, 1.5, '5', null, true]) await fails({ command: ['true'], timeoutSeconds: t }, 'timeoutSeconds')
    await passes({ command: ['true'], timeoutSeconds: 0 })
    await passes({ command: ['true'], timeoutSeconds: 604800 })
  })

  it('tty, interactive, cols, rows are type-checked', async () => {
    await fails({ command: ['true'], tty: 'yes' }, 'tty')
    await fails({ command: ['true'], interactive: 1 }, 'interactive')
    await fails({ command: ['true'], tty: true, cols: 0 }, 'cols')
    await fails({ command: ['true'], tty: true, rows: 1.5 }, 'rows')
    await passes({ command: ['true'], tty: true, cols: 200, rows: 50 })
  })

  it('an unknown top-level field fails, naming it', async () => {
    await fails({ command: ['true'], bogusField: 1 }, 'bogusField')
    await fails({ command: ['true'], Command: ['x'] }, 'Command')
  })
})

describe('the body', () => {
  it('malformed JSON → 400 invalid_argument', async () => {
    const res = await send('POST', '/v1/sandboxes/nope/execs', '{"command": ["true"', { 'content-type': 'application/json' })
    expectProblem(res, 400, 'invalid_argument')
  })

  it('an empty JSON body → 400 invalid_argument', async () => {
    const res = await send('POST', '/v1/sandboxes/nope/execs', '', { 'content-type': 'application/json' })
    expectProblem(res, 400, 'invalid_argument')
  })

  it('a JSON body that is not an object → 400', async () => {
    for (const body of ['[]', '"x"', '42', 'null']) {
      const res = await send('POST', '/v1/sandboxes/nope/execs', body, { 'content-type': 'application/json' })
      expectProblem(res, 400, 'invalid_argument')
    }
  })

  it('a body over 8 MiB → 413 payload_too_large', async () => {
    const body = JSON.stringify({ command: ['cat'], stdin: 'x'.repeat(8 * MiB + 16) })
    const res = await send('POST', '/v1/sandboxes/nope/execs', body, { 'content-type': 'application/json' })
    expectProblem(res, 413, 'payload_too_large')
  })

  it('a content type with no parser → 415 unsupported_media_type', async () => {
    const res = await send('POST', '/v1/sandboxes/nope/execs', 'command=true', { 'content-type': 'application/x-www-form-urlencoded' })
    expectProblem(res, 415, 'unsupported_media_type')
  })

  it('text/plain → 415 unsupported_media_type', async () => {
    const res = await send('POST', '/v1/sandboxes/nope/execs', JSON.stringify({ command: ['true'] }), { 'content-type': 'text/plain' })
    expectProblem(res, 415, 'unsupported_media_type')
  })

  it('application/json; charset=utf-8 is JSON', async () => {
    const res = await send('POST', '/v1/sandboxes/nope/execs', JSON.stringify({ command: ['true'] }), { 'content-type': 'application/json; charset=utf-8' })
    expectProblem(res, 404, 'sandbox_not_found')
  })

  it('?wait=maybe → 400; ?wait=true and ?wait=false are fine', async () => {
    expectProblem(await postExec({ command: ['true'] }, '?wait=maybe'), 400, 'invalid_argument')
    expectProblem(await postExec({ command: ['true'] }, '?wait=true'), 404, 'sandbox_not_found')
    expectProblem(await postExec({ command: ['true'] }, '?wait=false'), 404, 'sandbox_not_found')
    expectProblem(await postExec({ command: ['true'] }, '?encoding=latin1'), 400, 'invalid_argument')
    expectProblem(await postExec({ command: ['true'] }, '?unknown=1'), 400, 'invalid_argument')
  })

  it('a failed validation created no exec', async () => {
    const res = await send('GET', '/v1/execs')
    expect(res.status).toBe(200)
    expect(res.body).toEqual({ execs: [] })
  })
})

describe('other routes without a sandbox', () => {
  it('GET /v1/execs/nope → 404 exec_not_found', async () => {
    expectProblem(await send('GET', '/v1/execs/nope'), 404, 'exec_not_found')
  })

  it('DELETE /v1/execs/nope → 404 exec_not_found', async () => {
    expectProblem(await send('DELETE', '/v1/execs/nope'), 404, 'exec_not_found')
  })

  it('GET /v1/execs/nope/events → 404 exec_not_found', async () => {
    expectProblem(await send('GET', '/v1/execs/nope/events'), 404, 'exec_not_found')
  })

  it('GET /v1/sandboxes/nope → 404 sandbox_not_found', async () => {
    expectProblem(await send('GET', '/v1/sandboxes/nope'), 404, 'sandbox_not_found')
  })

  it('a sandbox id follows the token rule (1-128 of A-Z a-z 0-9 . _ -): anything else can never have connected → 400', async () => {
    for (const id of ['a', 'A.b-c_d', '0' + 'x'.repeat(127)]) {
      expectProblem(await send('GET', `/v1/sandboxes/${id}`), 404, 'sandbox_not_found')
      expectProblem(await send('POST', `/v1/sandboxes/${id}/execs`, '{"command":["true"]}', { 'content-type': 'application/json' }), 404, 'sandbox_not_found')
    }
    for (const id of ['-lead', '.lead', 'bad%20id', 'a%0Ab', 'x'.repeat(129)]) {
      const res = await send('GET', `/v1/sandboxes/${id}`)
      expectProblem(res, 400, 'invalid_argument')
      expect(res.body.detail).toMatch(/sandboxId|path parameter is too long/)
    }
  })

  it('stream offsets beyond 2^53 - 1 are a 400 naming the offset', async () => {
    for (const q of ['stdoutOffset=1e23', 'stderrOffset=9007199254740992', 'stdoutOffset=-1']) {
      const res = await send('GET', `/v1/execs/nope/events?${q}`)
      expectProblem(res, 400, 'invalid_argument')
      expect(res.body.detail).toMatch(/std(out|err)Offset/)
    }
    expectProblem(await send('GET', '/v1/execs/nope/events?stdoutOffset=9007199254740991'), 404, 'exec_not_found')
  })

  it('a WebSocket upgrade for an unknown exec is a plain HTTP 404', async () => {
    const ws = new WebSocket(`${base.replace(/^http/, 'ws')}/v1/execs/nope/stream`)
    const outcome = await new Promise<{ kind: string, status?: number, body?: string }>((resolve) => {
      ws.on('unexpected-response', (_req, res) => {
        let body = ''
        res.setEncoding('utf8')
        res.on('data', (d: string) => { body += d })
        res.on('end', () => resolve({ kind: 'response', status: res.statusCode, body }))
      })
      ws.on('open', () => resolve({ kind: 'open' }))
      ws.on('error', (err) => resolve({ kind: `error: ${err.message}` }))
    })
    ws.terminate()
    expect(outcome.kind).toBe('response')
    expect(outcome.status).toBe(404)
    expect(JSON.parse(outcome.body!).code).toBe('exec_not_found')
  })

  it('POST /v1/execs/nope/signal: TERM → 404, BOGUS → 400', async () => {
    const json = { 'content-type': 'application/json' }
    expectProblem(await send('POST', '/v1/execs/nope/signal', JSON.stringify({ signal: 'TERM' }), json), 404, 'exec_not_found')
    expectProblem(await send('POST', '/v1/execs/nope/signal', JSON.stringify({ signal: 'BOGUS' }), json), 400, 'invalid_argument')
    expectProblem(await send('POST', '/v1/execs/nope/signal', JSON.stringify({ signal: 'SIGTERM' }), json), 400, 'invalid_argument')
    expectProblem(await send('POST', '/v1/execs/nope/signal', JSON.stringify({}), json), 400, 'invalid_argument')
  })

  it('an unknown route → 404 problem not_found', async () => {
    expectProblem(await send('GET', '/v1/nothing-here'), 404, 'not_found')
    expectProblem(await send('GET', '/nothing'), 404, 'not_found')
  })

  it('a known path with a method it does not take → 405 method_not_allowed with Allow', async () => {
    const put = await fetch(`${base}/v1/execs`, { method: 'PUT' })
    expect(put.status).toBe(405)
    expect(put.headers.get('allow')?.split(', ').sort()).toEqual(['GET', 'HEAD'])
    expect(((await put.json()) as any).code).toBe('method_not_allowed')
    const patch = await fetch(`${base}/v1/execs/abc`, { method: 'PATCH' })
    expect(patch.status).toBe(405)
    expect(patch.headers.get('allow')?.split(', ').sort()).toEqual(['DELETE', 'GET', 'HEAD'])
    expectProblem(await send('GET', '/v1/sandboxes/x/execs'), 405, 'method_not_allowed')
  })

  it('?wait spelled as clients spell booleans (1, True, yes, on / 0, False, no, off) is accepted; anything else is a 400', async () => {
    const req = { command: ['true'] }
    for (const v of ['1', 'True', 'TRUE', 'yes', 'on', '0', 'False', 'no', 'off', 'true', 'false']) {
      expectProblem(await postExec(req, `?wait=${v}`), 404, 'sandbox_not_found')
    }
    const bad = await postExec(req, '?wait=maybe')
    expectProblem(bad, 400, 'invalid_argument')
    expect(bad.body.detail).toMatch(/wait/)
  })

  it('DELETE with Content-Type: application/json and no body is a DELETE (404 for an unknown exec), not a 400', async () => {
    expectProblem(await send('DELETE', '/v1/execs/nope', undefined, { 'content-type': 'application/json' }), 404, 'exec_not_found')
    // A POST still needs its body.
    expectProblem(await send('POST', '/v1/execs/nope/signal', '', { 'content-type': 'application/json' }), 400, 'invalid_argument')
  })

  it('an enum value outside the list names the allowed values', async () => {
    const res = await send('POST', '/v1/execs/nope/signal', JSON.stringify({ signal: 'SIGTERM' }), { 'content-type': 'application/json' })
    expectProblem(res, 400, 'invalid_argument')
    expect(res.body.detail).toMatch(/signal: must be one of "TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2"/)
  })

  it('healthz answers', async () => {
    const res = await send('GET', '/healthz')
    expect(res.status).toBe(200)
    expect(res.body).toEqual({ status: 'ok' })
  })
})

// ---- Host / Origin guard (no --api-token) ------------------------------------------------------

function rawRequest (path: string, method: string, headers: Record<string, string>, body?: string): Promise<{ status: number, body: any, contentType: string }> {
  const url = new URL(base)
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: url.hostname, port: url.port, path, method, headers, setHost: false }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (d: string) => { text += d })
      res.on('end', () => {
        let parsed: any = text
        try { parsed = JSON.parse(text) } catch { /* not JSON */ }
        resolve({ status: res.statusCode ?? 0, body: parsed, contentType: String(res.headers['content-type'] ?? '') })
      })
    })
    req.on('error', reject)
    req.end(body)
  })
}

describe('Host / Origin guard without --api-token', () => {
  it('a foreign Host is refused with 403 permission_denied', async () => {
    const r = await rawRequest('/v1/sandboxes', 'GET', { Host: 'evil.example' })
    expect(r.status).toBe(403)
    expect(r.contentType).toMatch(/^application\/problem\+json/)
    expect(r.body.code).toBe('permission_denied')
    const withPort = await rawRequest('/v1/execs', 'GET', { Host: `evil.example:${new URL(base).port}` })
    expect(withPort.status).toBe(403)
    const rebinding = await rawRequest('/v1/execs', 'GET', { Host: '127.0.0.1.evil.example' })
    expect(rebinding.status).toBe(403)
  })

  it('a foreign Host is refused for a POST too (before anything runs)', async () => {
    const r = await rawRequest('/v1/sandboxes/nope/execs', 'POST', { Host: 'evil.example', 'content-type': 'application/json' }, JSON.stringify({ command: ['true'] }))
    expect(r.status).toBe(403)
    expect(r.body.code).toBe('permission_denied')
  })

  it('loopback Host names pass', async () => {
    const port = new URL(base).port
    for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, 'localhost', `[::1]:${port}`]) {
      const r = await rawRequest('/v1/sandboxes', 'GET', { Host: host })
      expect(r.status, host).toBe(200)
    }
  })

  it('a POST with a foreign Origin is refused', async () => {
    const res = await send('POST', '/v1/sandboxes/nope/execs', JSON.stringify({ command: ['true'] }), {
      'content-type': 'application/json', origin: 'http://evil.example'
    })
    expectProblem(res, 403, 'permission_denied')
    const del = await send('DELETE', '/v1/execs/nope', undefined, { origin: 'http://evil.example' })
    expectProblem(del, 403, 'permission_denied')
    const sig = await send('POST', '/v1/execs/nope/signal', JSON.stringify({ signal: 'TERM' }), { 'content-type': 'application/json', origin: 'null' })
    expectProblem(sig, 403, 'permission_denied')
  })

  it('a POST without Origin (curl) passes the guard', async () => {
    expectProblem(await postExec({ command: ['true'] }), 404, 'sandbox_not_found')
  })

  it('a POST with the gateway\'s own Origin passes the guard', async () => {
    const res = await send('POST', '/v1/sandboxes/nope/execs', JSON.stringify({ command: ['true'] }), {
      'content-type': 'application/json', origin: base
    })
    expectProblem(res, 404, 'sandbox_not_found')
  })

  it('a GET with a foreign Origin is allowed (it changes nothing)', async () => {
    const res = await send('GET', '/v1/sandboxes', undefined, { origin: 'http://evil.example' })
    expect(res.status).toBe(200)
  })
})

// ---- refused WebSocket upgrades ---------------------------------------------------------------
// Each test has its own gateway: a refused upgrade whose socket is never closed keeps the
// gateway from closing, and must not take the shared gateway down with it.

async function refusedUpgrade (publicUrl: string, opts: WebSocket.ClientOptions): Promise<number | string> {
  const ws = new WebSocket(`${publicUrl.replace(/^http/, 'ws')}/v1/execs/nope/stream`, opts)
  const status = await new Promise<number | string>((resolve) => {
    ws.on('unexpected-response', (_req, res) => { res.resume(); resolve(res.statusCode ?? 0) })
    ws.on('open', () => resolve('open'))
    ws.on('error', (err) => resolve(err.message))
  })
  ws.terminate()
  return status
}

async function closesWithin (g: TestGateway, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined
  const closed = g.close().then(() => true)
  const result = await Promise.race([closed, new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(false), ms) })])
  clearTimeout(timer)
  return result
}

// Watches the raw upgrade sockets (without changing them) so that cleanup can end any the
// gateway leaves open.
function watchUpgradeSockets (g: TestGateway): Array<{ destroy: () => void, destroyed: boolean }> {
  const seen: Array<{ destroy: () => void, destroyed: boolean }> = []
  g.gw.app.server.prependListener('upgrade', (_req, socket) => { seen.push(socket) })
  return seen
}

describe('refused WebSocket upgrades', () => {
  it('a WebSocket upgrade with a foreign Origin is refused with 403, and its socket is closed', async () => {
    const g = await startGateway()
    const sockets = watchUpgradeSockets(g)
    try {
      expect(await refusedUpgrade(g.publicUrl, { origin: 'http://evil.example' })).toBe(403)
      await new Promise((resolve) => setTimeout(resolve, 200))
      expect(sockets).toHaveLength(1)
      expect(sockets[0]!.destroyed, 'the server-side socket of the refused upgrade is still open').toBe(true)
      expect(await closesWithin(g, 5000), 'gateway close() finishes after a refused upgrade').toBe(true)
    } finally {
      for (const s of sockets) s.destroy()
      await g.close()
    }
  })

  it('a WebSocket upgrade without the bearer token is refused with 401, and its socket is closed', async () => {
    const g = await startGateway({ apiTokens: ['s3cret'] })
    const sockets = watchUpgradeSockets(g)
    try {
      expect(await refusedUpgrade(g.publicUrl, {})).toBe(401)
      await new Promise((resolve) => setTimeout(resolve, 200))
      expect(sockets).toHaveLength(1)
      expect(sockets[0]!.destroyed, 'the server-side socket of the refused upgrade is still open').toBe(true)
      expect(await closesWithin(g, 5000), 'gateway close() finishes after a refused upgrade').toBe(true)
    } finally {
      for (const s of sockets) s.destroy()
      await g.close()
    }
  })

  it('an upgrade for an unknown exec (404) leaves no socket open', async () => {
    const g = await startGateway()
    const sockets = watchUpgradeSockets(g)
    try {
      expect(await refusedUpgrade(g.publicUrl, {})).toBe(404)
      await new Promise((resolve) => setTimeout(resolve, 200))
      expect(sockets).toHaveLength(1)
      expect(sockets[0]!.destroyed).toBe(true)
      expect(await closesWithin(g, 5000)).toBe(true)
    } finally {
      for (const s of sockets) s.destroy()
      await g.close()
    }
  })
})

// ---- bearer tokens (--api-token) --------------------------------------------------------------

describe('with --api-token', () => {
  let tg: TestGateway
  const TOKEN = 's3cret-token'
  beforeAll(async () => { tg = await startGateway({ apiTokens: [TOKEN] }) })
  afterAll(async () => { await tg?.close() })

  async function call (method: string, path: string, headers: Record<string, string> = {}, body?: unknown): Promise<Res> {
    const res = await fetch(tg.publicUrl + path, {
      method,
      headers: body === undefined ? headers : { 'content-type': 'application/json', ...headers },
      body: body === undefined ? undefined : JSON.stringify(body)
    })
    const text = await res.text()
    let parsed: any = text
    try { parsed = JSON.parse(text) } catch { /* not JSON */ }
    return { status: res.status, contentType: res.headers.get('content-type') ?? '', body: parsed, text }
  }

  it('no token or a wrong token → 401 unauthenticated; the right one passes', async () => {
    expectProblem(await call('GET', '/v1/execs'), 401, 'unauthenticated')
    expectProblem(await call('GET', '/v1/execs', { authorization: 'Bearer wrong' }), 401, 'unauthenticated')
    expectProblem(await call('GET', '/v1/execs', { authorization: `Basic ${TOKEN}` }), 401, 'unauthenticated')
    const ok = await call('GET', '/v1/execs', { authorization: `Bearer ${TOKEN}` })
    expect(ok.status).toBe(200)
    expectProblem(await call('POST', '/v1/sandboxes/nope/execs', {}, { command: ['id'] }), 401, 'unauthenticated')
    expectProblem(await call('POST', '/v1/sandboxes/nope/execs', { authorization: `Bearer ${TOKEN}` }, { command: ['id'] }), 404, 'sandbox_not_found')
  })

  it('/healthz needs no token', async () => {
    expect((await call('GET', '/healthz')).status).toBe(200)
  })

  it('a percent-encoded /v1 path is still a /v1 route and still needs the token', async () => {
    // The router decodes %76 → v and %31 → 1, so these reach the /v1 handlers: the token check
    // must apply to them too.
    for (const path of ['/%761/execs', '/v%31/execs', '/%76%31/sandboxes']) {
      const res = await call('GET', path)
      expect(res.status, `GET ${path} without a token: ${res.text.slice(0, 200)}`).toBe(401)
    }
    const post = await call('POST', '/%761/sandboxes/nope/execs', {}, { command: ['id'] })
    expect(post.status, `POST /%761/sandboxes/nope/execs without a token: ${post.text.slice(0, 200)}`).toBe(401)
  })

  it('the bearer subprotocol authenticates a WebSocket upgrade (then 404 for an unknown exec)', async () => {
    const sub = 'exec-gateway.bearer.' + Buffer.from(TOKEN).toString('base64url')
    const ws = new WebSocket(`${tg.publicUrl.replace(/^http/, 'ws')}/v1/execs/nope/stream`, [sub])
    const status = await new Promise<number | string>((resolve) => {
      ws.on('unexpected-response', (_req, res) => { res.resume(); resolve(res.statusCode ?? 0) })
      ws.on('open', () => resolve('open'))
      ws.on('error', (err) => resolve(err.message))
    })
    ws.terminate()
    expect(status).toBe(404)
  })
})
