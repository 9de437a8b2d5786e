// Phase 6 (BENCH_ONLY=cluster): what a forwarded exec costs against a direct one in cluster mode
// (issue 14). A real redis-server, two `exec-gateway serve` processes in cluster mode on one data
// dir (one identity), and a supervisor process with the embedded daemon whose session is on r0.
// The same requests go to r0 (direct: it holds the sandbox) and to r1 (which forwards them to r0's
// internal listener), interleaved so that the machine's noise hits both alike: round trip of
// `true`, execs/s with 16 clients, stdout throughput over NDJSON and the binary WebSocket with
// the CPU of each replica process per MiB, and the time to the first byte of an SSE stream.
import { mkdtempSync, rmSync } from 'node:fs'
import http from 'node:http'
import os from 'node:os'
import { join } from 'node:path'
import { expect } from 'vitest'
import { loadDataDir } from '../../src/data-dir.js'
import { intEnv } from '../../test/helpers/env.js'
import { startGatewayProcess, type GatewayProcess } from '../../test/helpers/gateway-process.js'
import { inParallel } from '../../test/helpers/pool.js'
import { startRedisServer, type RedisServer } from '../../test/helpers/redis-server.js'
import { median, percentile } from '../../test/helpers/stats.js'
import { startSupervisorProcess, type SupervisorProcess } from '../../test/helpers/supervisor-process.js'
import { readZeros, sseFirstByte, type Transfer, type TransferMode } from '../cluster-streams.js'
import { GATEWAY_EXTRA_ARGS, GATEWAY_NODE_OPTIONS } from '../knobs.js'
import { CLK_TCK, cmdline, cpuTicksOfAll } from '../proc.js'
import { fixed, log, ms } from '../report.js'
import type { World } from '../world.js'

export const CLUSTER_RTT_N = intEnv('BENCH_CLUSTER_RTT_N', 300, 5, 10_000)
const SSE_N = intEnv('BENCH_CLUSTER_SSE_N', 200, 5, 10_000)
export const CLUSTER_CLIENTS = intEnv('BENCH_CLUSTER_CLIENTS', 16, 1, 1000)
// Each side gets two windows of this many seconds, in the order direct, forwarded, forwarded, direct.
const RATE_WINDOW_S = intEnv('BENCH_CLUSTER_RATE_S', 5, 1, 600)
export const CLUSTER_MIB = intEnv('BENCH_CLUSTER_MIB', 256, 1, 4096)
const TPUT_REPS = intEnv('BENCH_CLUSTER_TPUT_REPS', 3, 1, 20)
const WARMUP = 20
const SANDBOX = 'cl'

type Side = 'direct' | 'forwarded'

interface Cluster { redis: RedisServer, r0: GatewayProcess, r1: GatewayProcess, sup: SupervisorProcess }

// Both replicas are started as the bench starts its other gateways: rate limit off, the run's
// extra flags and NODE_OPTIONS; plus cluster mode on the run's redis and an internal listener on
// a free port.
async function replica (dataDir: string, redisUrl: string, replicaId: string): Promise<GatewayProcess> {
  return await startGatewayProcess({
    dataDir,
    localSandbox: false,
    shutdownGraceMs: 2000,
    extraArgs: ['--exec-rate-limit-per-minute', '0', '--redis-url', redisUrl, '--replica-id', replicaId, '--internal-listen', '127.0.0.1:0', ...GATEWAY_EXTRA_ARGS],
    env: GATEWAY_NODE_OPTIONS === '' ? {} : { NODE_OPTIONS: [process.env.NODE_OPTIONS ?? '', GATEWAY_NODE_OPTIONS].filter((o) => o !== '').join(' ') }
  })
}

async function withCluster (world: World, fn: (c: Cluster) => Promise<void>): Promise<void> {
  const stops: Array<() => Promise<unknown>> = []
  const dataDir = mkdtempSync(join(os.tmpdir(), 'egw-bench-cluster-'))
  stops.push(async () => { rmSync(dataDir, { recursive: true, force: true }) })
  try {
    // The identity is made once, before either replica reads it: no race on a fresh data dir.
    loadDataDir(dataDir)
    const redis = await startRedisServer()
    stops.push(async () => { await redis.stop() })
    const r0 = await replica(dataDir, redis.url, 'r0')
    stops.push(async () => await r0.stop())
    const r1 = await replica(dataDir, redis.url, 'r1')
    stops.push(async () => await r1.stop())
    const sup = startSupervisorProcess({ gatewayUrl: r0.supervisorUrl, sandboxId: SANDBOX, token: r0.token(SANDBOX) })
    stops.push(async () => { await sup.stop() })
    await world.api.waitConnected(r0.publicUrl, SANDBOX)
    await world.api.waitConnected(r1.publicUrl, SANDBOX)
    world.results.commands.push(
      `- cluster phase: redis-server (test/helpers/redis-server.ts): \`${cmdline(redis.pid)}\``,
      `- cluster phase, replica r0 (holds the sandbox): \`${cmdline(r0.pid)}\``,
      `- cluster phase, replica r1 (forwards to r0): \`${cmdline(r1.pid)}\``,
      `- cluster phase, supervisor on r0 (embedded daemon): \`${cmdline(sup.pid)}\``
    )
    await fn({ redis, r0, r1, sup })
  } finally {
    // Supervisor first, then the replicas, redis, the data dir.
    for (const stop of stops.reverse()) await stop().catch((err: unknown) => { log(`cluster teardown: ${String(err)}`) })
  }
}

const pct = (a: number, b: number): string => `${a >= b ? '+' : '−'}${Math.abs((a - b) / b * 100).toFixed(0)} %`
const delta = (a: number, b: number, unit: string, f: (v: number) => string): string => `${a >= b ? '+' : '−'}${f(Math.abs(a - b))} ${unit} (${pct(a, b)})`

function dist (v: readonly number[]): { p50: number, p90: number, p99: number } {
  return { p50: median(v), p90: percentile(v, 0.9), p99: percentile(v, 0.99) }
}

const distText = (v: readonly number[]): string => { const d = dist(v); return `p50 ${ms(d.p50)} ms, p90 ${ms(d.p90)} ms, p99 ${ms(d.p99)} ms` }
const distDelta = (f: readonly number[], d: readonly number[]): string => {
  const a = dist(f)
  const b = dist(d)
  return `p50 ${delta(a.p50, b.p50, 'ms', ms)}; p90 ${delta(a.p90, b.p90, 'ms', ms)}; p99 ${delta(a.p99, b.p99, 'ms', ms)}`
}

// CPU seconds of each replica and of the supervisor (with the commands it reaped) over fn.
async function cpuOver<T> (c: Cluster, fn: () => Promise<T>): Promise<{ value: T, r0: number, r1: number, sup: number, client: number }> {
  const t = [cpuTicksOfAll([c.r0.pid]), cpuTicksOfAll([c.r1.pid]), cpuTicksOfAll([c.sup.pid])]
  const u0 = process.cpuUsage()
  const value = await fn()
  const u = process.cpuUsage(u0)
  return { value, r0: (cpuTicksOfAll([c.r0.pid]) - t[0]!) / CLK_TCK, r1: (cpuTicksOfAll([c.r1.pid]) - t[1]!) / CLK_TCK, sup: (cpuTicksOfAll([c.sup.pid]) - t[2]!) / CLK_TCK, client: (u.user + u.system) / 1e6 }
}

// Round trips of `true`, one of each side per round, the order swapped every round.
async function roundTrips (world: World, base: Record<Side, string>): Promise<Record<Side, number[]>> {
  const out: Record<Side, number[]> = { direct: [], forwarded: [] }
  for (let i = 0; i < WARMUP + CLUSTER_RTT_N; i++) {
    for (const side of (i % 2 === 0 ? ['direct', 'forwarded'] : ['forwarded', 'direct']) as Side[]) {
      const t = await world.api.execTrue(base[side], SANDBOX)
      if (i >= WARMUP) out[side].push(t)
    }
  }
  return out
}

interface Rate { ok: number, seconds: number, lat: number[], cpu: { r0: number, r1: number, sup: number, client: number } }

// CLUSTER_CLIENTS clients looping `true` for RATE_WINDOW_S on one side; windows D F F D.
async function rates (world: World, c: Cluster, base: Record<Side, string>): Promise<Record<Side, Rate>> {
  const out: Record<Side, Rate> = {
    direct: { ok: 0, seconds: 0, lat: [], cpu: { r0: 0, r1: 0, sup: 0, client: 0 } },
    forwarded: { ok: 0, seconds: 0, lat: [], cpu: { r0: 0, r1: 0, sup: 0, client: 0 } }
  }
  for (const side of ['direct', 'forwarded', 'forwarded', 'direct'] as Side[]) {
    const r = out[side]
    const t0 = performance.now()
    const deadline = t0 + RATE_WINDOW_S * 1000
    const used = await cpuOver(c, async () => {
      await Promise.all(Array.from({ length: CLUSTER_CLIENTS }, async () => {
        while (performance.now() < deadline) r.lat.push(await world.api.execTrue(base[side], SANDBOX))
      }))
    })
    r.seconds += (performance.now() - t0) / 1000
    r.ok = r.lat.length
    for (const k of ['r0', 'r1', 'sup', 'client'] as const) r.cpu[k] += used[k]
  }
  return out
}

interface Run { t: Transfer, r0: number, r1: number, sup: number, client: number }

// One exec printing `bytes` zeros, started and read through one side. The command waits 0.5 s
// before it prints, so the reader is attached from offset 0 before the first byte (an attached
// reader gets flow control, never a gap); the rate is timed from the first byte to the end.
async function transfer (world: World, c: Cluster, base: string, mode: TransferMode, bytes: number): Promise<Run> {
  const r = await world.api.json<{ id: string }>(base, 'POST', `/v1/sandboxes/${SANDBOX}/execs`, { command: ['sh', '-c', 'sleep 0.5; exec head -c "$1" /dev/zero', 'sh', String(bytes)] })
  if (r.status !== 201) throw new Error(`start head on ${base}: ${r.status} ${JSON.stringify(r.body).slice(0, 300)}`)
  world.execIds.add(r.body.id)
  const used = await cpuOver(c, async () => await readZeros(base, r.body.id, mode))
  expect(used.value.bytes, `${mode} via ${base}: stdout bytes received`).toBe(bytes)
  return { t: used.value, r0: used.r0, r1: used.r1, sup: used.sup, client: used.client }
}

const MIB = 1024 * 1024
const mibps = (bytes: number, streamMs: number): number => bytes / MIB / (streamMs / 1000)

export async function clusterForwarding (world: World): Promise<void> {
  const { api, results } = world
  await withCluster(world, async (c) => {
    const base: Record<Side, string> = { direct: c.r0.publicUrl, forwarded: c.r1.publicUrl }

    // That r1 really forwards: an exec started through it runs on r0, and r1 holds none.
    const probe = await api.json<{ id: string }>(base.forwarded, 'POST', `/v1/sandboxes/${SANDBOX}/execs`, { command: ['sleep', '30'] })
    expect(probe.status).toBe(201)
    world.execIds.add(probe.body.id)
    expect([await api.activeExecs(base.direct), await api.activeExecs(base.forwarded)], 'active execs on r0, r1 with one exec started through r1').toEqual([1, 0])
    expect((await api.json(base.forwarded, 'DELETE', `/v1/execs/${probe.body.id}`)).status).toBe(204)

    await inParallel(64, CLUSTER_CLIENTS, async (i) => { await api.execTrue(i % 2 === 0 ? base.direct : base.forwarded, SANDBOX) })
    const rtt = await roundTrips(world, base)
    log(`cluster round trip (${CLUSTER_RTT_N} each): direct ${distText(rtt.direct)}; forwarded ${distText(rtt.forwarded)}`)
    results.rows.push({
      what: `cluster: exec round trip, \`true\` ?wait=true, sequential, ${CLUSTER_RTT_N} each interleaved (gateway column: forwarded, r1 → r0; peer column: direct on r0)`,
      gateway: distText(rtt.forwarded),
      peer: distText(rtt.direct),
      ratio: `overhead ${distDelta(rtt.forwarded, rtt.direct)}`,
      goal: '—'
    })

    const rate = await rates(world, c, base)
    const perS = (r: Rate): number => r.ok / r.seconds
    const cpuPct = (r: Rate): string => (['r0', 'r1', 'sup', 'client'] as const).map((k) => `${k === 'sup' ? 'supervisor' : k === 'client' ? 'bench client' : k} ${(r.cpu[k] / r.seconds * 100).toFixed(0)} %`).join(', ')
    const rateText = (r: Rate): string => `${perS(r).toFixed(0)} execs/s (p50 ${ms(median(r.lat))} ms, p99 ${ms(percentile(r.lat, 0.99))} ms)`
    for (const side of ['direct', 'forwarded'] as const) {
      const line = `cluster execs/s ${side}, ${CLUSTER_CLIENTS} clients, ${rate[side].seconds.toFixed(1)} s in two windows: ${rateText(rate[side])}; CPU as % of one core: ${cpuPct(rate[side])}`
      log(line)
      results.notes.push(line)
    }
    results.rows.push({
      what: `cluster: execs/s, \`true\`, ${CLUSTER_CLIENTS} concurrent clients, 2 × ${RATE_WINDOW_S} s per side (windows direct, forwarded, forwarded, direct)`,
      gateway: rateText(rate.forwarded),
      peer: rateText(rate.direct),
      ratio: `overhead ${delta(perS(rate.forwarded), perS(rate.direct), 'execs/s', (v) => v.toFixed(0))}; CPU per exec: r1 ${ms(rate.forwarded.cpu.r1 / rate.forwarded.ok * 1000)} ms, r0 ${ms(rate.forwarded.cpu.r0 / rate.forwarded.ok * 1000)} ms forwarded, r0 ${ms(rate.direct.cpu.r0 / rate.direct.ok * 1000)} ms direct`,
      goal: '—'
    })

    // Time to the first byte of an SSE stream: the replay of a finished exec, on a kept-alive
    // connection (so no TCP handshake on either side).
    const done = await api.json<{ id: string, exitCode: number }>(base.direct, 'POST', `/v1/sandboxes/${SANDBOX}/execs?wait=true`, { command: ['echo', 'hello'] })
    expect(done.body.exitCode).toBe(0)
    const agent = new http.Agent({ keepAlive: true, maxSockets: 4 })
    const ttfb: Record<Side, number[]> = { direct: [], forwarded: [] }
    try {
      for (let i = 0; i < WARMUP + SSE_N; i++) {
        for (const side of (i % 2 === 0 ? ['direct', 'forwarded'] : ['forwarded', 'direct']) as Side[]) {
          const t = await sseFirstByte(agent, base[side], done.body.id)
          if (i >= WARMUP) ttfb[side].push(t)
        }
      }
    } finally {
      agent.destroy()
    }
    log(`cluster SSE first byte (${SSE_N} each): direct ${distText(ttfb.direct)}; forwarded ${distText(ttfb.forwarded)}`)
    results.rows.push({
      what: `cluster: time to the first byte of GET /events as SSE (a finished exec's replay, kept-alive connection), ${SSE_N} each interleaved`,
      gateway: distText(ttfb.forwarded),
      peer: distText(ttfb.direct),
      ratio: `overhead ${distDelta(ttfb.forwarded, ttfb.direct)}`,
      goal: '—'
    })

    const bytes = CLUSTER_MIB * MIB
    const runs: Record<TransferMode, Record<Side, Run[]>> = { binary: { direct: [], forwarded: [] }, ndjson: { direct: [], forwarded: [] } }
    for (const mode of ['binary', 'ndjson'] as const) for (const side of ['direct', 'forwarded'] as const) await transfer(world, c, base[side], mode, Math.min(bytes, 32 * MIB))
    for (let rep = 0; rep < TPUT_REPS; rep++) {
      const order: Array<[TransferMode, Side]> = rep % 2 === 0
        ? [['binary', 'direct'], ['binary', 'forwarded'], ['ndjson', 'forwarded'], ['ndjson', 'direct']]
        : [['ndjson', 'direct'], ['ndjson', 'forwarded'], ['binary', 'forwarded'], ['binary', 'direct']]
      for (const [mode, side] of order) {
        const r = await transfer(world, c, base[side], mode, bytes)
        runs[mode][side].push(r)
        log(`cluster ${mode} ${side} rep ${rep + 1}: ${mibps(bytes, r.t.streamMs).toFixed(0)} MiB/s in ${(r.t.streamMs / 1000).toFixed(2)} s, ${r.t.frames} frames; CPU-s r0 ${r.r0.toFixed(2)}, r1 ${r.r1.toFixed(2)}, supervisor ${r.sup.toFixed(2)}, client ${r.client.toFixed(2)}`)
      }
    }
    for (const mode of ['binary', 'ndjson'] as const) {
      const rateOf = (side: Side): number => mibps(bytes, median(runs[mode][side].map((r) => r.t.streamMs)))
      // CPU milliseconds per MiB, median over the repetitions (one GC-heavy run skews a mean).
      const per = (side: Side, k: 'r0' | 'r1' | 'sup' | 'client'): number => median(runs[mode][side].map((r) => r[k])) / CLUSTER_MIB * 1000
      const cpuText = (side: Side): string => `CPU ms per MiB: r0 ${fixed(per(side, 'r0'))}, r1 ${fixed(per(side, 'r1'))}, supervisor ${fixed(per(side, 'sup'))}, client ${fixed(per(side, 'client'))}`
      const label = mode === 'binary' ? 'WebSocket, binary subprotocol' : 'GET /events, NDJSON, ?encoding=base64'
      results.rows.push({
        what: `cluster: stdout throughput, ${CLUSTER_MIB} MiB of zeros (\`head -c ${bytes} /dev/zero\`), ${label}, first byte → end, median of ${TPUT_REPS}`,
        gateway: `${rateOf('forwarded').toFixed(0)} MiB/s; ${cpuText('forwarded')}`,
        peer: `${rateOf('direct').toFixed(0)} MiB/s; ${cpuText('direct')}`,
        ratio: `overhead ${delta(rateOf('forwarded'), rateOf('direct'), 'MiB/s', (v) => v.toFixed(0))}; the forwarding replica r1 costs ${fixed(per('forwarded', 'r1'))} CPU ms per MiB`,
        goal: '—'
      })
    }
    results.notes.push(`cluster: two \`serve\` processes in cluster mode on one redis-server and one data dir; the sandbox's supervisor (embedded daemon) is connected to r0, so r0 runs every exec and r1 forwards each request to r0's internal listener. CPU of r0, r1 and the supervisor (with the commands it reaped) from /proc/PID/stat (utime + stime + cutime + cstime, ${CLK_TCK} ticks/s), of the bench client from process.cpuUsage(), each over the transfer. Throughput: MiB = 2^20 bytes; each exec waits 0.5 s before \`head\` prints, so the reader is attached from offset 0; every offset and byte checked. Round trips and execs/s go through the bench's keep-alive agent; r1 looks the owner up in Redis and opens a fresh connection to r0's internal listener for each forwarded request (src/cluster/forward-http.ts: keep-alive off on purpose)`)
  })
}
