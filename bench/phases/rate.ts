// Phase 2: execs per second of `true` with many concurrent clients, embedded and OpenSSH, against
// as many concurrent fresh ssh clients; with each process's CPU, where a rate limit comes from.
import { expect } from 'vitest'
import { inParallel } from '../../test/helpers/pool.js'
import { median, percentile } from '../../test/helpers/stats.js'
import { GOALS, RATE_CLIENTS, RATE_S } from '../knobs.js'
import { CLK_TCK, cpuTicksOfAll, processTree } from '../proc.js'
import { fixed, log, ms, type Results } from '../report.js'
import type { World } from '../world.js'

interface RateRun { perS: number, ok: number, failed: number, p50: number, p99: number, errors: string[], cpu: string }

// Named groups of pids, looked up when the run starts: their CPU is reported as % of one core.
type Procs = Record<string, () => number[]>

// RATE_CLIENTS clients calling one() back to back for RATE_S seconds.
async function measureRate (results: Results, label: string, one: () => Promise<void>, procs: Procs = {}): Promise<RateRun> {
  const lat: number[] = []
  const errors: string[] = []
  let failed = 0
  const pidsAtStart = Object.fromEntries(Object.entries(procs).map(([k, f]) => [k, f()]))
  const ticks0 = Object.fromEntries(Object.entries(pidsAtStart).map(([k, pids]) => [k, cpuTicksOfAll(pids)]))
  const c0 = process.cpuUsage()
  const t0 = performance.now()
  const deadline = t0 + RATE_S * 1000
  await Promise.all(Array.from({ length: RATE_CLIENTS }, async () => {
    while (performance.now() < deadline) {
      const s = performance.now()
      try { await one(); lat.push(performance.now() - s) } catch (err) { failed++; if (errors.length < 5) errors.push(String(err).slice(0, 300)) }
    }
  }))
  const elapsedS = (performance.now() - t0) / 1000
  const c1 = process.cpuUsage(c0)
  const pct = (cpuS: number): string => `${(cpuS / elapsedS * 100).toFixed(0)} %`
  const cpu = [
    ...Object.entries(pidsAtStart).map(([k, pids]) => `${k} ${pct((cpuTicksOfAll(pids) - ticks0[k]!) / CLK_TCK)}`),
    `bench client ${pct((c1.user + c1.system) / 1e6)}`
  ].join(', ')
  const res = { perS: lat.length / elapsedS, ok: lat.length, failed, p50: median(lat), p99: percentile(lat, 0.99), errors, cpu }
  log(`${label}: ${res.ok} ok, ${failed} failed in ${elapsedS.toFixed(1)} s → ${res.perS.toFixed(0)}/s; CPU (% of one core): ${cpu}`)
  results.notes.push(`execs/s ${label}: CPU as % of one core during the run: ${cpu}${Object.keys(procs).some((k) => k.startsWith('sshd')) ? ' (sshd: the listener and the live session processes with their reaped children)' : ''}`)
  return res
}

export async function execRate (world: World): Promise<void> {
  const { api, profiler, results } = world
  const e = world.setup
  const sshdTree = (): number[] => processTree(e.sshdPid)
  const sshOne = async (): Promise<void> => {
    const r = await e.ssh.run(['true'], { timeoutMs: 60_000 })
    if (r.code !== 0) throw new Error(`ssh true exited ${r.code}: ${r.stderr.trim()}`)
  }
  // A short warm-up fills the pools (ceil(50/8) connections per sandbox).
  await inParallel(RATE_CLIENTS * 2, RATE_CLIENTS, async () => {
    await api.execTrue(e.gwA.publicUrl, 'emb').catch(() => 0)
    await api.execTrue(e.gwA.publicUrl, 'ossh').catch(() => 0)
  })
  const gwPid = (): number[] => [e.gwA.pid]
  const emb = await profiler.profiled(e.gwA, 'rate-embedded', async () => await measureRate(results, 'embedded', async () => { await api.execTrue(e.gwA.publicUrl, 'emb') }, { gateway: gwPid, 'supervisor (embedded daemon, its children)': () => [e.supervisors[1]!.pid] }))
  const ossh = await profiler.profiled(e.gwA, 'rate-openssh', async () => await measureRate(results, 'OpenSSH', async () => { await api.execTrue(e.gwA.publicUrl, 'ossh') }, { gateway: gwPid, supervisor: () => [e.supervisors[0]!.pid], sshd: sshdTree }))
  const peer = await measureRate(results, 'fresh ssh clients', sshOne, { sshd: sshdTree })
  const d = (r: RateRun): string => `${r.perS.toFixed(0)}/s (p50 ${ms(r.p50)} ms, p99 ${ms(r.p99)} ms${r.failed > 0 ? `, **${r.failed} of ${r.ok + r.failed} failed**` : ''})`
  results.rows.push({ what: `execs/s, \`true\`, ${RATE_CLIENTS} concurrent clients, ${RATE_S} s, embedded daemon via supervisor`, gateway: d(emb), peer: '—', ratio: `${emb.perS.toFixed(0)}/s`, goal: '—' })
  results.rows.push({ what: `execs/s, \`true\`, ${RATE_CLIENTS} concurrent clients, ${RATE_S} s, OpenSSH via supervisor`, gateway: d(ossh), peer: `${RATE_CLIENTS} concurrent fresh \`ssh … true\`: ${d(peer)}`, ratio: `${fixed(ossh.perS / peer.perS, 1)}× the ssh rate`, goal: '—' })
  const embOverOssh = emb.perS / ossh.perS
  // The goal is stated at 50 clients.
  const isGoalRow = RATE_CLIENTS === 50
  results.rows.push({
    what: `execs/s through the gateway, embedded daemon ÷ OpenSSH (both via a supervisor process, ${RATE_CLIENTS} clients, the two rows above)`,
    gateway: `embedded ${emb.perS.toFixed(0)}/s`,
    peer: `OpenSSH ${ossh.perS.toFixed(0)}/s`,
    ratio: fixed(embOverOssh, 2),
    goal: isGoalRow ? `≥ ${GOALS.embeddedRateRatio.toFixed(1)}` : '—',
    met: isGoalRow ? embOverOssh >= GOALS.embeddedRateRatio : undefined
  })
  for (const [label, r] of [['embedded', emb], ['OpenSSH', ossh], ['ssh', peer]] as const) {
    if (r.failed > 0) results.failures.push(`execs/s ${label}: ${r.failed} failed, e.g. ${r.errors.join(' | ')}`)
  }
  expect(emb.failed + ossh.failed + peer.failed).toBe(0)
}
