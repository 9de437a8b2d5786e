import { createHash, randomBytes } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import WebSocket from 'ws'
import { buildGateway, type Gateway } from '../../src/app.js'
import { Directory } from '../../src/cluster/directory.js'
import { defaultGatewayConfig } from '../../src/config.js'
import { loadDataDir, type GatewayIdentity } from '../../src/data-dir.js'
import { signSupervisorToken } from '../../src/tokens.js'
import { api, execStart } from '../helpers/api.js'
import { eventsFrom0, openOffsetReader, within } from '../helpers/restart-readers.js'
import { startRedisServer, type RedisServer } from '../helpers/redis-server.js'
import { startSupervisorProcess } from '../helpers/supervisor-process.js'
import { sleep, waitFor } from '../helpers/wait.js'

// Cluster mode's routing (issue 14): any replica answers any request. Two real gateways in
// cluster mode over a real redis-server; the sandbox's supervisor process holds its session on
// r0, and every request goes to r1, which forwards it to r0's internal listener (REST, SSE,
// NDJSON, and WebSocket bridged frame for frame) and lists the whole cluster.

interface Replica { gw: Gateway, publicUrl: string, replicaId: string }

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {})
})

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

async function twoReplicasOneSandbox (sandboxId: string, execRateLimitPerMinute = 0): Promise<{ r0: Replica, r1: Replica, identity: GatewayIdentity, dir: Directory, redis: RedisServer }> {
  const redis = await startRedisServer()
  cleanups.push(async () => { await redis.stop() })
  const dataDir = mkdtempSync(join(tmpdir(), 'egw-cluster-'))
  cleanups.push(async () => { rmSync(dataDir, { recursive: true, force: true }) })
  const identity = loadDataDir(dataDir)
  const replicas: Replica[] = []
  for (const replicaId of ['r0', 'r1']) {
    const config = defaultGatewayConfig({ dataDir, redisUrl: redis.url, replicaId, shutdownGraceMs: 1000, execRateLimitPerMinute })
    const gw = await buildGateway(config, { logger: pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' }), identity })
    const { publicUrl, supervisorUrl } = await gw.listen()
    cleanups.push(async () => { await gw.close() })
    replicas.push({ gw, publicUrl, replicaId })
    if (replicaId === 'r0') {
      const sup = startSupervisorProcess({ gatewayUrl: supervisorUrl, sandboxId, token: signSupervisorToken(identity.tokenSecret, sandboxId) })
      cleanups.push(async () => { await sup.stop() })
    }
  }
  const dir = new Directory({ url: redis.url, prefix: 'exec-gateway:', replicaId: 'test-reader', internalUrl: 'http://127.0.0.1:1', publicUrl: 'http://127.0.0.1:1' })
  cleanups.push(async () => { await dir.close({ deleteHeartbeat: true }) })
  await dir.start()
  await waitFor(async () => (await dir.owner(sandboxId))?.replicaId === 'r0', { timeoutMs: 10_000, description: `r0 owns ${sandboxId}` })
  await waitFor(async () => (await dir.replicas()).length >= 3, { timeoutMs: 5000, description: 'both replicas heartbeat' })
  return { r0: replicas[0]!, r1: replicas[1]!, identity, dir, redis }
}

describe('cluster mode: a replica that does not hold the sandbox forwards to the one that does', () => {
  it('REST through r1: ?wait=true with 2 MiB of output exact, the record, signal, DELETE; the exec ran on r0', async () => {
    const { r0, r1 } = await twoReplicasOneSandbox('fwd-1')
    const res = await api(r1.publicUrl, 'POST', '/v1/sandboxes/fwd-1/execs?wait=true&encoding=base64', { command: ['sh', '-c', 'head -c 2097152 /dev/zero | tr "\\0" "z"; echo e >&2; exit 6'] })
    expect(res.status).toBe(200)
    expect(res.body).toMatchObject({ status: 'exited', exitCode: 6, stdoutBytes: 2097152, stderrBytes: 2 })
    expect(sha(Buffer.from(res.body.stdout, 'base64'))).toBe(sha(Buffer.alloc(2097152, 'z')))
    expect(r0.gw.execs.get(res.body.id), 'the exec ran on r0').toBeDefined()
    expect(r1.gw.execs.get(res.body.id)).toBeUndefined()
    const rec = await api(r1.publicUrl, 'GET', `/v1/execs/${String(res.body.id)}`)
    expect(rec.status).toBe(200)
    expect(rec.body).toEqual((await api(r0.publicUrl, 'GET', `/v1/execs/${String(res.body.id)}`)).body)
    // runExec is forwarded as ?wait=true is.
    const ran = await api(r1.publicUrl, 'POST', '/v1/sandboxes/fwd-1/execs/run', { command: ['sh', '-c', 'printf ran; exit 5'] })
    expect(ran.status).toBe(200)
    expect(ran.body).toMatchObject({ status: 'exited', exitCode: 5, stdout: 'ran' })
    expect(ran.headers.get('location')).toBe(`/v1/execs/${String(ran.body.id)}`)
    expect(r0.gw.execs.get(ran.body.id), 'runExec ran on r0').toBeDefined()

    const long = await execStart(r1.publicUrl, 'fwd-1', { command: ['sleep', '30'] })
    const sig = await api(r1.publicUrl, 'POST', `/v1/execs/${long}/signal`, { signal: 'TERM' })
    expect(sig.status).toBe(202)
    await waitFor(async () => (await api(r1.publicUrl, 'GET', `/v1/execs/${long}`)).body.status === 'exited', { timeoutMs: 10_000, description: 'TERM ended the exec' })
    expect((await api(r1.publicUrl, 'GET', `/v1/execs/${long}`)).body).toMatchObject({ signal: 'TERM', exitCode: null })
    expect((await api(r1.publicUrl, 'DELETE', `/v1/execs/${long}`)).status).toBe(204)
    expect((await api(r0.publicUrl, 'GET', `/v1/execs/${long}`)).status).toBe(404)
    expect((await api(r1.publicUrl, 'GET', '/v1/execs/ex_nobodyknowsthisone')).status).toBe(404)
  }, 60_000)

  it('events through r1 stream as they happen (SSE first event before the command ends), bytes exact over NDJSON', async () => {
    const { r1 } = await twoReplicasOneSandbox('fwd-2')
    const id = await execStart(r1.publicUrl, 'fwd-2', { command: ['sh', '-c', 'echo a; sleep 2; echo b'] })
    const t0 = performance.now()
    const res = await fetch(`${r1.publicUrl}/v1/execs/${id}/events`, { headers: { accept: 'text/event-stream' } })
    expect(res.status).toBe(200)
    const reader = res.body!.getReader()
    let text = ''
    while (!text.includes('"data":"a\\n"')) {
      const { value, done } = await within(reader.read(), 5000, 'first SSE event')
      if (done === true) break
      text += Buffer.from(value).toString()
    }
    expect(performance.now() - t0, 'the first event came while the command still ran').toBeLessThan(1500)
    await reader.cancel()
    const j = await eventsFrom0(r1.publicUrl, id, 10_000)
    expect(j.problems).toEqual([])
    expect(j.bytes('stdout').toString()).toBe('a\nb\n')
    expect(j.final).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
  }, 60_000)

  it('a WebSocket attach through r1 is bridged: the binary subprotocol is selected as on r0, several MiB of stdin echoed by cat exactly, close 1000', async () => {
    const { r1 } = await twoReplicasOneSandbox('fwd-3')
    const id = await execStart(r1.publicUrl, 'fwd-3', { command: ['cat'], interactive: true })
    const ws = new WebSocket(`${r1.publicUrl.replace(/^http/, 'ws')}/v1/execs/${id}/stream`, ['exec-gateway.v1.binary'])
    const got: Buffer[] = []
    const closed = new Promise<number>((resolve) => ws.on('close', (code) => resolve(code)))
    ws.on('message', (m: Buffer, isBinary) => { if (isBinary && m[0] === 1) got.push(m.subarray(1)) })
    await within(new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) }), 5000, 'bridged WebSocket opens')
    expect(ws.protocol).toBe('exec-gateway.v1.binary')
    const input = randomBytes(3 * 1024 * 1024 + 11)
    for (let off = 0; off < input.length; off += 64 * 1024) ws.send(Buffer.concat([Buffer.from([0]), input.subarray(off, off + 64 * 1024)]))
    ws.send(JSON.stringify({ type: 'eof' }))
    expect(await within(closed, 30_000, 'exec ends')).toBe(1000)
    expect(sha(Buffer.concat(got))).toBe(sha(input))
  }, 60_000)

  it('a JSON WebSocket through r1 resumes from offsets like a direct one; an unknown exec is a plain HTTP 404', async () => {
    const { r1 } = await twoReplicasOneSandbox('fwd-4')
    const id = await execStart(r1.publicUrl, 'fwd-4', { command: ['sh', '-c', 'printf 0123456789; sleep 1; printf abc'] })
    const reader = openOffsetReader(r1.publicUrl, id, { stdout: 4, stderr: 0 })
    expect(await within(reader.closed, 10_000, 'the reader ends')).toBe(1000)
    expect(reader.journal.problems).toEqual([])
    expect(reader.journal.bytes('stdout').toString()).toBe('456789abc')
    const refused = await new Promise<number>((resolve) => {
      const ws = new WebSocket(`${r1.publicUrl.replace(/^http/, 'ws')}/v1/execs/ex_unknown/stream`)
      ws.on('unexpected-response', (_req, res) => { resolve(res.statusCode ?? 0); ws.terminate() })
      ws.on('error', () => {})
    })
    expect(refused).toBe(404)
  }, 60_000)

  it('lists see the whole cluster; the internal listener refuses a request without the replica key', async () => {
    const { r0, r1, dir } = await twoReplicasOneSandbox('fwd-5')
    const id = await execStart(r0.publicUrl, 'fwd-5', { command: ['true'] })
    const sandboxes = await api(r1.publicUrl, 'GET', '/v1/sandboxes')
    expect(sandboxes.status).toBe(200)
    expect(sandboxes.body.sandboxes.find((s: any) => s.id === 'fwd-5')).toMatchObject({ status: 'connected' })
    const one = await api(r1.publicUrl, 'GET', '/v1/sandboxes/fwd-5')
    expect(one.body).toMatchObject({ id: 'fwd-5', status: 'connected' })
    const execs = await api(r1.publicUrl, 'GET', '/v1/execs?sandboxId=fwd-5')
    expect(execs.body.execs.map((e: any) => e.id)).toContain(id)
    const internalUrl = (await dir.replica('r0'))!.internalUrl
    const bare = await fetch(`${internalUrl}/v1/sandboxes`)
    expect(bare.status).toBe(401)
  }, 60_000)

  it('the exec rate limit counts across the cluster: 5 a minute through either replica, the 6th is 429 on both', async () => {
    const { r0, r1 } = await twoReplicasOneSandbox('fwd-6', 5)
    const statuses: number[] = []
    for (const url of [r0.publicUrl, r1.publicUrl, r0.publicUrl, r1.publicUrl, r1.publicUrl]) {
      statuses.push((await api(url, 'POST', '/v1/sandboxes/fwd-6/execs', { command: ['true'] })).status)
    }
    expect(statuses).toEqual([201, 201, 201, 201, 201])
    for (const url of [r0.publicUrl, r1.publicUrl]) {
      const over = await api(url, 'POST', '/v1/sandboxes/fwd-6/execs', { command: ['true'] })
      expect(over.status).toBe(429)
      expect(over.body.code).toBe('too_many_requests')
      expect(Number(over.headers.get('retry-after'))).toBeGreaterThan(0)
    }
  }, 60_000)

  it('Redis stopped for 8 s mid-load: no exec lost, the owner keeps serving, the other replica answers 503 directory_unavailable at once for what only Redis knows, and all is well after without a restart', async () => {
    const { r0, r1, redis } = await twoReplicasOneSandbox('fwd-7')
    const long = await Promise.all([0, 1, 2].map(async (i) => await execStart(r1.publicUrl, 'fwd-7', { command: ['sh', '-c', `sleep 4; echo long-${i}`] })))
    await sleep(500)
    redis.pause()
    const during: number[] = []
    const startedDuring: string[] = []
    let refusedFast = 0
    try {
      const until = performance.now() + 8000
      while (performance.now() < until) {
        const local = await api(r0.publicUrl, 'POST', '/v1/sandboxes/fwd-7/execs?wait=true', { command: ['sh', '-c', 'echo during'] })
        during.push(local.status)
        expect(local.body).toMatchObject({ status: 'exited', exitCode: 0, stdout: 'during\n' })
        startedDuring.push(local.headers.get('location')!.split('/').pop()!)
        const t = performance.now()
        const viaR1 = await api(r1.publicUrl, 'POST', '/v1/sandboxes/fwd-7/execs', { command: ['true'] })
        expect(viaR1.status).toBe(503)
        expect(viaR1.body.code).toBe('directory_unavailable')
        if (performance.now() - t < 2500) refusedFast++
        await sleep(300)
      }
    } finally {
      redis.resume()
    }
    expect(during.length).toBeGreaterThan(5)
    expect(refusedFast, 'refusals within the directory\'s bound, never a hang').toBe(during.length)
    for (const [i, id] of long.entries()) {
      await waitFor(async () => (await api(r0.publicUrl, 'GET', `/v1/execs/${id}`)).body.status === 'exited', { timeoutMs: 10_000, description: `long-${i} ends` })
      const j = await eventsFrom0(r0.publicUrl, id, 5000)
      expect(j.bytes('stdout').toString()).toBe(`long-${i}\n`)
    }
    // Recovered by itself: forwarding works again.
    await waitFor(async () => (await api(r1.publicUrl, 'POST', '/v1/sandboxes/fwd-7/execs?wait=true', { command: ['sh', '-c', 'echo back'] })).body?.stdout === 'back\n', { timeoutMs: 10_000, description: 'forwarding again after Redis is back' })
    expect((await api(r1.publicUrl, 'GET', `/v1/execs/${long[0]!}`)).body).toMatchObject({ status: 'exited', exitCode: 0 })
    // What Redis missed is written once it is back: the other replica finds the execs that
    // started and ended meanwhile.
    for (const id of startedDuring) {
      await waitFor(async () => (await api(r1.publicUrl, 'GET', `/v1/execs/${id}`)).status === 200, { timeoutMs: 5000, description: `${id} is found through r1` })
      expect((await api(r1.publicUrl, 'GET', `/v1/execs/${id}`)).body).toMatchObject({ id, status: 'exited', exitCode: 0, stdoutBytes: 7 })
    }
  }, 90_000)
})
