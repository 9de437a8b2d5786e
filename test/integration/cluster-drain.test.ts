import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import { buildGateway, type Gateway } from '../../src/app.js'
import { Directory } from '../../src/cluster/directory.js'
import { FORWARDED_BY_HEADER } from '../../src/cluster/forward-headers.js'
import { deriveReplicaSecret, replicaAuthHeader } from '../../src/cluster/replica-auth.js'
import { defaultGatewayConfig } from '../../src/config.js'
import { loadDataDir } from '../../src/data-dir.js'
import { signSupervisorToken } from '../../src/tokens.js'
import { api, execStart } from '../helpers/api.js'
import { startHaproxy, type Haproxy } from '../helpers/haproxy.js'
import { startRedisServer } from '../helpers/redis-server.js'
import { runBySh, sha, startDashboardReader, within } from '../helpers/restart-readers.js'
import { startSupervisorProcess } from '../helpers/supervisor-process.js'
import { waitFor } from '../helpers/wait.js'

// A replica drained in cluster mode (issue 14), with real parts: two gateways in cluster mode
// over a real redis-server behind a real haproxy; a supervisor process with the embedded daemon
// dials haproxy. The replica that holds the sandbox shuts down (the SIGTERM path): /readyz turns
// 503, haproxy stops sending it new connections, the supervisor is told to move and opens its new
// session through haproxy on the other replica before leaving, that replica rebuilds the running
// execs, and readers attached through haproxy reconnect by offsets. Nothing fails: each exec ends
// with its true exit and exactly the bytes /bin/sh gives.

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {})
})

const hostPort = (url: string): string => new URL(url).host

interface Replica { gw: Gateway, publicUrl: string, supervisorUrl: string, replicaId: string, closed: boolean }

describe('cluster drain: a replica that shuts down moves its supervisors first', () => {
  it('running execs (silent, chatty) end with their true exit and exact bytes on the other replica; the reader through haproxy reconnects; the drained replica exits within its bound', async () => {
    const redis = await startRedisServer()
    cleanups.push(async () => { await redis.stop() })
    const dataDir = mkdtempSync(join(tmpdir(), 'egw-drain-'))
    cleanups.push(async () => { rmSync(dataDir, { recursive: true, force: true }) })
    const identity = loadDataDir(dataDir)
    const replicas: Replica[] = []
    for (const replicaId of ['r0', 'r1']) {
      const config = defaultGatewayConfig({ dataDir, redisUrl: redis.url, replicaId, shutdownGraceMs: 10_000, execRateLimitPerMinute: 0 })
      const gw = await buildGateway(config, { logger: pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' }), identity })
      const urls = await gw.listen()
      const r: Replica = { gw, ...urls, replicaId, closed: false }
      cleanups.push(async () => { if (!r.closed) await gw.close() })
      replicas.push(r)
    }
    const lb: Haproxy = await startHaproxy({ replicas: replicas.map((r) => ({ name: r.replicaId, publicAddr: hostPort(r.publicUrl), supervisorAddr: hostPort(r.supervisorUrl) })) })
    cleanups.push(async () => { await lb.stop() })
    for (const r of replicas) {
      await lb.waitServer('public_replicas', r.replicaId, 'UP')
      await lb.waitServer('supervisor_replicas', r.replicaId, 'UP')
    }
    const dir = new Directory({ url: redis.url, prefix: 'exec-gateway:', replicaId: 'test-reader', internalUrl: 'http://127.0.0.1:1', publicUrl: 'http://127.0.0.1:1' })
    cleanups.push(async () => { await dir.close({ deleteHeartbeat: true }) })
    await dir.start()
    const sup = startSupervisorProcess({ gatewayUrl: lb.supervisorUrl, sandboxId: 'drain-1', token: signSupervisorToken(identity.tokenSecret, 'drain-1') })
    cleanups.push(async () => { await sup.stop() })
    let ownerId = ''
    await waitFor(async () => { ownerId = (await dir.owner('drain-1'))?.replicaId ?? ''; return ownerId !== '' }, { timeoutMs: 10_000, description: 'a replica owns drain-1' })
    const owner = replicas.find((r) => r.replicaId === ownerId)!
    const other = replicas.find((r) => r.replicaId !== ownerId)!

    const silent = 'sleep 6; echo late; exit 3'
    const chatty = 'i=0; while [ $i -lt 120 ]; do printf "out %04d abcdefghij\\n" $i; printf "err %04d\\n" $i >&2; i=$((i+1)); sleep 0.05; done; exit 4'
    const silentId = await execStart(lb.publicUrl, 'drain-1', { command: ['sh', '-c', silent] })
    const chattyId = await execStart(lb.publicUrl, 'drain-1', { command: ['sh', '-c', chatty] })
    const reader = startDashboardReader(lb.publicUrl, chattyId, 60_000)
    await waitFor(() => reader.seen.stdout > 200, { timeoutMs: 10_000, description: 'the reader sees output' })
    // A blocking exec asked of the replica that stays (it forwards to the owner, then waits where
    // the exec goes), and lookups through it all along the move: an exec in transit is a 503 to
    // retry or its record, never a 404.
    const waited = api(other.publicUrl, 'POST', '/v1/sandboxes/drain-1/execs?wait=true', { command: ['sh', '-c', 'sleep 5; echo waited; exit 5'] })
    const lookups = new Map<number, number>()
    const poll = { on: true }
    const poller = (async () => {
      while (poll.on) {
        const r = await api(other.publicUrl, 'GET', `/v1/execs/${silentId}`).catch(() => undefined)
        if (r !== undefined) lookups.set(r.status, (lookups.get(r.status) ?? 0) + 1)
        await new Promise((resolve) => setTimeout(resolve, 25))
      }
    })()
    // What a replica with an older answer from the directory forwards to the draining one, up to
    // the moment it stops listening: that replica no longer holds the exec, which is no 404.
    const internalUrl = (await dir.replica(owner.replicaId))!.internalUrl
    const stale = new Map<number, number>()
    const stalePoller = (async () => {
      const headers = { ...replicaAuthHeader(deriveReplicaSecret(identity)), [FORWARDED_BY_HEADER]: 'test-reader' }
      while (poll.on) {
        const r = await api(internalUrl, 'GET', `/v1/execs/${silentId}`, undefined, headers).catch(() => undefined)
        if (r === undefined) break
        stale.set(r.status, (stale.get(r.status) ?? 0) + 1)
        await new Promise((resolve) => setTimeout(resolve, 10))
      }
    })()

    const t0 = performance.now()
    owner.closed = true
    const closing = owner.gw.close()
    // haproxy sees the drain on /readyz and stops sending it anything new.
    await lb.waitServer('public_replicas', owner.replicaId, 'DOWN', 5000)
    await waitFor(async () => (await dir.owner('drain-1'))?.replicaId === other.replicaId, { timeoutMs: 10_000, description: 'the sandbox moved to the other replica' })
    const moveMs = performance.now() - t0
    await within(closing, 15_000, 'the drained replica shuts down')
    const closeMs = performance.now() - t0
    console.log(`drain: sandbox moved after ${Math.round(moveMs)} ms; replica closed after ${Math.round(closeMs)} ms`)

    const d = await within(reader.done, 30_000, 'the reader gets the end')
    const wantChatty = await runBySh(chatty)
    expect(d.reconnects, 'the reader reconnected through haproxy').toBeGreaterThanOrEqual(1)
    expect(sha(d.stdout)).toBe(sha(wantChatty.stdout))
    expect(sha(d.stderr)).toBe(sha(wantChatty.stderr))
    expect(d.final).toEqual({ type: 'exit', exitCode: 4, signal: null, timedOut: false })

    await waitFor(async () => (await api(lb.publicUrl, 'GET', `/v1/execs/${silentId}`)).body.status === 'exited', { timeoutMs: 20_000, description: 'the silent exec ends' })
    poll.on = false
    await poller
    await stalePoller
    console.log(`drain: lookups through the replica that stayed by status: ${JSON.stringify(Object.fromEntries(lookups))}; forwarded to the drained one: ${JSON.stringify(Object.fromEntries(stale))}`)
    expect([...stale.keys()].filter((status) => status !== 200 && status !== 503), 'lookups forwarded to the drained replica').toEqual([])
    expect(stale.get(503) ?? 0, 'the drained replica said "moved on" once it had let go').toBeGreaterThan(0)
    expect([...lookups.keys()].filter((status) => status !== 200 && status !== 503), 'lookups during the move').toEqual([])
    expect(lookups.get(200) ?? 0).toBeGreaterThan(0)
    const w = await within(waited, 30_000, 'the blocking exec asked of the other replica answers')
    expect(w.status).toBe(200)
    expect(w.body).toMatchObject({ status: 'exited', exitCode: 5, stdout: 'waited\n' })
    const rec = (await api(lb.publicUrl, 'GET', `/v1/execs/${silentId}`)).body
    expect(rec).toMatchObject({ status: 'exited', exitCode: 3, error: null, stdoutBytes: 5 })
    const events = await fetch(`${lb.publicUrl}/v1/execs/${silentId}/events`, { headers: { accept: 'application/x-ndjson' } }).then(async (r) => await r.text())
    expect(events).toContain('"data":"late\\n"')
    expect(other.gw.execs.get(silentId), 'the exec now lives on the other replica').toBeDefined()
    const after = await api(lb.publicUrl, 'POST', '/v1/sandboxes/drain-1/execs?wait=true', { command: ['sh', '-c', 'echo after'] })
    expect(after.body).toMatchObject({ status: 'exited', exitCode: 0, stdout: 'after\n' })
    expect(wantChatty.code).toBe(4)
  }, 90_000)
})
