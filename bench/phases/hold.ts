// Phase 4: gateway RSS per held silent exec, and its CPU while they idle, on a fresh gateway C;
// then the DELETE of all of them at once, until their processes are gone.
import { inParallel } from '../../test/helpers/pool.js'
import { sleep, waitFor } from '../../test/helpers/wait.js'
import { cpuText, measureGateway } from '../gateway-memory.js'
import { CPU_WINDOW_S, EXEC_ID_ENV, GOALS, HOLD_COMMAND, HOLD_STEPS } from '../knobs.js'
import { deleteAll } from '../mass-delete.js'
import { cmdline } from '../proc.js'
import { log } from '../report.js'
import type { World } from '../world.js'

interface ExecListing { execs: Array<{ status: string, id: string, error: unknown }> }

export async function heldExecs (world: World): Promise<void> {
  const { api, profiler, results } = world
  // A fresh gateway: its idle RSS must not carry the throughput test's buffers. No `local`
  // sandbox, so the embedded daemon's children and state stay in the supervisor process.
  const maxHeld = HOLD_STEPS[HOLD_STEPS.length - 1]!
  // With the inspector (loopback, random port): the bench forces a full GC before each RSS
  // reading, so that the figures compare live memory, not the garbage of the last burst, and
  // reads V8's heap usage.
  const gw = await world.gateway(['--max-pending-relays-per-sandbox', String(Math.max(32, maxHeld * 2))], false, true)
  const sup = world.supervisor(gw, 'hold')
  results.commands.push(`- gateway C (held execs), with NODE_OPTIONS=--inspect=127.0.0.1:0: \`${cmdline(gw.pid)}\``, `- supervisor (held execs, embedded daemon): \`${cmdline(sup.pid)}\``)
  await api.waitConnected(gw.publicUrl, 'hold')
  const inspector = await profiler.inspector(gw)
  await inspector.send('HeapProfiler.enable')
  const ids: string[] = []
  try {
    // Warm-up: code paths loaded and JIT-compiled, one pooled connection open.
    await inParallel(64, 8, async () => { await api.execTrue(gw.publicUrl, 'hold') })
    await sleep(3000)
    const idle = await measureGateway(inspector, gw, [sup.pid], 'idle')
    if (profiler.enabled) { await profiler.profiled(gw, 'hold-0-idle', async () => await sleep(100)); await profiler.heapSnapshot(gw, 'hold-0') }
    results.rows.push({ what: 'gateway idle (supervisor connected, warm, 0 execs)', gateway: `RSS ${(idle.rssKiB / 1024).toFixed(1)} MiB (V8 heap used ${(idle.heapKiB / 1024).toFixed(1)} MiB), CPU ${cpuText(idle.cpuPct)} of one core over ${CPU_WINDOW_S} s`, peer: `supervisor process RSS ${(idle.supRssKiB / 1024).toFixed(1)} MiB`, ratio: '—', goal: '—' })
    for (const target of HOLD_STEPS) {
      const t0 = performance.now()
      const from = ids.length
      const started = await inParallel(target - from, 32, async () => {
        const r = await api.json<{ id: string }>(gw.publicUrl, 'POST', '/v1/sandboxes/hold/execs', { command: HOLD_COMMAND })
        if (r.status !== 201) throw new Error(`start ${HOLD_COMMAND.join(' ')}: ${r.status} ${JSON.stringify(r.body).slice(0, 300)}`)
        world.execIds.add(r.body.id)
        return r.body.id
      })
      ids.push(...started)
      let endedEarly: string | undefined
      await waitFor(async () => {
        const r = await api.json<ExecListing>(gw.publicUrl, 'GET', '/v1/execs?sandboxId=hold')
        const mine = new Set(ids)
        const list = r.body.execs.filter((x) => mine.has(x.id))
        const failed = list.filter((x) => x.status === 'failed' || x.status === 'exited')
        if (failed.length > 0) { endedEarly = `${failed.length} held execs ended early, e.g. ${JSON.stringify(failed[0])}`; return true }
        return list.filter((x) => x.status === 'running').length === target
      }, { timeoutMs: 120_000, intervalMs: 500, description: `${target} execs running` })
      if (endedEarly !== undefined) throw new Error(endedEarly)
      log(`${target} execs running after ${((performance.now() - t0) / 1000).toFixed(1)} s`)
      await sleep(3000)
      const m = await profiler.profiled(gw, `hold-${target}-idle`, async () => await measureGateway(inspector, gw, [sup.pid], `${target} held`))
      if (profiler.enabled) await profiler.heapSnapshot(gw, `hold-${target}`)
      const perExec = (m.rssKiB - idle.rssKiB) / target
      // The goal is stated at 1,000 held execs; a smaller run reports the figure without it.
      const isGoalRow = target === maxHeld && maxHeld >= 1000
      results.rows.push({
        what: `${target.toLocaleString('en-US')} held silent execs (\`${HOLD_COMMAND.join(' ')}\`, embedded daemon via supervisor process): gateway RSS per exec, CPU while idle`,
        gateway: `RSS ${(m.rssKiB / 1024).toFixed(1)} MiB (+${((m.rssKiB - idle.rssKiB) / 1024).toFixed(1)} MiB); V8 heap used +${((m.heapKiB - idle.heapKiB) / 1024).toFixed(1)} MiB = ${((m.heapKiB - idle.heapKiB) / target).toFixed(1)} KiB/exec; CPU ${cpuText(m.cpuPct)} of one core over ${CPU_WINDOW_S} s`,
        peer: `supervisor process RSS ${(m.supRssKiB / 1024).toFixed(1)} MiB`,
        ratio: `${perExec.toFixed(1)} KiB/exec`,
        goal: isGoalRow ? `≤ ${GOALS.heldKiBPerExec} KiB/exec` : '—',
        met: isGoalRow ? perExec <= GOALS.heldKiBPerExec : undefined
      })
    }
    // Kill them the way a client would, all at once: DELETE each.
    const d = await deleteAll(api, gw.publicUrl, ids)
    log(`DELETE of ${ids.length} held execs: answered after ${d.answeredS.toFixed(1)} s, no process left after ${d.allGoneS.toFixed(1)} s, gateway at 0 active execs after ${d.gatewayZeroS?.toFixed(1) ?? '?'} s`)
    const deleteGoal = ids.length >= GOALS.massDeleteAt
    results.rows.push({
      what: `DELETE of ${ids.length.toLocaleString('en-US')} running \`${HOLD_COMMAND.join(' ')}\` execs (the held ones above), ${d.concurrency} at a time, until none of their ${d.processesBefore} processes is left (/proc scan for ${EXEC_ID_ENV})`,
      gateway: `all answered 204 after ${d.answeredS.toFixed(1)} s; no process left after ${d.allGoneS.toFixed(1)} s; the gateway reported 0 active execs after ${d.gatewayZeroS?.toFixed(1) ?? '?'} s`,
      peer: '—',
      ratio: `${d.allGoneS.toFixed(1)} s`,
      goal: deleteGoal ? `≤ ${GOALS.massDeleteS} s` : '—',
      met: deleteGoal ? d.allGoneS <= GOALS.massDeleteS : undefined
    })
    results.notes.push(`mass DELETE: timed from the first DELETE; the bench polls every 100 ms for processes whose environment carries one of the exec ids (${EXEC_ID_ENV}, all of /proc/*/environ read by the bench, the sandbox being local) and the gateway's exec_gateway_active_execs; the gateway sends the kills of one sandbox in batches, one kill script (one /proc scan in the sandbox per pass) per batch, on a side channel`)
    results.notes.push(`held execs: before each reading the bench forces two full GCs in the gateway (inspector HeapProfiler.collectGarbage) and waits 1 s; RSS is then the median of ${CPU_WINDOW_S + 1} VmRSS samples taken 1 s apart during the CPU window; per exec = (RSS held − RSS idle) / N; V8 heap = Runtime.getHeapUsage usedSize after the GC; CPU = Δ(utime+stime) of the gateway process / wall time`)
  } finally {
    await gw.stop()
    await sup.stop()
  }
}
