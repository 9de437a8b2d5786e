// Phase: gateway RSS per held silent exec at fleet scale: FLEET_SANDBOXES sandboxes (a supervisor
// process with the embedded daemon each) holding FLEET_PER_SANDBOX `sleep 600` each, on a fresh
// gateway E. Idle is taken with every supervisor connected and warm, so the per-exec figure is
// what the execs add, not what the sandboxes cost.
import { inParallel } from '../../test/helpers/pool.js'
import { sleep, waitFor } from '../../test/helpers/wait.js'
import type { SupervisorProcess } from '../../test/helpers/supervisor-process.js'
import { cpuText, measureGateway } from '../gateway-memory.js'
import { CPU_WINDOW_S, FLEET_PER_SANDBOX, FLEET_SANDBOXES, GOALS, HOLD_COMMAND } from '../knobs.js'
import { cmdline, taggedProcesses } from '../proc.js'
import { log } from '../report.js'
import type { World } from '../world.js'

interface ExecListing { execs: Array<{ status: string, id: string, error: unknown }> }

// Supervisors started at once: each start is ~0.5 CPU-s of Node on a shared 2-core machine.
const START_BATCH = 10

const mib = (kib: number): string => (kib / 1024).toFixed(1)
const signed = (v: number): string => `${v < 0 ? '−' : '+'}${Math.abs(v).toFixed(1)}`

export async function fleet (world: World): Promise<void> {
  const { api, profiler, results } = world
  const total = FLEET_SANDBOXES * FLEET_PER_SANDBOX
  // Per sandbox as in the held-execs phase (twice what it holds); the rest stays at its default
  // (--max-unauthenticated-connections 256 is above START_BATCH, --max-running-execs-per-sandbox
  // 1024 above the default of 100 per sandbox).
  const gw = await world.gateway([
    '--max-pending-relays-per-sandbox', String(Math.max(32, FLEET_PER_SANDBOX * 2)),
    '--max-running-execs-per-sandbox', String(Math.max(1024, FLEET_PER_SANDBOX * 2))
  ], false, true)
  const sandboxes = Array.from({ length: FLEET_SANDBOXES }, (_, i) => `fleet-${String(i).padStart(3, '0')}`)
  const sups: SupervisorProcess[] = []
  const ids: string[] = []
  try {
    // Before the supervisors: the inspector's URL is found in the gateway's output, which keeps a
    // bounded tail that 100 sessions' log lines would push it out of.
    const inspector = await profiler.inspector(gw)
    await inspector.send('HeapProfiler.enable')
    const t0 = performance.now()
    for (let b = 0; b < sandboxes.length; b += START_BATCH) {
      const batch = sandboxes.slice(b, b + START_BATCH)
      sups.push(...batch.map((id) => world.supervisor(gw, id)))
      await Promise.all(batch.map(async (id) => await api.waitConnected(gw.publicUrl, id)))
    }
    log(`fleet: ${sups.length} supervisors connected after ${((performance.now() - t0) / 1000).toFixed(1)} s`)
    results.commands.push(`- gateway E (fleet), with NODE_OPTIONS=--inspect=127.0.0.1:0: \`${cmdline(gw.pid)}\``, `- its ${sups.length} supervisors (embedded daemon), e.g. \`${cmdline(sups[0]!.pid)}\``)
    // Warm-up: code paths JIT-compiled, one pooled connection open to every sandbox.
    await inParallel(sandboxes.length * 2, 16, async (i) => { await api.execTrue(gw.publicUrl, sandboxes[i % sandboxes.length]!) })
    await sleep(3000)
    const supPids = sups.map((s) => s.pid)
    const idle = await measureGateway(inspector, gw, supPids, `fleet idle (${sups.length} supervisors)`)
    results.rows.push({
      what: `gateway idle with ${sups.length} sandboxes connected (one supervisor process each, embedded daemon; warm, 0 execs)`,
      gateway: `RSS ${mib(idle.rssKiB)} MiB (V8 heap used ${mib(idle.heapKiB)} MiB), CPU ${cpuText(idle.cpuPct)} of one core over ${CPU_WINDOW_S} s`,
      peer: `${sups.length} supervisor processes, RSS ${mib(idle.supRssKiB)} MiB in all`,
      ratio: '—',
      goal: '—'
    })

    const t1 = performance.now()
    // Round robin over the sandboxes, so each fills up alongside the others.
    ids.push(...await inParallel(total, 32, async (i) => {
      const sandbox = sandboxes[i % sandboxes.length]!
      const r = await api.json<{ id: string }>(gw.publicUrl, 'POST', `/v1/sandboxes/${sandbox}/execs`, { command: HOLD_COMMAND })
      if (r.status !== 201) throw new Error(`start ${HOLD_COMMAND.join(' ')} on ${sandbox}: ${r.status} ${JSON.stringify(r.body).slice(0, 300)}`)
      world.execIds.add(r.body.id)
      return r.body.id
    }))
    const mine = new Set(ids)
    let endedEarly: string | undefined
    await waitFor(async () => {
      const r = await api.json<ExecListing>(gw.publicUrl, 'GET', '/v1/execs')
      const list = r.body.execs.filter((x) => mine.has(x.id))
      const failed = list.filter((x) => x.status === 'failed' || x.status === 'exited')
      if (failed.length > 0) { endedEarly = `${failed.length} fleet execs ended early, e.g. ${JSON.stringify(failed[0])}`; return true }
      return list.filter((x) => x.status === 'running').length === total
    }, { timeoutMs: Math.max(120_000, total * 30), intervalMs: 2000, description: `${total} fleet execs running` })
    if (endedEarly !== undefined) throw new Error(endedEarly)
    log(`fleet: ${total} execs running after ${((performance.now() - t1) / 1000).toFixed(1)} s`)
    await sleep(3000)
    const m = await profiler.profiled(gw, `fleet-${total}-idle`, async () => await measureGateway(inspector, gw, supPids, `fleet, ${total} held`))
    const perExec = (m.rssKiB - idle.rssKiB) / total
    const isGoalRow = FLEET_SANDBOXES >= GOALS.fleetAt.sandboxes && total >= GOALS.fleetAt.execs
    results.rows.push({
      what: `${total.toLocaleString('en-US')} held silent execs across ${FLEET_SANDBOXES} sandboxes (${FLEET_PER_SANDBOX} each, \`${HOLD_COMMAND.join(' ')}\`, embedded daemon via supervisor processes): gateway RSS per exec, CPU while idle`,
      gateway: `RSS ${mib(m.rssKiB)} MiB (+${mib(m.rssKiB - idle.rssKiB)} MiB); V8 heap used +${mib(m.heapKiB - idle.heapKiB)} MiB = ${((m.heapKiB - idle.heapKiB) / total).toFixed(1)} KiB/exec; CPU ${cpuText(m.cpuPct)} of one core over ${CPU_WINDOW_S} s`,
      // Not GC-forced (no inspector on the supervisors): their startup garbage may go meanwhile.
      peer: `${sups.length} supervisor processes, RSS ${mib(m.supRssKiB)} MiB in all (${signed((m.supRssKiB - idle.supRssKiB) / total)} KiB/exec, no forced GC)`,
      ratio: `${perExec.toFixed(1)} KiB/exec`,
      goal: isGoalRow ? `≤ ${GOALS.fleetKiBPerExec} KiB/exec` : '—',
      met: isGoalRow ? perExec <= GOALS.fleetKiBPerExec : undefined
    })
    results.notes.push(`fleet: ${FLEET_SANDBOXES} supervisor processes started ${START_BATCH} at a time, each waited for until connected; warm-up ${sandboxes.length * 2} × \`true\` spread over them; then ${total} \`${HOLD_COMMAND.join(' ')}\` started round robin over the sandboxes (POST, 32 at a time) and polled until all are running. Readings as in the held-execs phase (two forced GCs, median RSS over the CPU window); per exec = (RSS held − RSS idle with every supervisor connected) / ${total}. The execs are then killed by pid (not DELETEd: see the mass DELETE row for that path)`)
  } finally {
    // By pid: DELETE of thousands would time the kill script, not clean up.
    const mine = new Set(ids)
    const kill = (): number => {
      const left = taggedProcesses(mine)
      for (const pid of left) { try { process.kill(pid, 'SIGKILL') } catch { /* gone */ } }
      return left.length
    }
    kill()
    await gw.stop()
    await Promise.allSettled(sups.map(async (s) => await s.stop()))
    // Once their supervisors are gone nothing can start more; what is left is killed again.
    await waitFor(() => kill() === 0, { timeoutMs: 30_000, intervalMs: 500, description: 'no fleet exec process left' })
  }
}
