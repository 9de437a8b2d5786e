import { spawnSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import { buildGateway } from '../../src/app.js'
import { defaultGatewayConfig } from '../../src/config.js'
import { loadDataDir } from '../../src/data-dir.js'
import { signSupervisorToken } from '../../src/tokens.js'
import { api, execStart, readEvents } from '../helpers/api.js'
import { killGatewayProcess, restartGatewayProcess, startGatewayProcess, type GatewayProcess } from '../helpers/gateway-process.js'
import { startTcpProxy } from '../helpers/tcp-proxy.js'
import { startRedisServer, type RedisServer } from '../helpers/redis-server.js'
import { eventsFrom0, runBySh, sha, startDashboardReader, within } from '../helpers/restart-readers.js'
import { startSupervisorProcess } from '../helpers/supervisor-process.js'
import { sleep, waitFor } from '../helpers/wait.js'

// A replica SIGKILLed in cluster mode (issue 14), with real processes: redis-server, an
// `exec-gateway serve` replica process we kill, a second replica, supervisor processes with the
// embedded daemon, and haproxy in front where the supervisor must find its way to the survivor.
// A kept exec whose supervisor comes back elsewhere ends with its true exit and exact bytes; an
// exec whose sandbox is gone with the replica ends with 503 relay_unavailable once, readable from
// every replica, and the replica's successor under the same id does not change that.

const REATTACH_MS = 2000
const cleanups: Array<() => Promise<void>> = []
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {})
})

async function world (): Promise<{ redis: RedisServer, dataDir: string, r0: GatewayProcess, r1: { publicUrl: string, supervisorUrl: string }, token: (id: string) => string }> {
  const redis = await startRedisServer()
  cleanups.push(async () => { await redis.stop() })
  const dataDir = mkdtempSync(join(tmpdir(), 'egw-kill-'))
  cleanups.push(async () => { rmSync(dataDir, { recursive: true, force: true }) })
  const identity = loadDataDir(dataDir)
  const cluster = ['--redis-url', redis.url, '--internal-listen', '127.0.0.1:0', '--reattach-timeout-ms', String(REATTACH_MS)]
  const r0 = await startGatewayProcess({ dataDir, localSandbox: false, extraArgs: [...cluster, '--replica-id', 'r0'] })
  cleanups.push(async () => { await r0.stop() })
  const config = defaultGatewayConfig({ dataDir, redisUrl: redis.url, replicaId: 'r1', shutdownGraceMs: 1000, execRateLimitPerMinute: 0, reattachTimeoutMs: REATTACH_MS })
  const gw = await buildGateway(config, { logger: pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' }), identity })
  const r1 = await gw.listen()
  cleanups.push(async () => { await gw.close() })
  return { redis, dataDir, r0, r1, token: (id) => signSupervisorToken(identity.tokenSecret, id) }
}

describe('cluster mode: a replica that is SIGKILLed', () => {
  it('a kept exec whose supervisor reconnects through the balancer to the survivor ends with its true exit and exact bytes', async () => {
    const { r0, r1, token } = await world()
    // The balancer: it sends the supervisor to r0, and to r1 once r0 is dead (as haproxy does
    // once its checks mark r0 down).
    const hp = (u: string): URL => new URL(u)
    const lb = await startTcpProxy({ targetHost: hp(r0.supervisorUrl).hostname, targetPort: Number(hp(r0.supervisorUrl).port) })
    cleanups.push(async () => { await lb.close() })
    const sup = startSupervisorProcess({ gatewayUrl: `http://${lb.host}:${lb.port}`, sandboxId: 'kill-1', token: token('kill-1') })
    cleanups.push(async () => { await sup.stop() })
    await waitFor(async () => (await api(r0.publicUrl, 'GET', '/v1/sandboxes/kill-1')).body?.status === 'connected', { timeoutMs: 10_000, description: 'kill-1 on r0' })
    const script = 'i=0; while [ $i -lt 80 ]; do printf "tick %03d\\n" $i; i=$((i+1)); sleep 0.05; done; exit 6'
    const execId = await execStart(r1.publicUrl, 'kill-1', { command: ['sh', '-c', script] })
    // Reads through r1, which forwards to r0 until r0 dies, and follows the exec after.
    const reader = startDashboardReader(r1.publicUrl, execId, 60_000)
    await waitFor(() => reader.seen.stdout > 50, { timeoutMs: 10_000, description: 'output flows' })
    await killGatewayProcess(r0)
    lb.setTarget(hp(r1.supervisorUrl).hostname, Number(hp(r1.supervisorUrl).port))
    const d = await within(reader.done, 40_000, 'the reader gets the end')
    const want = await runBySh(script)
    expect(sha(d.stdout)).toBe(sha(want.stdout))
    expect(d.final).toEqual({ type: 'exit', exitCode: 6, signal: null, timedOut: false })
    expect((await api(r1.publicUrl, 'GET', `/v1/execs/${execId}`)).body).toMatchObject({ status: 'exited', exitCode: 6 })
  }, 90_000)

  it('an exec whose sandbox died with the replica ends with 503 relay_unavailable once, on every replica; the replica\'s successor does not change it', async () => {
    const { r0, r1, token } = await world()
    const sup = startSupervisorProcess({ gatewayUrl: r0.supervisorUrl, sandboxId: 'gone-1', token: token('gone-1') })
    cleanups.push(async () => { await sup.stop() })
    await waitFor(async () => (await api(r0.publicUrl, 'GET', '/v1/sandboxes/gone-1')).body?.status === 'connected', { timeoutMs: 10_000, description: 'gone-1 on r0' })
    const execId = await execStart(r0.publicUrl, 'gone-1', { command: ['sleep', '120'] })
    await waitFor(async () => (await api(r1.publicUrl, 'GET', `/v1/execs/${execId}`)).body?.status === 'running', { timeoutMs: 10_000, description: 'running, seen through r1' })
    const killedAt = performance.now()
    await killGatewayProcess(r0)
    sup.signal('SIGKILL')
    let rec: any
    // Until it ends, nobody knows its state: a 503 to retry and a place in the cluster's list,
    // never a 404 (which says the exec is lost).
    const meanwhile = new Set<string>()
    let listed = false
    await waitFor(async () => {
      const r = await api(r1.publicUrl, 'GET', `/v1/execs/${execId}`)
      rec = r.body
      if (rec?.status !== 'failed') {
        meanwhile.add(`${r.status} ${String(rec?.code ?? rec?.status)}`)
        const list = (await api(r1.publicUrl, 'GET', '/v1/execs?sandboxId=gone-1')).body
        if (list?.execs?.some((e: any) => e.id === execId) === true) listed = true
      }
      return rec?.status === 'failed'
    }, { timeoutMs: 30_000, intervalMs: 200, description: 'the exec ends on r1' })
    expect([...meanwhile].filter((m) => m !== '503 replica_unavailable' && m !== '200 running')).toEqual([])
    expect(meanwhile.has('503 replica_unavailable')).toBe(true)
    expect(listed).toBe(true)
    const tookMs = performance.now() - killedAt
    console.log(`gone replica's exec ended after ${Math.round(tookMs)} ms`)
    expect(rec).toMatchObject({ id: execId, sandboxId: 'gone-1', status: 'failed', exitCode: null, error: { code: 'relay_unavailable', status: 503 } })
    // Heartbeat TTL (5 s) + the reattach bound (2 s), measured from the first of the reaper's
    // passes (every 3 s) that sees it missing, + a pass: under 18 s, and slack for a loaded host.
    expect(tookMs).toBeLessThan(25_000)
    const j = await eventsFrom0(r1.publicUrl, execId, 10_000)
    expect(j.final).toMatchObject({ type: 'error', code: 'relay_unavailable', status: 503 })
    const again = await restartGatewayProcess(r0)
    cleanups.push(async () => { await again.stop() })
    await waitFor(async () => (await api(again.publicUrl, 'GET', `/v1/execs/${execId}`)).status === 200, { timeoutMs: 20_000, description: 'the successor answers for the exec' })
    expect((await api(again.publicUrl, 'GET', `/v1/execs/${execId}`)).body).toEqual(rec)
  }, 90_000)
})

describe('cluster mode: a sandbox that comes back after the cluster ended its exec', () => {
  it('the exec is not rebuilt: its one end (503 relay_unavailable) stays, and the command still running in the sandbox is stopped', async () => {
    const { r0, r1, token } = await world()
    const hp = (u: string): URL => new URL(u)
    const lb = await startTcpProxy({ targetHost: hp(r0.supervisorUrl).hostname, targetPort: Number(hp(r0.supervisorUrl).port) })
    cleanups.push(async () => { await lb.close() })
    const sup = startSupervisorProcess({ gatewayUrl: `http://${lb.host}:${lb.port}`, sandboxId: 'late-1', token: token('late-1') })
    cleanups.push(async () => { sup.signal('SIGCONT'); await sup.stop() })
    await waitFor(async () => (await api(r0.publicUrl, 'GET', '/v1/sandboxes/late-1')).body?.status === 'connected', { timeoutMs: 10_000, description: 'late-1 on r0' })
    // A command line no other process here has, to find it in the process table.
    const marker = `sleep 117.${process.pid}`
    cleanups.push(async () => { spawnSync('pkill', ['-f', marker]) })
    const running = (): boolean => spawnSync('pgrep', ['-f', marker]).status === 0
    const execId = await execStart(r0.publicUrl, 'late-1', { command: ['sh', '-c', `${marker}; echo never`] })
    await waitFor(async () => (await api(r1.publicUrl, 'GET', `/v1/execs/${execId}`)).body?.status === 'running', { timeoutMs: 10_000, description: 'running, seen through r1' })
    // The sandbox is away (frozen) when its replica dies, and past the reattach bound.
    sup.signal('SIGSTOP')
    await killGatewayProcess(r0)
    let rec: any
    await waitFor(async () => { rec = (await api(r1.publicUrl, 'GET', `/v1/execs/${execId}`)).body; return rec?.status === 'failed' }, { timeoutMs: 30_000, intervalMs: 200, description: 'the cluster ends the exec' })
    expect(rec).toMatchObject({ status: 'failed', error: { code: 'relay_unavailable', status: 503 } })
    expect(running(), 'the command still runs in the frozen sandbox').toBe(true)
    // Back, through the balancer, on the survivor: its daemon still keeps the exec.
    lb.setTarget(hp(r1.supervisorUrl).hostname, Number(hp(r1.supervisorUrl).port))
    sup.signal('SIGCONT')
    await waitFor(async () => (await api(r1.publicUrl, 'GET', '/v1/sandboxes/late-1')).body?.status === 'connected', { timeoutMs: 20_000, description: 'late-1 on r1' })
    await waitFor(() => !running(), { timeoutMs: 10_000, intervalMs: 100, description: 'the command is stopped' })
    for (let i = 0; i < 10; i++) {
      expect((await api(r1.publicUrl, 'GET', `/v1/execs/${execId}`)).body).toEqual(rec)
      await sleep(200)
    }
    const j = await eventsFrom0(r1.publicUrl, execId, 10_000)
    expect(j.final).toMatchObject({ type: 'error', code: 'relay_unavailable', status: 503 })
    expect(j.problems).toEqual([])
  }, 90_000)
})

describe('cluster mode: a replica that drains while one of its kept execs waits for a sandbox that is gone', () => {
  it('lets the exec go without an outcome of its own: one end for the whole cluster (503 relay_unavailable), never shutting_down and then another', async () => {
    const { r0, r1, token } = await world()
    const sup = startSupervisorProcess({ gatewayUrl: r0.supervisorUrl, sandboxId: 'drain-gone', token: token('drain-gone') })
    cleanups.push(async () => { await sup.stop() })
    await waitFor(async () => (await api(r0.publicUrl, 'GET', '/v1/sandboxes/drain-gone')).body?.status === 'connected', { timeoutMs: 10_000, description: 'drain-gone on r0' })
    const execId = await execStart(r0.publicUrl, 'drain-gone', { command: ['sleep', '120'] })
    await waitFor(async () => (await api(r0.publicUrl, 'GET', `/v1/execs/${execId}`)).body?.status === 'running', { timeoutMs: 10_000, description: 'running' })
    // The sandbox's daemon dies with its supervisor: the run on r0 waits to reattach.
    sup.signal('SIGKILL')
    // A reader attached through r1 (forwarded to r0) while r0 drains.
    const reader = readEvents(r1.publicUrl, execId).catch(() => [] as any[])
    await sleep(300)
    await r0.stop()
    const seen = await within(reader, 20_000, 'the reader through r1 ends')
    expect(seen.filter((e: any) => e.type === 'error' || e.type === 'exit'), 'no end of r0\'s own').toEqual([])
    let rec: any
    await waitFor(async () => {
      rec = (await api(r1.publicUrl, 'GET', `/v1/execs/${execId}`)).body
      return rec?.status === 'failed'
    }, { timeoutMs: 30_000, intervalMs: 200, description: 'the cluster ends the exec' })
    expect(rec.error).toMatchObject({ code: 'relay_unavailable', status: 503 })
    const j = await eventsFrom0(r1.publicUrl, execId, 10_000)
    expect(j.final).toMatchObject({ type: 'error', code: 'relay_unavailable', status: 503 })
  }, 90_000)
})
