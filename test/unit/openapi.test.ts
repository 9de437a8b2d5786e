import { describe, it, expect, afterAll } from 'vitest'
import { execFile } from 'node:child_process'
import { request } from 'node:http'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { generateOpenApiDocument, serializeOpenApi } from '../../src/openapi-doc.js'
import { errorTable, isErrorCode } from '../../src/errors.js'
import { ExecEventSchema, ExecEventMembers } from '../../src/schemas/events.js'
import WebSocket from 'ws'
import { startGateway, type TestGateway } from '../helpers/gateway.js'

// openapi/openapi.json and sdk/schema.ts are generated from the route schemas; they must never
// drift from them, and the document must say everything a client can get back.

const root = fileURLToPath(new URL('../..', import.meta.url))
const committed = readFileSync(join(root, 'openapi/openapi.json'), 'utf8')
const doc = JSON.parse(committed) as OpenApiDoc

interface Response { description: string, headers?: Record<string, unknown>, content?: Record<string, { schema: unknown }> }
interface Operation { responses: Record<string, Response>, parameters?: Array<{ name: string, in: string }>, description?: string, security?: unknown[] }
interface OpenApiDoc { openapi: string, paths: Record<string, Record<string, Operation>>, components: { schemas: Record<string, any> } }

// docs/api.md §3, every route, with every problem status it can return: the guard's 401 (not on
// open routes) and 403, 400 where there is a parameter or body to break, 413/415 where a body
// is parsed, 500 everywhere, and what each handler adds.
const PROBLEMS: Record<string, number[]> = {
  'GET /healthz': [403, 500],
  'GET /readyz': [403, 500],
  'GET /metrics': [401, 403, 500],
  'GET /openapi.json': [403, 500],
  'GET /v1/sandboxes': [401, 403, 500],
  'GET /v1/sandboxes/{sandboxId}': [400, 401, 403, 404, 500],
  'POST /v1/sandboxes/{sandboxId}/execs': [400, 401, 403, 404, 413, 415, 429, 500, 502, 503, 504],
  'POST /v1/sandboxes/{sandboxId}/execs/run': [400, 401, 403, 404, 413, 415, 429, 500, 502, 503, 504],
  'GET /v1/execs': [400, 401, 403, 500],
  'GET /v1/execs/{execId}': [400, 401, 403, 404, 500],
  'GET /v1/execs/{execId}/stream': [400, 401, 403, 404, 500],
  'GET /v1/execs/{execId}/events': [400, 401, 403, 404, 500],
  'POST /v1/execs/{execId}/signal': [400, 401, 403, 404, 409, 413, 415, 500],
  'POST /v1/execs/{execId}/read-token': [400, 401, 403, 404, 413, 415, 500],
  'DELETE /v1/execs/{execId}': [400, 401, 403, 404, 413, 415, 500]
}

// Statuses that are an answer, not a problem: /readyz's 503 is the probe saying "not now".
const NOT_PROBLEMS: Record<string, number[]> = { 'GET /readyz': [503] }

function operation (key: string): Operation {
  const [method, path] = key.split(' ') as [string, string]
  const op = doc.paths[path]?.[method.toLowerCase()]
  if (op === undefined) throw new Error(`${key} is not in the document`)
  return op
}

describe('OpenAPI document', () => {
  let g: TestGateway | undefined
  afterAll(async () => { await g?.close() })

  it('matches the routes (run `npm run openapi` after changing a route)', async () => {
    const fresh = serializeOpenApi(await generateOpenApiDocument())
    expect(JSON.parse(fresh)).toEqual(doc)
  })

  it('matches the SDK types in sdk/schema.ts (run `npm run openapi`)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'egw-sdk-'))
    try {
      writeFileSync(join(dir, 'openapi.json'), serializeOpenApi(await generateOpenApiDocument()))
      // The very command `npm run sdk` runs, pointed at the fresh document.
      const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }
      const [bin, ...args] = pkg.scripts.sdk!.split(' ')
      expect(bin).toBe('openapi-typescript')
      const argv = args.map((a) => a === 'openapi/openapi.json' ? join(dir, 'openapi.json') : a === 'sdk/schema.ts' ? join(dir, 'schema.ts') : a)
      expect(argv).toContain(join(dir, 'schema.ts'))
      await promisify(execFile)(process.execPath, [join(root, 'node_modules/openapi-typescript/bin/cli.js'), ...argv], { cwd: root })
      expect(readFileSync(join(dir, 'schema.ts'), 'utf8')).toBe(readFileSync(join(root, 'sdk/schema.ts'), 'utf8'))
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  })

  it('is served at /openapi.json', async () => {
    g = await startGateway()
    const res = await fetch(`${g.publicUrl}/openapi.json`)
    expect(res.status).toBe(200)
    expect(await res.json()).toEqual(doc)
    expect(doc.openapi).toBe('3.1.0')
  })

  it('has every route of docs/api.md §3 with every problem it can return', () => {
    const documented = Object.entries(doc.paths).flatMap(([path, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${path}`))
    expect(documented.sort(), 'a new or removed route? list it in PROBLEMS with every problem status it can return').toEqual(Object.keys(PROBLEMS).sort())
    for (const [key, statuses] of Object.entries(PROBLEMS)) {
      const responses = operation(key).responses
      expect(Object.keys(responses).map(Number).filter((s) => s >= 400 && !(NOT_PROBLEMS[key] ?? []).includes(s)), key).toEqual(statuses)
      for (const status of statuses) {
        const r = responses[String(status)]!
        expect(r.content, `${key} ${status}`).toEqual({ 'application/problem+json': { schema: { $ref: '#/components/schemas/Problem' } } })
        // Each problem response names its codes, and each code really has that status.
        const codes = [...r.description.matchAll(/`([a-z_]+)`/g)].map((m) => m[1]).filter(isErrorCode)
        expect(codes.length, `${key} ${status}: ${r.description}`).toBeGreaterThan(0)
        for (const code of codes) expect(errorTable[code].status, `${key} ${status} names ${code}`).toBe(status)
      }
    }
  })

  it('gives every operation a stable, unique operationId (generators name their methods after it)', () => {
    const ids = Object.values(doc.paths).flatMap((ops) => Object.values(ops).map((op) => (op as { operationId?: string }).operationId))
    expect(ids.every((id) => typeof id === 'string' && /^[a-z][A-Za-z]+$/.test(id)), JSON.stringify(ids)).toBe(true)
    expect(new Set(ids).size).toBe(ids.length)
    expect((operation('POST /v1/sandboxes/{sandboxId}/execs') as { operationId?: string }).operationId).toBe('createExec')
    expect((operation('GET /v1/execs/{execId}/events') as { operationId?: string }).operationId).toBe('getExecEvents')
    expect((operation('POST /v1/sandboxes/{sandboxId}/execs/run') as { operationId?: string }).operationId).toBe('runExec')
  })

  it('names the codes a client branches on', () => {
    for (const key of ['POST /v1/sandboxes/{sandboxId}/execs', 'POST /v1/sandboxes/{sandboxId}/execs/run']) {
      const create = operation(key).responses
      expect(create['404']!.description, key).toContain('`sandbox_not_found`')
      expect(create['429']!.description, key).toContain('`too_many_requests`')
      for (const code of ['sandbox_unavailable', 'relay_unavailable', 'shutting_down']) expect(create['503']!.description, key).toContain(`\`${code}\``)
      expect(create['502']!.description, key).toContain('`ssh_failed`')
      expect(create['504']!.description, key).toContain('`relay_open_timeout`')
    }
    expect(operation('POST /v1/execs/{execId}/signal').responses['409']!.description).toContain('`exec_finished`')
    for (const key of ['GET /v1/execs/{execId}', 'DELETE /v1/execs/{execId}', 'GET /v1/execs/{execId}/events', 'GET /v1/execs/{execId}/stream']) {
      expect(operation(key).responses['404']!.description, key).toContain('`exec_not_found`')
    }
  })

  it('gives each way of starting an exec one success shape, with Location, and Retry-After on 429', () => {
    const success = (key: string): string[] => Object.keys(operation(key).responses).filter((s) => s.startsWith('2'))
    const create = operation('POST /v1/sandboxes/{sandboxId}/execs')
    const run = operation('POST /v1/sandboxes/{sandboxId}/execs/run')
    // A generator types the one 2xx: createExec's is the background Exec, runExec's the result.
    expect(success('POST /v1/sandboxes/{sandboxId}/execs')).toEqual(['201'])
    expect(success('POST /v1/sandboxes/{sandboxId}/execs/run')).toEqual(['200'])
    expect(create.responses['201']!.content).toEqual({ 'application/json': { schema: { $ref: '#/components/schemas/Exec' } } })
    expect(run.responses['200']!.content).toEqual({ 'application/json': { schema: { $ref: '#/components/schemas/ExecResult' } } })
    for (const op of [create.responses['201']!, run.responses['200']!]) expect(op.headers).toHaveProperty('Location')
    for (const op of [create, run]) expect(op.responses['429']!.headers).toHaveProperty('Retry-After')
    // ?wait=true still works (test/integration/exec.test.ts), documented as deprecated; runExec has no wait.
    expect(create.parameters?.find((p) => p.name === 'wait')).toMatchObject({ in: 'query', deprecated: true })
    expect(run.parameters?.map((p) => `${p.in}:${p.name}`).sort()).toEqual(['path:sandboxId', 'query:encoding'])
  })

  it('references the request bodies as components and keeps no unused component', () => {
    const body = (key: string): unknown => (operation(key) as { requestBody?: { content: Record<string, { schema: unknown }> } }).requestBody?.content['application/json']?.schema
    expect(body('POST /v1/sandboxes/{sandboxId}/execs')).toEqual({ $ref: '#/components/schemas/ExecRequest' })
    expect(body('POST /v1/sandboxes/{sandboxId}/execs/run')).toEqual({ $ref: '#/components/schemas/ExecRequest' })
    expect(body('POST /v1/execs/{execId}/signal')).toEqual({ $ref: '#/components/schemas/SignalRequest' })
    const text = JSON.stringify({ ...doc, components: undefined })
    const componentsText = JSON.stringify(doc.components.schemas)
    for (const name of Object.keys(doc.components.schemas)) {
      const used = text.includes(`"#/components/schemas/${name}"`) || componentsText.includes(`"#/components/schemas/${name}"`)
      expect(used, `${name} is referenced`).toBe(true)
    }
  })

  it('names a server generators can use as a base URL', () => {
    expect((doc as unknown as { servers: Array<{ url: string }> }).servers).toEqual([expect.objectContaining({ url: 'http://127.0.0.1:8080' })])
  })

  it('marks the open routes as needing no token', () => {
    for (const key of ['GET /healthz', 'GET /readyz', 'GET /openapi.json']) expect(operation(key).security, key).toEqual([])
    const readable = ['GET /v1/execs/{execId}/events', 'GET /v1/execs/{execId}/stream']
    for (const key of Object.keys(PROBLEMS).filter((k) => (k.includes('/v1/') || k.includes('/metrics')) && !readable.includes(k))) expect(operation(key).security, key).toBeUndefined()
  })

  // The query parameter is the security scheme's (@fastify/swagger lists it there, not twice).
  it('lets only /events and /stream take a read token in the query', () => {
    const doc2 = doc as OpenApiDoc & { components: { securitySchemes: Record<string, unknown> } }
    expect(doc2.components.securitySchemes.readToken).toMatchObject({ type: 'apiKey', in: 'query', name: 'access_token' })
    for (const key of ['GET /v1/execs/{execId}/events', 'GET /v1/execs/{execId}/stream']) {
      expect(operation(key).security, key).toEqual([{ bearer: [] }, { readToken: [] }])
      expect(operation(key).parameters?.map((p) => `${p.in}:${p.name}`), key).not.toContain('query:access_token')
    }
    const mint = operation('POST /v1/execs/{execId}/read-token') as Operation & { operationId?: string }
    expect(mint.operationId).toBe('createExecReadToken')
    expect(mint.security).toBeUndefined()
    expect(mint.responses['404']!.description).toContain('`exec_not_found`')
  })

  it('describes the WebSocket attach: 101, subprotocols, offsets', () => {
    const op = operation('GET /v1/execs/{execId}/stream')
    expect(op.responses['101']!.description).toMatch(/WebSocket/)
    expect(op.responses['101']!.content).toBeUndefined()
    expect(op.parameters?.map((p) => `${p.in}:${p.name}`).sort()).toEqual(['path:execId', 'query:encoding', 'query:stderrOffset', 'query:stdoutOffset'])
    expect(op.description).toContain('exec-gateway.v1.binary')
    expect(op.description).toContain('exec-gateway.v1.json')
    expect(op.description).toContain('exec-gateway.bearer.<base64url(token)>')
    for (const code of ['1000', '1011', '1001', '1008']) expect(op.description).toContain(code)
  })

  it('has the event union and the WebSocket frames as components', () => {
    const s = doc.components.schemas
    const members = { stdout: 'StdoutEvent', stderr: 'StderrEvent', gap: 'GapEvent', heartbeat: 'HeartbeatEvent', relay: 'RelayEvent', exit: 'ExitEvent', error: 'ErrorEvent' }
    expect(s.ExecEvent.discriminator).toEqual({ propertyName: 'type', mapping: Object.fromEntries(Object.entries(members).map(([t, n]) => [t, `#/components/schemas/${n}`])) })
    expect(s.ExecEvent.oneOf).toEqual(Object.values(members).map((n) => ({ $ref: `#/components/schemas/${n}` })))
    for (const [type, name] of Object.entries(members)) expect(s[name].properties.type, name).toEqual({ type: 'string', enum: [type] })
    expect(s.StdoutEvent.required).toEqual(['type', 'offset', 'data'])
    expect(s.GapEvent.required).toEqual(['type', 'stream', 'from', 'to'])
    expect(s.ExitEvent.required).toEqual(['type', 'exitCode', 'signal', 'timedOut'])
    expect(s.ErrorEvent.required).toEqual(['type', 'code', 'status', 'detail', 'message'])
    // The named components and the union the gateway uses at run time are the same events.
    expect(ExecEventSchema.anyOf).toEqual(Object.values(ExecEventMembers))
    expect(Object.keys(ExecEventMembers)).toEqual(Object.values(members))

    const frames = { stdin: 'StdinFrame', eof: 'EofFrame', resize: 'ResizeFrame', signal: 'SignalFrame' }
    expect(s.ClientFrame.oneOf).toEqual(Object.values(frames).map((n) => ({ $ref: `#/components/schemas/${n}` })))
    for (const [type, name] of Object.entries(frames)) expect(s[name].properties.type, name).toEqual({ type: 'string', enum: [type] })
    expect(s.StdinFrame.required).toEqual(['type', 'data'])
    expect(s.ResizeFrame.required).toEqual(['type', 'cols', 'rows'])
    expect(s.SignalFrame.properties.signal.anyOf.map((x: { enum: string[] }) => x.enum[0])).toEqual(['TERM', 'KILL', 'INT', 'HUP', 'QUIT', 'USR1', 'USR2'])
    expect(s.BinaryOutputFrame).toMatchObject({ type: 'string', contentMediaType: 'application/octet-stream' })
    expect(s.BinaryOutputFrame.description).toMatch(/1 = stdout, 2 = stderr/)
    expect(s.BinaryStdinFrame.description).toMatch(/channel byte 0/)
    // The /events stream is documented as those events.
    const events = operation('GET /v1/execs/{execId}/events').responses['200']!.content!
    expect(Object.keys(events).sort()).toEqual(['application/x-ndjson', 'text/event-stream'])
    for (const media of Object.values(events)) expect(media.schema).toEqual({ $ref: '#/components/schemas/ExecEvent' })
    // The header that chooses between them, which generated clients must send for SSE.
    expect(operation('GET /v1/execs/{execId}/events').parameters).toContainEqual(expect.objectContaining({ in: 'header', name: 'Accept', required: false }))
    expect(operation('GET /v1/execs/{execId}/stream') as unknown).toMatchObject({
      'x-websocket-messages': { server: { text: { $ref: '#/components/schemas/ExecEvent' }, binary: { $ref: '#/components/schemas/BinaryOutputFrame' } }, client: { text: { $ref: '#/components/schemas/ClientFrame' }, binary: { $ref: '#/components/schemas/BinaryStdinFrame' } } }
    })
  })
})

describe('/docs', () => {
  let g: TestGateway | undefined
  afterAll(async () => { await g?.close() })

  it('serves swagger-ui with its own assets, without a token even when tokens are required', async () => {
    g = await startGateway({ apiTokens: ['t1'] })
    expect((await fetch(`${g.publicUrl}/v1/sandboxes`)).status).toBe(401)
    for (const page of ['/docs', '/docs/']) {
      const res = await fetch(g.publicUrl + page)
      expect(res.status, page).toBe(200)
      expect(res.headers.get('content-type')).toMatch(/^text\/html/)
      const html = await res.text()
      const assets = [...html.matchAll(/(?:href|src)="([^"]+)"/g)].map((m) => m[1]!)
      expect(assets.filter((a) => a.endsWith('.js')).length, page).toBeGreaterThanOrEqual(3)
      expect(assets.filter((a) => a.endsWith('.css')).length, page).toBeGreaterThanOrEqual(1)
      for (const asset of assets) {
        // Every asset is the gateway's own: the page works with no network access.
        const url = new URL(asset, g.publicUrl + page)
        expect(url.origin, asset).toBe(new URL(g.publicUrl).origin)
        const a = await fetch(url)
        expect(a.status, `${page} → ${asset}`).toBe(200)
        const type = a.headers.get('content-type') ?? ''
        if (asset.endsWith('.js')) expect(type, asset).toMatch(/javascript/)
        if (asset.endsWith('.css')) expect(type, asset).toMatch(/^text\/css/)
        expect((await a.arrayBuffer()).byteLength, asset).toBeGreaterThan(0)
      }
    }
    // The page loads the document from ./json: the same document.
    const spec = await fetch(`${g.publicUrl}/docs/json`)
    expect(spec.status).toBe(200)
    expect(await spec.json()).toEqual(doc)
  })
})

// The problems the document adds from plugins rather than handlers, seen for real.
describe('problems documented from the plugins', () => {
  let g: TestGateway | undefined
  afterAll(async () => { await g?.close() })

  it('400 on the WebSocket route, 415 on DELETE, 403 on an open route', async () => {
    g = await startGateway({ localSandbox: true })
    const created = await fetch(`${g.publicUrl}/v1/sandboxes/local/execs`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ command: ['sleep', '30'] }) })
    const { id } = await created.json() as { id: string }

    const upgrade = await new Promise<{ status: number, type: string, body: string }>((resolve, reject) => {
      const ws = new WebSocket(`${g!.publicUrl.replace(/^http/, 'ws')}/v1/execs/${id}/stream?stdoutOffset=-1`)
      ws.on('unexpected-response', (_req, res) => {
        let body = ''
        res.on('data', (d: Buffer) => { body += d.toString() })
        res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }))
      })
      ws.on('open', () => { ws.close(); reject(new Error('upgraded with an invalid offset')) })
      ws.on('error', () => {})
    })
    expect(upgrade.status).toBe(400)
    expect(upgrade.type).toMatch(/^application\/problem\+json/)
    expect(JSON.parse(upgrade.body)).toMatchObject({ code: 'invalid_argument' })

    const textBody = await fetch(`${g.publicUrl}/v1/execs/${id}`, { method: 'DELETE', headers: { 'content-type': 'text/plain' }, body: 'x' })
    expect(textBody.status).toBe(415)
    expect(await textBody.json()).toMatchObject({ code: 'unsupported_media_type' })
    expect((await fetch(`${g.publicUrl}/v1/execs/${id}`, { method: 'DELETE' })).status).toBe(204)

    const url = new URL(g.publicUrl)
    const foreign = await new Promise<number>((resolve, reject) => {
      request({ host: url.hostname, port: url.port, path: '/healthz', headers: { host: 'rebound.example' } }, (res) => { res.resume(); resolve(res.statusCode ?? 0) }).on('error', reject).end()
    })
    expect(foreign).toBe(403)
  })
})
