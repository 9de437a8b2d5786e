import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { api, outputOf, readWebSocket } from '../helpers/api.js'
import { startGatewayProcess, type GatewayProcess } from '../helpers/gateway-process.js'
import { createGatewayClient, type components } from '../../sdk/index.js'
import { sleep, waitFor } from '../helpers/wait.js'

// Exec read tokens against the built gateway as a process (its log output is what an operator
// keeps): minted with the bearer token, they open one exec's /events and /stream, read-only,
// until they expire, and never show in the log.

const BEARER = { authorization: 'Bearer ops-token' }
type ReadToken = components['schemas']['ReadToken']

describe('exec read tokens', () => {
  let gw: GatewayProcess
  const minted: string[] = []

  async function start (command: string[], extra: Record<string, unknown> = {}): Promise<string> {
    const res = await api(gw.publicUrl, 'POST', '/v1/sandboxes/local/execs', { command, ...extra }, BEARER)
    expect(res.status).toBe(201)
    return res.body.id as string
  }

  // Through the generated SDK, as a client's code would mint one.
  async function mint (execId: string, ttlSeconds?: number): Promise<ReadToken> {
    const client = createGatewayClient({ baseUrl: gw.publicUrl, token: 'ops-token' })
    const { data, error, response } = await client.POST('/v1/execs/{execId}/read-token', {
      params: { path: { execId }, query: ttlSeconds === undefined ? {} : { ttlSeconds } }
    })
    expect(response.status, JSON.stringify(error)).toBe(201)
    minted.push(data!.token)
    return data!
  }

  beforeAll(async () => {
    gw = await startGatewayProcess({ extraArgs: ['--api-token', 'ops-token'] })
  })
  afterAll(async () => { await gw?.stop() })

  it('is minted with the bearer token only, for an exec that exists, with a bounded lifetime', async () => {
    const id = await start(['true'])
    const before = Date.now()
    const t = await mint(id)
    expect(t.execId).toBe(id)
    expect(t.eventsUrl).toBe(`/v1/execs/${id}/events?access_token=${t.token}`)
    expect(t.streamUrl).toBe(`/v1/execs/${id}/stream?access_token=${t.token}`)
    const ttl = (Date.parse(t.expiresAt) - before) / 1000
    expect(ttl).toBeGreaterThan(298)
    expect(ttl).toBeLessThanOrEqual(301)
    const long = await mint(id, 3600)
    expect(Date.parse(long.expiresAt) - before).toBeGreaterThan(3590_000)
    for (const query of ['?ttlSeconds=0', '?ttlSeconds=3601', '?ttlSeconds=1.5', '?ttlSeconds=soon', '?ttl=60']) {
      const res = await api(gw.publicUrl, 'POST', `/v1/execs/${id}/read-token${query}`, undefined, BEARER)
      expect(res.status, query).toBe(400)
      expect(res.body.code).toBe('invalid_argument')
    }
    // A JSON body is not where the lifetime goes; an empty one is harmless.
    expect((await api(gw.publicUrl, 'POST', `/v1/execs/${id}/read-token`, {}, BEARER)).status).toBe(201)
    expect((await api(gw.publicUrl, 'POST', '/v1/execs/ex_nosuchexec/read-token', undefined, BEARER)).body.code).toBe('exec_not_found')
    expect((await api(gw.publicUrl, 'POST', `/v1/execs/${id}/read-token`)).status).toBe(401)
    // A read token cannot mint another (nor do anything but read).
    const again = await api(gw.publicUrl, 'POST', `/v1/execs/${id}/read-token?access_token=${t.token}`)
    expect(again.status).toBe(401)
    expect((await api(gw.publicUrl, 'GET', `/v1/execs/${id}?access_token=${t.token}`)).status).toBe(401)
    expect((await api(gw.publicUrl, 'DELETE', `/v1/execs/${id}?access_token=${t.token}`)).status).toBe(401)
    expect((await api(gw.publicUrl, 'GET', `/v1/execs?access_token=${t.token}`)).status).toBe(401)
  })

  it('opens SSE and NDJSON events of its exec, to the end and its 204, and no other exec', async () => {
    const id = await start(['sh', '-c', 'echo out; echo err >&2; exit 3'])
    const other = await start(['true'])
    const t = await mint(id)
    const sse = await fetch(gw.publicUrl + t.eventsUrl, { headers: { accept: 'text/event-stream' } })
    expect(sse.status).toBe(200)
    const text = await sse.text()
    expect(text).toContain('"data":"out\\n"')
    expect(text).toContain('"data":"err\\n"')
    const finalId = [...text.matchAll(/^id: (.+)$/gm)].map((m) => m[1]!).at(-1)!
    expect(finalId).toMatch(/-end$/)
    expect(text).toContain('"exitCode":3')
    const resumed = await fetch(gw.publicUrl + t.eventsUrl, { headers: { accept: 'text/event-stream', 'last-event-id': finalId } })
    expect(resumed.status).toBe(204)
    const ndjson = await api(gw.publicUrl, 'GET', t.eventsUrl)
    expect(ndjson.status).toBe(200)
    expect(ndjson.text.trim().split('\n').map((l) => JSON.parse(l).type).at(-1)).toBe('exit')
    const wrong = await api(gw.publicUrl, 'GET', `/v1/execs/${other}/events?access_token=${t.token}`)
    expect(wrong.status).toBe(401)
    expect(wrong.headers.get('www-authenticate')).toBe('Bearer realm="exec-gateway", error="invalid_token"')
    expect(wrong.body.detail).toBe('read token not valid for this exec')
  })

  it('opens the WebSocket read-only: events flow, and any client frame closes it with 1008 and reaches nothing', async () => {
    const id = await start(['sh', '-c', 'echo ready; read line; echo "got $line"'], { interactive: true, tty: false })
    const t = await mint(id)
    for (const frame of [{ type: 'stdin', data: 'typed\n' }, { type: 'eof' }, { type: 'signal', signal: 'KILL' }, { type: 'resize', cols: 100, rows: 30 }]) {
      const ws = await readWebSocket(gw.publicUrl, id, {
        query: `?access_token=${t.token}`,
        onOpen: (sock) => { sock.once('message', () => sock.send(JSON.stringify(frame))) }
      })
      expect(ws.closeCode, frame.type).toBe(1008)
      expect(ws.closeReason).toMatch(/read token .*read-only/)
      expect(outputOf(ws.events, 'stdout')).toBe('ready\n')
    }
    const binary = await readWebSocket(gw.publicUrl, id, {
      query: `?access_token=${t.token}`,
      protocols: ['exec-gateway.v1.binary'],
      onOpen: (sock) => { sock.once('message', () => sock.send(Buffer.concat([Buffer.from([0]), Buffer.from('typed\n')]))) }
    })
    expect(binary.closeCode).toBe(1008)
    // Neither the stdin, the eof nor the signal arrived: the exec still waits for its line.
    const state = await api(gw.publicUrl, 'GET', `/v1/execs/${id}`, undefined, BEARER)
    expect(state.body).toMatchObject({ status: 'running', stdinBytes: 0 })
    // The bearer token's socket still drives it.
    const driven = await readWebSocket(gw.publicUrl, id, {
      protocols: ['exec-gateway.v1.json', `exec-gateway.bearer.${Buffer.from('ops-token').toString('base64url')}`],
      onOpen: (sock) => { sock.send(JSON.stringify({ type: 'stdin', data: 'hello\n' })) }
    })
    expect(driven.closeCode).toBe(1000)
    expect(outputOf(driven.events, 'stdout')).toBe('ready\ngot hello\n')
    // A bad token is refused before the upgrade.
    await expect(readWebSocket(gw.publicUrl, id, { query: '?access_token=egr1.1.AAAA' })).rejects.toThrow(/401/)
  })

  it('stops opening anything once it has expired', async () => {
    const id = await start(['true'])
    const t = await mint(id, 1)
    await waitFor(async () => (await api(gw.publicUrl, 'GET', t.eventsUrl)).status === 401, { timeoutMs: 5000, intervalMs: 200 })
    const res = await api(gw.publicUrl, 'GET', t.eventsUrl)
    expect(res.body.detail).toBe('read token expired')
    await expect(readWebSocket(gw.publicUrl, id, { query: `?access_token=${t.token}` })).rejects.toThrow(/401/)
  })

  it('never shows in the log, whose request lines show it redacted', async () => {
    await sleep(100)
    const out = gw.output()
    expect(minted.length).toBeGreaterThan(4)
    for (const token of minted) {
      expect(out).not.toContain(token)
      expect(out).not.toContain(token.split('.')[2]!)
    }
    expect(out).toContain('access_token=[redacted]')
    expect(out).toContain('API request with a read token refused')
  })
})
