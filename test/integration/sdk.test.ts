import { describe, it, expect, beforeAll, afterAll } from 'vitest'
import { execFile } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { Ajv } from 'ajv'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import {
  createGatewayClient, endOffset, GatewayProblemError, isFinal,
  type ExecEvent, type GatewayClient, type OutputEvent
} from '../../sdk/index.js'

// The generated SDK against a real gateway and a real supervisor process, the way a user's
// code would drive it: everything here goes through createGatewayClient, so a document that
// no longer matches the gateway fails this file at run time and the type check before it.

const root = fileURLToPath(new URL('../..', import.meta.url))

// What the gateway really sends must also fit the committed document's components (the SDK's
// types only hold as long as it does).
const document = JSON.parse(readFileSync(join(root, 'openapi/openapi.json'), 'utf8')) as { components: unknown }
const ajv = new Ajv({ strict: false, validateFormats: false, allErrors: true })
ajv.addSchema({ $id: 'openapi', components: document.components })

function conforms (component: string, value: unknown): void {
  const validate = ajv.getSchema(`openapi#/components/schemas/${component}`)
  if (validate === undefined) throw new Error(`no component ${component}`)
  expect(validate(value), `${component} ${JSON.stringify(value)}: ${ajv.errorsText(validate.errors)}`).toBe(true)
}

async function collect (events: AsyncIterable<ExecEvent>): Promise<ExecEvent[]> {
  const out: ExecEvent[] = []
  for await (const ev of events) out.push(ev)
  return out
}

function output (events: ExecEvent[], stream: 'stdout' | 'stderr'): string {
  return events.filter((e): e is OutputEvent => e.type === stream).map((e) => e.data).join('')
}

// Reads until the stream has printed `marker`, then stops reading (which only detaches).
async function waitForOutput (client: GatewayClient, execId: string, marker: string): Promise<void> {
  let seen = ''
  for await (const ev of client.streamEvents(execId)) {
    if (ev.type === 'stdout') seen += ev.data
    if (seen.includes(marker)) return
    if (isFinal(ev)) break
  }
  throw new Error(`exec ${execId} ended before printing ${JSON.stringify(marker)}: ${JSON.stringify(seen)}`)
}

describe('the SDK against the embedded SSH daemon', () => {
  let sb: TestSandbox
  let client: GatewayClient
  const sandbox = 'sdk-embedded'

  beforeAll(async () => {
    sb = await startSandbox('embedded', sandbox)
    client = createGatewayClient({ baseUrl: sb.g.publicUrl })
  })
  afterAll(async () => { await sb?.close() })

  it('lists the sandboxes and reads one', async () => {
    const list = await client.GET('/v1/sandboxes')
    expect(list.response.status).toBe(200)
    expect(list.data?.sandboxes).toContainEqual(expect.objectContaining({ id: sandbox, status: 'connected' }))
    for (const s of list.data!.sandboxes) conforms('Sandbox', s)
    const one = await client.GET('/v1/sandboxes/{sandboxId}', { params: { path: { sandboxId: sandbox } } })
    expect(one.data).toMatchObject({ id: sandbox, status: 'connected', activeExecs: 0 })
  })

  it('runs a command with ?wait=true and gets the typed ExecResult', async () => {
    const { data, error, response } = await client.runAndWait(sandbox, { command: ['sh', '-c', 'echo out; printf ü >&2; exit 7'] })
    expect(error).toBeUndefined()
    expect(response.status).toBe(200)
    expect(data).toMatchObject({ status: 'exited', exitCode: 7, signal: null, timedOut: false, error: null, stdout: 'out\n', stderr: 'ü', stderrBytes: 2 })
    expect(response.headers.get('location')).toBe(`/v1/execs/${data!.id}`)
    conforms('ExecResult', data)
    const b64 = await client.runAndWait(sandbox, { command: ['printf', '\\377\\000'] }, { encoding: 'base64' })
    expect(Buffer.from(b64.data!.stdout, 'base64')).toEqual(Buffer.from([0xff, 0]))
  })

  it('returns problems as typed errors', async () => {
    const missing = await client.GET('/v1/execs/{execId}', { params: { path: { execId: 'ex_missing' } } })
    expect(missing.response.status).toBe(404)
    expect(missing.response.headers.get('content-type')).toMatch(/^application\/problem\+json/)
    expect(missing.error).toMatchObject({ status: 404, code: 'exec_not_found', title: 'Exec not found' })
    conforms('Problem', missing.error)
    const noSandbox = await client.runAndWait('sdk-nowhere', { command: ['true'] })
    expect(noSandbox.error?.code).toBe('sandbox_not_found')
    const invalid = await client.POST('/v1/sandboxes/{sandboxId}/execs', { params: { path: { sandboxId: sandbox } }, body: { command: [] } })
    expect(invalid.response.status).toBe(400)
    expect(invalid.error).toMatchObject({ code: 'invalid_argument' })
    const refused = await collect(client.streamEvents('ex_missing')).catch((err: unknown) => err)
    expect(refused).toBeInstanceOf(GatewayProblemError)
    expect((refused as GatewayProblemError).problem).toMatchObject({ code: 'exec_not_found', status: 404 })
  })

  it('starts an exec, follows it as NDJSON and SSE, and resumes from byte offsets', async () => {
    const started = await client.POST('/v1/sandboxes/{sandboxId}/execs', {
      params: { path: { sandboxId: sandbox } },
      body: { command: ['sh', '-c', 'printf "ab€d"; printf XYZ >&2; exit 3'] }
    })
    expect(started.response.status).toBe(201)
    const id = started.data!.id
    expect(started.response.headers.get('location')).toBe(`/v1/execs/${id}`)
    expect(started.data).toMatchObject({ sandboxId: sandbox, command: ['sh', '-c', 'printf "ab€d"; printf XYZ >&2; exit 3'] })

    const ndjson = await collect(client.streamEvents(id))
    const sse = await collect(client.streamEvents(id, { format: 'sse' }))
    expect(sse).toEqual(ndjson)
    expect(output(ndjson, 'stdout')).toBe('ab€d')
    expect(output(ndjson, 'stderr')).toBe('XYZ')
    expect(ndjson.at(-1)).toEqual({ type: 'exit', exitCode: 3, signal: null, timedOut: false })
    expect(ndjson.filter(isFinal)).toHaveLength(1)
    for (const ev of ndjson) conforms('ExecEvent', ev)

    const exec = await client.GET('/v1/execs/{execId}', { params: { path: { execId: id } } })
    expect(exec.data).toMatchObject({ status: 'exited', exitCode: 3, stdoutBytes: 6, stderrBytes: 3 })
    conforms('Exec', exec.data)
    const lastOut = ndjson.filter((e): e is OutputEvent => e.type === 'stdout').at(-1)!
    expect(endOffset(lastOut)).toBe(exec.data!.stdoutBytes)

    // "ab" is 2 bytes, "€" 3 more: resuming at 5 sends only "d"; at stderr 1, only "YZ".
    for (const format of ['ndjson', 'sse'] as const) {
      const rest = await collect(client.streamEvents(id, { format, stdoutOffset: 5, stderrOffset: 1 }))
      expect(rest.filter((e) => e.type === 'stdout')).toEqual([{ type: 'stdout', offset: 5, data: 'd' }])
      expect(rest.filter((e) => e.type === 'stderr')).toEqual([{ type: 'stderr', offset: 1, data: 'YZ' }])
      expect(rest.at(-1)).toMatchObject({ type: 'exit', exitCode: 3 })
    }
    const b64 = await collect(client.streamEvents(id, { encoding: 'base64' }))
    const outB64 = b64.filter((e): e is OutputEvent => e.type === 'stdout')
    expect(Buffer.concat(outB64.map((e) => Buffer.from(e.data, 'base64'))).toString()).toBe('ab€d')
    expect(endOffset(outB64.at(-1)!, 'base64')).toBe(6)

    const listed = await client.GET('/v1/execs', { params: { query: { sandboxId: sandbox, status: 'exited' } } })
    expect(listed.data?.execs.map((e) => e.id)).toContain(id)
  })

  it('signals a running exec, and refuses a signal once it has ended', async () => {
    const started = await client.POST('/v1/sandboxes/{sandboxId}/execs', {
      params: { path: { sandboxId: sandbox } },
      body: { command: ['sh', '-c', "trap 'echo got-TERM; exit 42' TERM; echo ready; while :; do sleep 0.05; done"] }
    })
    const execId = started.data!.id
    await waitForOutput(client, execId, 'ready\n')
    const sent = await client.POST('/v1/execs/{execId}/signal', { params: { path: { execId } }, body: { signal: 'TERM' } })
    expect(sent.response.status).toBe(202)
    expect(sent.data).toEqual({ execId, signal: 'TERM' })
    const events = await collect(client.streamEvents(execId))
    expect(output(events, 'stdout')).toBe('ready\ngot-TERM\n')
    expect(events.at(-1)).toEqual({ type: 'exit', exitCode: 42, signal: null, timedOut: false })
    const late = await client.POST('/v1/execs/{execId}/signal', { params: { path: { execId } }, body: { signal: 'KILL' } })
    expect(late.response.status).toBe(409)
    expect(late.error?.code).toBe('exec_finished')
  })

  it('stopping a stream early detaches; DELETE kills the exec and forgets it', async () => {
    const started = await client.POST('/v1/sandboxes/{sandboxId}/execs', {
      params: { path: { sandboxId: sandbox } },
      body: { command: ['sh', '-c', 'echo ready; sleep 30'] }
    })
    const execId = started.data!.id
    await waitForOutput(client, execId, 'ready\n')
    const still = await client.GET('/v1/execs/{execId}', { params: { path: { execId } } })
    expect(still.data?.status).toBe('running')
    const deleted = await client.DELETE('/v1/execs/{execId}', { params: { path: { execId } } })
    expect(deleted.response.status).toBe(204)
    expect(deleted.error).toBeUndefined()
    const gone = await client.GET('/v1/execs/{execId}', { params: { path: { execId } } })
    expect(gone.error?.code).toBe('exec_not_found')
  })

  it('is what the package exports as exec-gateway/sdk', async () => {
    const script = "const m = await import('exec-gateway/sdk'); console.log(typeof m.createGatewayClient, typeof m.endOffset)"
    const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script], { cwd: root })
    expect(stdout.trim()).toBe('function function')
  })
})

describe('the SDK against OpenSSH', () => {
  let sb: TestSandbox
  let client: GatewayClient
  const sandbox = 'sdk-openssh'

  beforeAll(async () => {
    sb = await startSandbox('openssh', sandbox)
    client = createGatewayClient({ baseUrl: sb.g.publicUrl })
  })
  afterAll(async () => { await sb?.close() })

  it('runs and waits, then replays the events from an offset', async () => {
    const { data } = await client.runAndWait(sandbox, { command: ['sh', '-c', 'echo one; echo two; exit 5'] })
    expect(data).toMatchObject({ status: 'exited', exitCode: 5, stdout: 'one\ntwo\n' })
    const rest = await collect(client.streamEvents(data!.id, { format: 'sse', stdoutOffset: 4 }))
    expect(output(rest, 'stdout')).toBe('two\n')
    expect(rest.at(-1)).toEqual({ type: 'exit', exitCode: 5, signal: null, timedOut: false })
  })
})

describe('the SDK with --api-token', () => {
  let sb: TestSandbox
  const sandbox = 'sdk-token'

  beforeAll(async () => { sb = await startSandbox('embedded', sandbox, { apiTokens: ['t1'] }) })
  afterAll(async () => { await sb?.close() })

  it('is refused without the token (401 unauthenticated) and served with it', async () => {
    const anonymous = createGatewayClient({ baseUrl: sb.g.publicUrl })
    const refused = await anonymous.GET('/v1/sandboxes')
    expect(refused.response.status).toBe(401)
    expect(refused.error?.code).toBe('unauthenticated')
    const wrong = await createGatewayClient({ baseUrl: sb.g.publicUrl, token: 't2' }).runAndWait(sandbox, { command: ['true'] })
    expect(wrong.error?.code).toBe('unauthenticated')
    const noStream = await collect(anonymous.streamEvents('ex_any')).catch((err: unknown) => err)
    expect((noStream as GatewayProblemError).status).toBe(401)
    // Health stays open, as the document says (security: []).
    expect((await anonymous.GET('/healthz')).data).toEqual({ status: 'ok' })

    const client = createGatewayClient({ baseUrl: sb.g.publicUrl, token: 't1' })
    const list = await client.GET('/v1/sandboxes')
    expect(list.data?.sandboxes.map((s) => s.id)).toContain(sandbox)
    const { data } = await client.runAndWait(sandbox, { command: ['echo', 'authorized'] })
    expect(data).toMatchObject({ exitCode: 0, stdout: 'authorized\n' })
    const events = await collect(client.streamEvents(data!.id))
    expect(output(events, 'stdout')).toBe('authorized\n')
  })
})
