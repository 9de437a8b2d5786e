import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { loadDataDir } from '../../src/data-dir.js'
import { signSupervisorToken } from '../../src/tokens.js'
import { api, execStart } from '../helpers/api.js'
import { restartGatewayProcess, startGatewayProcess, type GatewayProcess } from '../helpers/gateway-process.js'
import { startHaproxy } from '../helpers/haproxy.js'
import { startRedisServer } from '../helpers/redis-server.js'
import { eventsFrom0, runBySh, sha, startDashboardReader, within } from '../helpers/restart-readers.js'
import { startSupervisorProcess } from '../helpers/supervisor-process.js'
import { sleep } from '../helpers/wait.js'

// A rolling restart of a three-replica cluster (issue 14), with real processes only: redis-server,
// three `exec-gateway serve` replicas in cluster mode on one data dir, haproxy in front, and two
// supervisor processes with the embedded daemon dialling haproxy. Under a steady load of short
// execs, long silent ones and attached readers, each replica in turn gets SIGTERM (it drains: its
// supervisors move to the others with their running execs) and is started again on the same ports
// once it has exited. Zero failed execs, every byte exactly once, and no sandbox is without a
// session for longer than a supervisor's reconnect bound.

const SANDBOXES = ['roll-a', 'roll-b']
const RECONNECT_BOUND_MS = 6000
const cleanups: Array<() => Promise<void>> = []
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {})
})

const hostPort = (url: string): string => new URL(url).host

describe('cluster rolling restart', () => {
  it('SIGTERM and restart each of three replicas in turn under load: no failed exec, exact bytes, sandboxes always served', async () => {
    const redis = await startRedisServer()
    cleanups.push(async () => { await redis.stop() })
    const dataDir = mkdtempSync(join(tmpdir(), 'egw-rolling-'))
    cleanups.push(async () => { rmSync(dataDir, { recursive: true, force: true }) })
    const identity = loadDataDir(dataDir)
    const replicas: GatewayProcess[] = []
    for (const id of ['r0', 'r1', 'r2']) {
      const gw = await startGatewayProcess({ dataDir, localSandbox: false, shutdownGraceMs: 10_000, extraArgs: ['--redis-url', redis.url, '--replica-id', id, '--internal-listen', '127.0.0.1:0'] })
      replicas.push(gw)
    }
    cleanups.push(async () => { await Promise.all(replicas.map(async (r) => await r.stop())) })
    const lb = await startHaproxy({ replicas: replicas.map((r, i) => ({ name: `r${i}`, publicAddr: hostPort(r.publicUrl), supervisorAddr: hostPort(r.supervisorUrl) })) })
    cleanups.push(async () => { await lb.stop() })
    const allUp = async (): Promise<void> => {
      for (let i = 0; i < replicas.length; i++) {
        await lb.waitServer('public_replicas', `r${i}`, 'UP', 15_000)
        await lb.waitServer('supervisor_replicas', `r${i}`, 'UP', 15_000)
      }
    }
    await allUp()
    for (const sb of SANDBOXES) {
      const sup = startSupervisorProcess({ gatewayUrl: lb.supervisorUrl, sandboxId: sb, token: signSupervisorToken(identity.tokenSecret, sb) })
      cleanups.push(async () => { await sup.stop() })
    }
    const connectedNow = async (): Promise<Set<string>> => {
      const r = await api(lb.publicUrl, 'GET', '/v1/sandboxes').catch(() => undefined)
      return new Set((r?.body?.sandboxes ?? []).filter((s: any) => s.status === 'connected').map((s: any) => s.id as string))
    }
    const t0 = Date.now()
    while ((await connectedNow()).size < SANDBOXES.length) {
      if (Date.now() - t0 > 15_000) throw new Error('the supervisors did not connect through haproxy')
      await sleep(100)
    }

    // Long silent execs, each with a reader that reconnects by offsets as the dashboard does.
    const longScript = (i: number): string => `sleep 1; echo start-${i}; sleep 22; echo long-${i}; exit ${10 + i}`
    // The oracle runs beside the roll: each takes as long as the exec.
    const oracles = [0, 1, 2, 3].map(async (i) => await runBySh(longScript(i)))
    const longs = await Promise.all(SANDBOXES.flatMap((sb, k) => [0, 1].map(async (j) => {
      const i = k * 2 + j
      const id = await execStart(lb.publicUrl, sb, { command: ['sh', '-c', longScript(i)] })
      return { i, id, reader: startDashboardReader(lb.publicUrl, id, 120_000) }
    })))

    // Steady short execs and a watch on the sessions, until the roll is over.
    const roll = { on: true }
    const shorts: Array<{ n: number, status: number, body: any }> = []
    const shortLoop = async (worker: number): Promise<void> => {
      for (let n = worker; roll.on; n += 2) {
        const sb = SANDBOXES[n % SANDBOXES.length]!
        const r = await api(lb.publicUrl, 'POST', `/v1/sandboxes/${sb}/execs?wait=true`, { command: ['sh', '-c', `echo short-${n}`] }).catch((err: Error) => ({ status: 0, body: { error: err.message } }))
        shorts.push({ n, status: r.status, body: r.body })
        await sleep(50)
      }
    }
    const gaps: Record<string, { since: number | undefined, max: number }> = Object.fromEntries(SANDBOXES.map((s) => [s, { since: undefined, max: 0 }]))
    const watch = async (): Promise<void> => {
      while (roll.on) {
        const now = Date.now()
        const up = await connectedNow()
        for (const sb of SANDBOXES) {
          const g = gaps[sb]!
          if (up.has(sb)) { if (g.since !== undefined) g.max = Math.max(g.max, now - g.since); g.since = undefined } else g.since ??= now
        }
        await sleep(200)
      }
    }
    const loops = [shortLoop(0), shortLoop(1), watch()]
    const tRoll = Date.now()

    for (let i = 0; i < replicas.length; i++) {
      await sleep(1500)
      const old = replicas[i]!
      const t = Date.now()
      await old.stop()
      console.log(`rolling: r${i} drained and exited in ${Date.now() - t} ms`)
      replicas[i] = await restartGatewayProcess(old)
      await allUp()
    }
    await sleep(1000)
    roll.on = false
    await Promise.all(loops)
    console.log(`rolling: the roll took ${Date.now() - tRoll} ms`)

    // A ?wait=true whose exec moved on while the replica holding the wait drained is answered
    // 503 replica_unavailable with the exec's id (docs/cluster.md): a client reads it by that id,
    // and it must have run exactly once, to its true end.
    let followed = 0
    for (const s of shorts) {
      if (s.status !== 503 || s.body?.code !== 'replica_unavailable' || typeof s.body?.execId !== 'string') continue
      followed++
      const j = await eventsFrom0(lb.publicUrl, s.body.execId, 30_000)
      s.status = j.final?.type === 'exit' && j.problems.length === 0 ? 200 : 599
      s.body = { ...j.final, stdout: j.bytes('stdout').toString(), problems: j.problems }
    }
    console.log(`rolling: ${followed} ?wait=true answered with the moved exec's id, read by it`)
    const failed = shorts.filter((s) => (s.status !== 200 || s.body?.exitCode !== 0 || s.body?.stdout !== `short-${s.n}\n`))
    console.log(`rolling: ${shorts.length} short execs, ${failed.length} failed; longest time without a session: ${JSON.stringify(Object.fromEntries(SANDBOXES.map((s) => [s, gaps[s]!.max])))} ms`)
    expect(failed.slice(0, 5), 'short execs that did not end with exit 0 and their output').toEqual([])
    expect(shorts.length).toBeGreaterThan(20)
    for (const sb of SANDBOXES) expect(gaps[sb]!.max, `${sb} without a session`).toBeLessThan(RECONNECT_BOUND_MS)
    for (const l of longs) {
      const d = await within(l.reader.done, 60_000, `long exec ${l.i} ends`)
      console.log(`rolling: long exec ${l.i} read to its end at +${Date.now() - tRoll} ms after ${d.reconnects} reconnects and ${d.events.filter((e) => e.type === 'relay').length} relay events`)
      const want = await oracles[l.i]!
      expect(sha(d.stdout), `long exec ${l.i}: stdout exact`).toBe(sha(want.stdout))
      expect(d.final).toEqual({ type: 'exit', exitCode: 10 + l.i, signal: null, timedOut: false })
    }
  }, 180_000)
})
