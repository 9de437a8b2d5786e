// Phase 5 (BENCH_ONLY=keep): what a kept exec costs the sandbox, the embedded daemon side by side
// with OpenSSH's sshd in one run. On gateway A, N long silent execs at once on a supervisor with
// the embedded daemon (measured: that supervisor process) and on a supervisor bridging to the
// run's sshd (measured: the sshd processes that serve those sessions); then the same with every
// exec having first written BENCH_KEEP_OUTPUT_BYTES that no client read. Each scenario has fresh
// supervisors and sandbox ids, so one scenario's leftovers are not the next one's baseline.
import { readFileSync } from 'node:fs'
import { intEnv } from '../../test/helpers/env.js'
import type { GatewayProcess } from '../../test/helpers/gateway-process.js'
import { inParallel } from '../../test/helpers/pool.js'
import { median } from '../../test/helpers/stats.js'
import type { SupervisorProcess } from '../../test/helpers/supervisor-process.js'
import { sleep, waitFor } from '../../test/helpers/wait.js'
import { HOLD_COMMAND } from '../knobs.js'
import { cmdline, procStat, processTree, taggedProcesses } from '../proc.js'
import { Inspector } from '../profile.js'
import { log } from '../report.js'
import type { World } from '../world.js'

export const KEEP_N = intEnv('BENCH_KEEP_N', 100, 1, 1000)
// Up to the default --keep-bytes-per-exec (8 MiB), so the daemon's history holds all of it.
const KEEP_OUTPUT_BYTES = intEnv('BENCH_KEEP_OUTPUT_BYTES', 1024 * 1024, 1, 8 * 1024 * 1024)
// Samples of a Node process's memory, 1 s apart, after forced GCs; the median is reported.
const SAMPLES = 5
// Starts at a time per sandbox: below --max-pending-relays-per-sandbox (32) of gateway A.
const START_CONCURRENCY = 16

interface Mem { rssKiB: number, pssKiB: number, ussKiB: number }

// Rss, Pss and Uss of one process. Pss divides each shared page among the processes that map
// it, so forked sshd processes are not charged twice for the same pages; but a Node process's
// Pss also moves with how many other Node processes on the machine map the same binary, and Uss
// (its private pages) does not.
function smapsRollup (pid: number): Mem {
  const text = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8')
  const field = (name: string): number => {
    const m = new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(text)
    if (m === null) throw new Error(`no ${name} in /proc/${pid}/smaps_rollup`)
    return Number(m[1])
  }
  return { rssKiB: field('Rss'), pssKiB: field('Pss'), ussKiB: field('Private_Clean') + field('Private_Dirty') }
}

// The sshd listener and every sshd below it, keyed by pid and start time (a pid may be reused);
// the commands it runs (shells, sleep) are not sshd and are left out on both sides.
function sshdProcesses (listener: number): Map<string, Mem & { title: string }> {
  const out = new Map<string, Mem & { title: string }>()
  for (const pid of processTree(listener)) {
    try {
      const st = procStat(pid)
      if (st.comm !== 'sshd') continue
      out.set(`${pid}@${st.start}`, { ...smapsRollup(pid), title: cmdline(pid) })
    } catch { /* gone meanwhile */ }
  }
  return out
}

interface SshdDelta extends Mem { newProcesses: number, connections: number }

// What the sessions started between the two snapshots cost: the processes that are new, plus
// the growth of those that were there before. Processes that went away meanwhile (an idle pooled
// connection of an earlier phase closing) are left out rather than counted as savings.
function sshdDelta (before: Map<string, Mem>, after: Map<string, Mem & { title: string }>): SshdDelta {
  const d: SshdDelta = { rssKiB: 0, pssKiB: 0, ussKiB: 0, newProcesses: 0, connections: 0 }
  for (const [key, m] of after) {
    const b = before.get(key)
    d.rssKiB += m.rssKiB - (b?.rssKiB ?? 0)
    d.pssKiB += m.pssKiB - (b?.pssKiB ?? 0)
    d.ussKiB += m.ussKiB - (b?.ussKiB ?? 0)
    if (b === undefined) {
      d.newProcesses++
      // The unprivileged half of a connection ("sshd: user@notty"): one per SSH connection.
      if (m.title.includes('@notty')) d.connections++
    }
  }
  return d
}

interface Side { sandboxId: string, sup: SupervisorProcess, inspector: Inspector }

// A supervisor with an inspector, so that its memory is read after a full GC and not with the
// garbage of the last burst of starts in it. startSupervisorProcess passes the bench's own
// environment on and takes no env of its own, so NODE_OPTIONS is set just for the spawn.
async function startSide (world: World, gw: GatewayProcess, sandboxId: string, openssh: boolean): Promise<Side> {
  const prev = process.env.NODE_OPTIONS
  process.env.NODE_OPTIONS = [prev ?? '', '--inspect=127.0.0.1:0'].filter((o) => o !== '').join(' ')
  let sup: SupervisorProcess
  try {
    sup = world.supervisor(gw, sandboxId, openssh ? world.setup.sshd : undefined)
  } finally {
    if (prev === undefined) delete process.env.NODE_OPTIONS
    else process.env.NODE_OPTIONS = prev
  }
  // Inspector.attach only reads the process's output for the inspector URL, which a supervisor
  // prints the same way a gateway does.
  const inspector = await Inspector.attach(sup as unknown as GatewayProcess)
  await inspector.send('HeapProfiler.enable')
  await world.api.waitConnected(gw.publicUrl, sandboxId)
  return { sandboxId, sup, inspector }
}

// V8's view of the embedded supervisor after the GCs: what is live, as against what the
// allocator still holds (freed memory that glibc has not given back stays in RSS).
interface NodeMem { heapUsedKiB: number, arrayBuffersKiB: number }

async function nodeMemory (s: Side): Promise<NodeMem> {
  const r = await s.inspector.send<{ result: { value: string } }>('Runtime.evaluate', { expression: 'JSON.stringify(process.memoryUsage())', returnByValue: true })
  const m = JSON.parse(r.result.value) as { heapUsed: number, arrayBuffers: number }
  return { heapUsedKiB: m.heapUsed / 1024, arrayBuffersKiB: m.arrayBuffers / 1024 }
}

interface Reading { emb: Mem, embNode: NodeMem, osshSup: Mem, sshd: Map<string, Mem & { title: string }> }

async function reading (emb: Side, ossh: Side, sshdPid: number, label: string): Promise<Reading> {
  for (const s of [emb, ossh]) {
    await s.inspector.send('HeapProfiler.collectGarbage')
    await s.inspector.send('HeapProfiler.collectGarbage')
  }
  await sleep(1000)
  const e: Mem[] = []
  const o: Mem[] = []
  for (let i = 0; i < SAMPLES; i++) {
    if (i > 0) await sleep(1000)
    e.push(smapsRollup(emb.sup.pid))
    o.push(smapsRollup(ossh.sup.pid))
  }
  const med = (ms: Mem[]): Mem => ({ rssKiB: median(ms.map((m) => m.rssKiB)), pssKiB: median(ms.map((m) => m.pssKiB)), ussKiB: median(ms.map((m) => m.ussKiB)) })
  // sshd is C with no collector: one snapshot is as good as a median.
  const r: Reading = { emb: med(e), embNode: await nodeMemory(emb), osshSup: med(o), sshd: sshdProcesses(sshdPid) }
  const sum = [...r.sshd.values()].reduce((a, m) => ({ rssKiB: a.rssKiB + m.rssKiB, pssKiB: a.pssKiB + m.pssKiB }), { rssKiB: 0, pssKiB: 0 })
  log(`${label}: embedded supervisor RSS ${mib(r.emb.rssKiB)} PSS ${mib(r.emb.pssKiB)} USS ${mib(r.emb.ussKiB)} (V8 heap ${mib(r.embNode.heapUsedKiB)}, Buffers ${mib(r.embNode.arrayBuffersKiB)}); sshd ${r.sshd.size} processes RSS ${mib(sum.rssKiB)} PSS ${mib(sum.pssKiB)}; bridging supervisor RSS ${mib(r.osshSup.rssKiB)}`)
  return r
}

function mib (kib: number): string {
  return `${(kib / 1024).toFixed(1)} MiB`
}

interface ExecListing { execs: Array<{ id: string, status: string, stdoutBytes: number, error: unknown }> }

// Every one of ids running, having written `bytes` of stdout; throws if one ended.
async function waitRunning (world: World, gw: GatewayProcess, sandboxId: string, ids: readonly string[], bytes: number): Promise<void> {
  const mine = new Set(ids)
  await waitFor(async () => {
    const r = await world.api.json<ExecListing>(gw.publicUrl, 'GET', `/v1/execs?sandboxId=${sandboxId}`)
    const list = r.body.execs.filter((x) => mine.has(x.id))
    const ended = list.find((x) => x.status === 'exited' || x.status === 'failed')
    if (ended !== undefined) throw new Error(`a kept exec on ${sandboxId} ended early: ${JSON.stringify(ended).slice(0, 500)}`)
    return list.filter((x) => x.status === 'running' && x.stdoutBytes === bytes).length === ids.length
  }, { timeoutMs: 120_000, intervalMs: 500, description: `${ids.length} execs on ${sandboxId} running with ${bytes} bytes of stdout` })
}

async function startExecs (world: World, gw: GatewayProcess, sandboxId: string, command: readonly string[]): Promise<string[]> {
  return await inParallel(KEEP_N, START_CONCURRENCY, async () => {
    const r = await world.api.json<{ id: string }>(gw.publicUrl, 'POST', `/v1/sandboxes/${sandboxId}/execs`, { command })
    if (r.status !== 201) throw new Error(`start on ${sandboxId}: ${r.status} ${JSON.stringify(r.body).slice(0, 300)}`)
    world.execIds.add(r.body.id)
    return r.body.id
  })
}

function perExec (kib: number): string {
  return `${(kib / KEEP_N).toFixed(1)} KiB`
}

// One scenario: N execs of `command` on each daemon at once, each having written `bytes`.
async function scenario (world: World, tag: string, what: string, command: readonly string[], bytes: number): Promise<void> {
  const { api, results } = world
  const gw = world.setup.gwA
  const sshdPid = world.setup.sshdPid
  if (sshdPid === undefined) throw new Error('the run\'s sshd listener was not found in /proc')
  const emb = await startSide(world, gw, `keep-emb-${tag}`, false)
  const ossh = await startSide(world, gw, `keep-ossh-${tag}`, true)
  const ids: string[] = []
  try {
    if (tag === 'silent') results.commands.push(`- supervisors of the kept-execs phase (one pair per scenario, NODE_OPTIONS=--inspect=127.0.0.1:0 to force GCs), e.g. \`${cmdline(emb.sup.pid)}\` and \`${cmdline(ossh.sup.pid)}\``)
    // Code paths loaded and compiled in both supervisors before the baseline.
    for (const s of [emb, ossh]) await inParallel(16, 4, async () => { await api.execTrue(gw.publicUrl, s.sandboxId) })
    await sleep(2000)
    const before = await reading(emb, ossh, sshdPid, `${tag}: before`)
    const t0 = performance.now()
    const [embIds, osshIds] = await Promise.all([startExecs(world, gw, emb.sandboxId, command), startExecs(world, gw, ossh.sandboxId, command)])
    ids.push(...embIds, ...osshIds)
    await Promise.all([waitRunning(world, gw, emb.sandboxId, embIds, bytes), waitRunning(world, gw, ossh.sandboxId, osshIds, bytes)])
    log(`${tag}: ${KEEP_N} execs running on each daemon${bytes > 0 ? `, ${bytes} bytes of stdout each` : ''} after ${((performance.now() - t0) / 1000).toFixed(1)} s`)
    await sleep(2000)
    const held = await reading(emb, ossh, sshdPid, `${tag}: with ${KEEP_N} execs`)
    // A figure taken while some exec had already ended would not be the figure of N kept execs.
    await Promise.all([waitRunning(world, gw, emb.sandboxId, embIds, bytes), waitRunning(world, gw, ossh.sandboxId, osshIds, bytes)])

    const embD = { rssKiB: held.emb.rssKiB - before.emb.rssKiB, pssKiB: held.emb.pssKiB - before.emb.pssKiB, ussKiB: held.emb.ussKiB - before.emb.ussKiB }
    const sshD = sshdDelta(before.sshd, held.sshd)
    const supD = held.osshSup.rssKiB - before.osshSup.rssKiB
    const ratio = (a: number, b: number): string => b > 0 ? (a / b).toFixed(2) : 'n/a'
    results.rows.push({
      what: `${KEEP_N} kept execs at once, ${what}: sandbox-side memory per exec (gateway column: embedded daemon; peer: OpenSSH)`,
      gateway: `supervisor process RSS ${mib(before.emb.rssKiB)} → ${mib(held.emb.rssKiB)}, PSS ${mib(before.emb.pssKiB)} → ${mib(held.emb.pssKiB)}, USS ${mib(before.emb.ussKiB)} → ${mib(held.emb.ussKiB)}: **${perExec(embD.rssKiB)} RSS, ${perExec(embD.pssKiB)} PSS, ${perExec(embD.ussKiB)} USS per exec** (of which live Buffers ${perExec(held.embNode.arrayBuffersKiB - before.embNode.arrayBuffersKiB)} and V8 heap ${perExec(held.embNode.heapUsedKiB - before.embNode.heapUsedKiB)}, from process.memoryUsage())`,
      peer: `sshd: ${sshD.newProcesses} new processes (${sshD.connections} SSH connections), RSS +${mib(sshD.rssKiB)}, PSS +${mib(sshD.pssKiB)}, USS +${mib(sshD.ussKiB)}: **${perExec(sshD.rssKiB)} RSS, ${perExec(sshD.pssKiB)} PSS, ${perExec(sshD.ussKiB)} USS per exec**; plus the bridging supervisor, RSS +${perExec(supD)} per exec`,
      ratio: `per exec, embedded ÷ sshd: PSS ${ratio(embD.pssKiB, sshD.pssKiB)}, USS ${ratio(embD.ussKiB, sshD.ussKiB)}`,
      goal: '—'
    })

    const t1 = performance.now()
    await inParallel(ids.length, 16, async (i) => {
      const r = await api.json(gw.publicUrl, 'DELETE', `/v1/execs/${ids[i]}`)
      if (r.status !== 204) throw new Error(`DELETE ${ids[i]}: ${r.status} ${JSON.stringify(r.body)}`)
    })
    await waitFor(async () => await api.activeExecs(gw.publicUrl) === 0, { timeoutMs: 120_000, intervalMs: 500, description: `every ${tag} kept exec to end` })
    await waitFor(() => taggedProcesses(new Set(ids)).length === 0, { timeoutMs: 30_000, intervalMs: 500, description: `no ${tag} exec process left` })
    log(`${tag}: DELETE of ${ids.length} execs done in ${((performance.now() - t1) / 1000).toFixed(1)} s`)
    // Whether the memory comes back once the daemon has forgotten them (or the allocator keeps it).
    const after = await reading(emb, ossh, sshdPid, `${tag}: after DELETE`)
    const sshdPss = (r: Reading): string => mib([...r.sshd.values()].reduce((a, m) => a + m.pssKiB, 0))
    results.notes.push(`kept execs, ${tag}: after the DELETE of all, the embedded supervisor's RSS was ${mib(after.emb.rssKiB)} (USS ${mib(after.emb.ussKiB)}, live Buffers ${mib(after.embNode.arrayBuffersKiB)}; before the execs: RSS ${mib(before.emb.rssKiB)}, with them: ${mib(held.emb.rssKiB)}); the sshd processes' PSS ${sshdPss(before)} before, ${sshdPss(held)} with the execs, ${sshdPss(after)} after (${after.sshd.size} processes: the pooled connections stay open until --ssh-idle-close-ms)`)
  } finally {
    for (const s of [emb, ossh]) { s.inspector.close(); await s.sup.stop() }
  }
}

export async function keptExecs (world: World): Promise<void> {
  await scenario(world, 'silent', `silent (\`${HOLD_COMMAND.join(' ')}\`)`, HOLD_COMMAND, 0)
  const outputCommand = ['sh', '-c', 'head -c "$1" /dev/zero && exec sleep 600', 'sh', String(KEEP_OUTPUT_BYTES)]
  await scenario(world, 'output', `each after ${(KEEP_OUTPUT_BYTES / 1024).toFixed(0)} KiB of stdout that no client read (\`${outputCommand.join(' ')}\`)`, outputCommand, KEEP_OUTPUT_BYTES)
  world.results.notes.push(
    `kept execs: per exec = (reading with ${KEEP_N} execs − reading before) / ${KEEP_N}, both daemons at once on gateway A (pool on: up to 8 execs per SSH connection). Embedded daemon: Rss, Pss and Uss (Private_Clean + Private_Dirty) of the supervisor process from /proc/PID/smaps_rollup, median of ${SAMPLES} samples 1 s apart after two forced full GCs (inspector). OpenSSH: the sum over the sshd processes that are new (one privileged and one user process per connection) plus the growth of those already there, from the same file (their RSS counts the pages they share with the listener once per process: PSS and USS are the figures to compare); the commands themselves (shells, sleep, head) are counted on neither side, and neither is the kernel's pipe and socket memory. The output was read by the gateway (nobody was attached, so the gateway took it into its retention): what the embedded daemon still holds of it is its replay history (live Buffers, up to --keep-bytes-per-exec per stream); sshd keeps no history, and its growth is buffer memory it keeps after the output passed through. Memory freed in either process mostly stays in its RSS (the allocator does not hand it back): see the after-DELETE notes`
  )
}
