import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import { buildGateway, type Gateway } from '../../src/app.js'
import { Directory } from '../../src/cluster/directory.js'
import { defaultGatewayConfig } from '../../src/config.js'
import { loadDataDir, type GatewayIdentity } from '../../src/data-dir.js'
import { signSupervisorToken } from '../../src/tokens.js'
import { execStart, execWait as execWaitResponse, outputOf, readWebSocket } from '../helpers/api.js'
import { eventsFrom0, openOffsetReader, runBySh, sha, within } from '../helpers/restart-readers.js'
import { api } from '../helpers/api.js'
import { startTcpProxy } from '../helpers/tcp-proxy.js'
import { startRedisServer, type RedisServer } from '../helpers/redis-server.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { sleep, waitFor } from '../helpers/wait.js'

// Cluster mode's sandbox ownership (issue 14), with real parts: a real redis-server, two real
// gateways in cluster mode sharing one data dir's identity, and real supervisor processes with
// the embedded daemon. Exactly one replica holds a sandbox's claim at a time; a newer supervisor
// process on another replica takes it over, the older one never takes it back; a session that
// goes gives its claim up; Redis trouble ends no session and no exec.

interface Replica { gw: Gateway, publicUrl: string, supervisorUrl: string, replicaId: string }

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {})
})

async function cluster (n: number): Promise<{ redis: RedisServer, replicas: Replica[], identity: GatewayIdentity, dir: Directory }> {
  const redis = await startRedisServer()
  cleanups.push(async () => { await redis.stop() })
  const dataDir = mkdtempSync(join(tmpdir(), 'egw-cluster-'))
  cleanups.push(async () => { rmSync(dataDir, { recursive: true, force: true }) })
  const identity = loadDataDir(dataDir)
  const replicas: Replica[] = []
  for (let i = 0; i < n; i++) {
    const replicaId = `r${i}`
    const config = defaultGatewayConfig({ dataDir, redisUrl: redis.url, replicaId, shutdownGraceMs: 1000, execRateLimitPerMinute: 0, h2PingIntervalMs: 500, h2PingTimeoutMs: 1000 })
    const gw = await buildGateway(config, { logger: pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' }), identity })
    const { publicUrl, supervisorUrl } = await gw.listen()
    cleanups.push(async () => { await gw.close() })
    replicas.push({ gw, publicUrl, supervisorUrl, replicaId })
  }
  // A reader of the same directory, as another replica would read it.
  const dir = new Directory({ url: redis.url, prefix: 'exec-gateway:', replicaId: 'test-reader', internalUrl: 'http://127.0.0.1:1', publicUrl: 'http://127.0.0.1:1' })
  cleanups.push(async () => { await dir.close({ deleteHeartbeat: true }) })
  await dir.start()
  return { redis, replicas, identity, dir }
}

function supervisor (r: Replica | string, identity: GatewayIdentity, sandboxId: string): SupervisorProcess {
  const gatewayUrl = typeof r === 'string' ? r : r.supervisorUrl
  const sup = startSupervisorProcess({ gatewayUrl, sandboxId, token: signSupervisorToken(identity.tokenSecret, sandboxId) })
  cleanups.push(async () => { await sup.stop() })
  return sup
}

const execWait = async (url: string, sandboxId: string, req: Record<string, unknown>): Promise<any> => (await execWaitResponse(url, sandboxId, req)).body

const connected = (r: Replica, id: string): boolean => r.gw.registry.get(id)?.session !== undefined

async function ownerOf (dir: Directory, sandboxId: string): Promise<{ replicaId: string, fence: number } | undefined> {
  const o = await dir.owner(sandboxId)
  return o === undefined ? undefined : { replicaId: o.replicaId, fence: o.fence }
}

describe('cluster mode: one replica owns a sandbox at a time', () => {
  it('the replica holding the session owns the sandbox; its execs are recorded as its own; the claim goes with the session', async () => {
    const { replicas: [a], identity, dir } = await cluster(1)
    const sup = supervisor(a!, identity, 'own-1')
    await waitFor(async () => (await ownerOf(dir, 'own-1'))?.replicaId === 'r0', { timeoutMs: 10_000, description: 'r0 owns own-1' })
    expect((await dir.replicas()).map((x) => x.replicaId)).toContain('r0')
    const done = await execWait(a!.publicUrl, 'own-1', { command: ['sh', '-c', 'echo hi'] })
    expect(done).toMatchObject({ status: 'exited', exitCode: 0, stdout: 'hi\n' })
    await waitFor(async () => (await dir.execOwner(done.id))?.replicaId === 'r0', { timeoutMs: 5000, description: 'the exec is recorded as r0\'s' })
    expect(await dir.execOwner(done.id)).toEqual({ replicaId: 'r0', sandboxId: 'own-1' })
    await sup.stop()
    await waitFor(async () => (await ownerOf(dir, 'own-1')) === undefined, { timeoutMs: 5000, description: 'the claim is released when the session goes' })
  })

  it('a newer supervisor process on another replica takes the sandbox over; the older one never takes it back', async () => {
    const { replicas: [a, b], identity, dir } = await cluster(2)
    supervisor(a!, identity, 'move-1')
    await waitFor(async () => (await ownerOf(dir, 'move-1'))?.replicaId === 'r0', { timeoutMs: 10_000, description: 'r0 owns move-1' })
    const first = (await ownerOf(dir, 'move-1'))!
    supervisor(b!, identity, 'move-1')
    await waitFor(async () => (await ownerOf(dir, 'move-1'))?.replicaId === 'r1', { timeoutMs: 10_000, description: 'r1 owns move-1' })
    expect((await ownerOf(dir, 'move-1'))!.fence).toBeGreaterThan(first.fence)
    // r0 ends its session once its claim check sees the newer fence.
    await waitFor(() => !connected(a!, 'move-1'), { timeoutMs: 5000, description: 'r0 ends its now stale session' })
    // The older process keeps reconnecting to r0 (its backoff is at most 5 s) and is refused
    // every time: for 7 s, r0 never holds a session for long and r1 keeps the claim.
    let r0Connected = 0
    const until = Date.now() + 7000
    while (Date.now() < until) {
      if (connected(a!, 'move-1')) r0Connected++
      expect((await ownerOf(dir, 'move-1'))?.replicaId).toBe('r1')
      await sleep(100)
    }
    expect(r0Connected, 'samples (of ~70) in which r0 held a session for the older process').toBeLessThanOrEqual(5)
    expect(connected(b!, 'move-1')).toBe(true)
    const done = await execWait(b!.publicUrl, 'move-1', { command: ['sh', '-c', 'echo on-b'] })
    expect(done).toMatchObject({ status: 'exited', exitCode: 0, stdout: 'on-b\n' })
  }, 60_000)

  it('Redis stopped for 3 s ends no session and no exec; the claim is still there after', async () => {
    const { redis, replicas: [a], identity, dir } = await cluster(1)
    supervisor(a!, identity, 'pause-1')
    await waitFor(async () => (await ownerOf(dir, 'pause-1'))?.replicaId === 'r0', { timeoutMs: 10_000, description: 'r0 owns pause-1' })
    const before = (await ownerOf(dir, 'pause-1'))!
    const running = execWait(a!.publicUrl, 'pause-1', { command: ['sh', '-c', 'sleep 4; echo after'] })
    await sleep(300)
    redis.pause()
    try {
      // Execs start and end while Redis does not answer.
      const during = await execWait(a!.publicUrl, 'pause-1', { command: ['sh', '-c', 'echo during'] })
      expect(during).toMatchObject({ status: 'exited', exitCode: 0, stdout: 'during\n' })
      await sleep(2500)
      expect(connected(a!, 'pause-1')).toBe(true)
    } finally {
      redis.resume()
    }
    expect(await running).toMatchObject({ status: 'exited', exitCode: 0, stdout: 'after\n' })
    expect(connected(a!, 'pause-1')).toBe(true)
    await waitFor(async () => (await ownerOf(dir, 'pause-1').catch(() => undefined))?.fence === before.fence, { timeoutMs: 5000, description: 'the same claim after Redis answers again' })
  }, 60_000)

  it('a kept exec goes on when its supervisor process comes back on another replica: the new owner rebuilds it, a reader on the old one is told to reconnect (1012), true exit and exact bytes', async () => {
    const { replicas: [a, b], identity, dir } = await cluster(2)
    // The balancer in front of the supervisors: it sends the supervisor to r0 first, then to r1.
    const lb = await startTcpProxy({ targetHost: new URL(a!.supervisorUrl).hostname, targetPort: Number(new URL(a!.supervisorUrl).port) })
    cleanups.push(async () => { await lb.close() })
    supervisor(`http://${lb.host}:${lb.port}`, identity, 'home-1')
    await waitFor(async () => (await ownerOf(dir, 'home-1'))?.replicaId === 'r0', { timeoutMs: 10_000, description: 'r0 owns home-1' })
    const script = 'i=0; while [ $i -lt 60 ]; do printf "line %03d\\n" $i; i=$((i+1)); sleep 0.05; done; echo err >&2; exit 3'
    const execId = await execStart(a!.publicUrl, 'home-1', { command: ['sh', '-c', script] })
    const reader = openOffsetReader(a!.publicUrl, execId)
    await within(reader.opened, 5000, 'reader on r0 opens')
    await waitFor(() => reader.journal.next.stdout >= 5 * 9, { timeoutMs: 10_000, description: 'some output on r0' })
    const u = new URL(b!.supervisorUrl)
    lb.setTarget(u.hostname, Number(u.port))
    lb.resetAll()
    await waitFor(async () => (await ownerOf(dir, 'home-1'))?.replicaId === 'r1', { timeoutMs: 10_000, description: 'r1 owns home-1 once the supervisor is back there' })
    expect(await within(reader.closed, 5000, 'the reader on r0 is let go'), 'close code that says reconnect').toBe(1012)
    expect(reader.journal.final).toBeUndefined()
    expect(a!.gw.execs.get(execId), 'r0 dropped its record').toBeUndefined()
    // The reader reconnects where the exec now is, from its offsets.
    const resumed = openOffsetReader(b!.publicUrl, execId, { ...reader.journal.next })
    await within(resumed.opened, 10_000, 'reader on r1 opens')
    expect(await within(resumed.closed, 20_000, 'the exec ends on r1')).toBe(1000)
    const want = await runBySh(script)
    expect(resumed.journal.problems).toEqual([])
    expect(sha(Buffer.concat([reader.journal.bytes('stdout'), resumed.journal.bytes('stdout')]))).toBe(sha(want.stdout))
    expect(resumed.journal.bytes('stderr').toString()).toBe('err\n')
    expect(resumed.journal.final).toEqual({ type: 'exit', exitCode: 3, signal: null, timedOut: false })
    expect(await dir.execOwner(execId)).toEqual({ replicaId: 'r1', sandboxId: 'home-1' })
  }, 60_000)

  it('a finished exec stays readable from any replica after the replica that ran it is gone: the same record, its tail and exit over /events; DELETE forgets it everywhere', async () => {
    const { replicas: [a, b], identity } = await cluster(2)
    supervisor(a!, identity, 'fin-1')
    await waitFor(() => connected(a!, 'fin-1'), { timeoutMs: 10_000, description: 'fin-1 on r0' })
    const script = 'head -c 300000 /dev/urandom | base64; echo oops >&2; exit 5'
    const done = await execWait(a!.publicUrl, 'fin-1', { command: ['sh', '-c', script], timeoutSeconds: 60 })
    expect(done).toMatchObject({ status: 'exited', exitCode: 5 })
    const record = (await api(a!.publicUrl, 'GET', `/v1/execs/${done.id}`)).body
    await a!.gw.close()
    const fromB = await api(b!.publicUrl, 'GET', `/v1/execs/${done.id}`)
    expect(fromB.status).toBe(200)
    expect(fromB.body).toEqual(record)
    const j = await eventsFrom0(b!.publicUrl, done.id, 10_000)
    expect(j.problems).toEqual([])
    expect(j.bytes('stdout').toString()).toBe(done.stdout)
    expect(j.bytes('stderr').toString()).toBe('oops\n')
    expect(j.final).toEqual({ type: 'exit', exitCode: 5, signal: null, timedOut: false })
    // Over the WebSocket too (its handler once looked only at this replica's own records).
    const ws = await readWebSocket(b!.publicUrl, done.id)
    expect(ws.closeCode).toBe(1000)
    expect(ws.events.at(-1)).toEqual({ type: 'exit', exitCode: 5, signal: null, timedOut: false })
    expect(outputOf(ws.events, 'stderr')).toBe('oops\n')
    expect((await api(b!.publicUrl, 'POST', `/v1/execs/${done.id}/signal`, { signal: 'TERM' })).body.code).toBe('exec_finished')
    expect((await api(b!.publicUrl, 'DELETE', `/v1/execs/${done.id}`)).status).toBe(204)
    await waitFor(async () => (await api(b!.publicUrl, 'GET', `/v1/execs/${done.id}`)).status === 404, { timeoutMs: 5000, description: 'the deleted exec is gone from the cluster' })
  }, 60_000)

  it('a ?wait=true on the replica the exec moved away from answers with the true result, from the replica that has it now', async () => {
    const { replicas: [a, b], identity, dir } = await cluster(2)
    const lb = await startTcpProxy({ targetHost: new URL(a!.supervisorUrl).hostname, targetPort: Number(new URL(a!.supervisorUrl).port) })
    cleanups.push(async () => { await lb.close() })
    supervisor(`http://${lb.host}:${lb.port}`, identity, 'wait-1')
    await waitFor(async () => (await ownerOf(dir, 'wait-1'))?.replicaId === 'r0', { timeoutMs: 10_000, description: 'r0 owns wait-1' })
    const waiting = execWaitResponse(a!.publicUrl, 'wait-1', { command: ['sh', '-c', 'sleep 3; echo moved-but-true; exit 9'] })
    await sleep(800)
    const u = new URL(b!.supervisorUrl)
    lb.setTarget(u.hostname, Number(u.port))
    lb.resetAll()
    const res = await within(waiting, 30_000, '?wait=true answers')
    expect(res.status).toBe(200)
    expect(res.body).toMatchObject({ status: 'exited', exitCode: 9, stdout: 'moved-but-true\n' })
    expect(b!.gw.execs.get(res.body.id), 'the exec ended on r1').toBeDefined()
  }, 60_000)

  for (const via of [2, 1]) {
    it(`a ?wait=true forwarded to the replica the exec moved away from is taken back by the forwarder (${via === 1 ? 'which the exec moved to' : 'a third replica'}): the replica it left may then exit, the answer is the true result`, async () => {
      const { replicas, identity, dir } = await cluster(3)
      const [a, b] = replicas
      const sb = `wait-via-${via}`
      const lb = await startTcpProxy({ targetHost: new URL(a!.supervisorUrl).hostname, targetPort: Number(new URL(a!.supervisorUrl).port) })
      cleanups.push(async () => { await lb.close() })
      supervisor(`http://${lb.host}:${lb.port}`, identity, sb)
      await waitFor(async () => (await ownerOf(dir, sb))?.replicaId === 'r0', { timeoutMs: 10_000, description: `r0 owns ${sb}` })
      // Through r2 or r1, which forwards it to r0.
      const waiting = execWaitResponse(replicas[via]!.publicUrl, sb, { command: ['sh', '-c', 'sleep 4; echo forwarded-moved-true; exit 11'] })
      await waitFor(() => a!.gw.execs.list({ sandboxId: sb }).some((e) => e.status === 'running'), { timeoutMs: 10_000, description: 'running on r0' })
      const u = new URL(b!.supervisorUrl)
      lb.setTarget(u.hostname, Number(u.port))
      lb.resetAll()
      await waitFor(() => b!.gw.execs.list({ sandboxId: sb }).length > 0, { timeoutMs: 15_000, description: 'rebuilt on r1' })
      await waitFor(() => a!.gw.execs.list({ sandboxId: sb }).every((e) => e.movedAway || e.finished), { timeoutMs: 10_000, description: 'r0 let it go' })
      // r0 goes (a deploy): the wait no longer runs through it.
      await a!.gw.close()
      const res = await within(waiting, 30_000, '?wait=true answers')
      expect(res.status).toBe(200)
      expect(res.body).toMatchObject({ status: 'exited', exitCode: 11, stdout: 'forwarded-moved-true\n' })
    }, 60_000)
  }
})
