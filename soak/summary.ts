// The soak's verdict: every exec judged, the tables and notes printed, and the list of reasons
// the run failed (empty when it passed).
import { writeFileSync } from 'node:fs'
import v8 from 'node:v8'
import { observations } from './observation.js'
import { SoakCluster } from './cluster.js'
import { AGENTS, DUMP_PATH, REPLICAS, DURATION_S, HEAP_SNAPSHOT_PATH, KNOBS, MIN_TRUE_EXITS, SANDBOXES, SEED } from './knobs.js'
import { describeVerdict, faultTable, heapAfterGcMb, judge, procRssMb, verdictTables, type Verdict } from './report.js'
import type { Leftovers, LoadMeasure } from './run.js'
import { rel, world, type Gateway } from './world.js'

export interface Summary {
  // The report, line by line.
  out: string[]
  failures: string[]
  // 'soak: N passed, N failed', the closing line CI reads.
  line: string
}

export function summarize (g: Gateway, load: LoadMeasure, left: Leftovers): Summary {
  const { sandboxes } = world
  const verdicts = observations.map(judge)
  const codes = new Map<string, number>()
  for (const v of verdicts) if (v.obs.outcome === 'error') { const k = `${v.kind}:${v.obs.code}`; codes.set(k, (codes.get(k) ?? 0) + 1) }

  // The driver's own heap after a GC, to tell its records from the gateway's memory (which is
  // now another process: its RSS and heap are read from /proc and its /metrics).
  const driverHeapEnd = heapAfterGcMb()
  if (HEAP_SNAPSHOT_PATH !== '') v8.writeHeapSnapshot(HEAP_SNAPSHOT_PATH)
  const count = (c: Verdict['category']): number => verdicts.filter((v) => v.category === c).length
  const hung = count('hung')
  const wrong = count('wrong')
  const trueExits = count('true')
  const notAllowed = verdicts.filter((v) => v.notAllowed !== undefined)
  const passed = trueExits + count('503') + count('honest') + count('lost') - notAllowed.length
  const unfaultedErrors = verdicts.filter((v) => v.kind === 'none' && v.category === 'honest')
  const failed = hung + wrong + notAllowed.length + Math.max(0, left.running)
  const mb = (bytes: number): string => (bytes / 2 ** 20).toFixed(0)
  const mbOf = (x: number | undefined): string => x === undefined ? '?' : x.toFixed(1)

  const out: string[] = []
  out.push('', `==================== soak summary (seed ${SEED}, ${DURATION_S} s, ${AGENTS} agents, ${SANDBOXES} sandboxes, ${g instanceof SoakCluster ? `${REPLICAS} replicas behind haproxy, ${g.restarts.length} replica faults` : `${g.restarts.length} gateway restarts`}) ====================`)
  out.push(...verdictTables(verdicts))
  out.push('', 'faults injected:', faultTable())
  out.push('', `error codes (fault:code=count): ${[...codes.entries()].sort().map(([k, n]) => `${k}=${n}`).join(' ') || 'none'}`)
  out.push(`in flight at the deadline drained in ${((load.drainedAt - world.deadline) / 1000).toFixed(1)} s; output checked: ${(observations.length)} execs`)
  out.push(`CPU during the load (${load.loadS.toFixed(0)} s): gateway process(es) ${load.gatewayCpuPctOfCore.toFixed(0)}% of a core, soak driver ${load.driverCpuPctOfCore.toFixed(0)}%; whole machine ${load.machineBusyPct === undefined ? '?' : load.machineBusyPct.toFixed(0)}% busy`)
  out.push(`gateway process RSS: start ${mb(load.rssStart)} MB, peak ${mb(load.rssPeak)} MB (over ${g.pids.length} process(es): ${g.pids.join(', ')}), end ${mb(left.rssEnd)} MB; execs retained ${left.retained} (TTL ${KNOBS.execTtlS} s; large ones are deleted once checked), output retained ${left.retainedBytes === undefined ? '?' : mb(left.retainedBytes)} MB`)
  out.push(`gateway V8 heap in use (its /metrics, no forced GC): at the start ${mbOf(load.heapStartMb)} MB, after the drain ${mbOf(left.heapEndMb)} MB${g.restarts.length > 0 ? ' (the last process, which started at the last restart)' : ''}`)
  out.push(`soak driver heap after GC: before the load ${load.driverHeapStartMb.toFixed(1)} MB, after ${driverHeapEnd.toFixed(1)} MB (${observations.length} exec records)`)
  out.push(`supervisor RSS (MB): ${sandboxes.map((s) => `${s.id}=${procRssMb(s.sup.pid)}`).join(' ')}`)
  const gwWarnings = g.warnings()
  out.push(`process warnings: driver ${load.warnings.size === 0 ? 'none' : [...load.warnings.entries()].map(([k, n]) => `${n}× ${k}`).join(' | ')}; gateway ${gwWarnings.size === 0 ? 'none' : [...gwWarnings.entries()].map(([k, n]) => `${n}× ${k}`).join(' | ')}`)
  if (g instanceof SoakCluster) {
    out.push(`replica faults: ${g.restarts.map((r) => `#${r.n} ${r.kind ?? '?'} ${r.replica ?? '?'} held [${r.owned?.join(',') ?? ''}]${r.drainMs === undefined ? '' : ` down after ${r.drainMs} ms`}`).join('; ') || 'none'}`)
    const moving = verdicts.filter((v) => v.obs.code === 'sandbox_unavailable' && v.faults.some((f) => f.kind === 'replica-restart')).length
    out.push(`503 sandbox_unavailable through a drain (a POST while its sandbox moved, before the command started; docs/cluster.md): ${moving}; drains SIGKILLed: ${g.forcedDrains.length}`)
  }
  out.push(`gateway active execs=${left.running < 0 ? '? (no answer)' : left.running} sandboxes with activeExecs≠0: ${left.active.join(' ') || 'none'}`)
  const show = (title: string, vs: Verdict[]): void => {
    if (vs.length === 0) return
    out.push('', `${title} (${vs.length}${vs.length > 25 ? ', first 25' : ''}):`)
    for (const v of vs.slice(0, 25)) out.push(describeVerdict(v))
  }
  show('HUNG', verdicts.filter((v) => v.category === 'hung'))
  show('WRONG', verdicts.filter((v) => v.category === 'wrong'))
  show('NOT ALLOWED (a 503 or a loss that no fault in the exec\'s lifetime allows on its daemon)', notAllowed)
  show('note: 502/504/429 on a sandbox with no fault in the exec\'s lifetime', unfaultedErrors)
  show('note: exits through a fault longer than its detection bound (the gateway did not cut the relay)', verdicts.filter((v) => v.survived !== undefined))
  if (left.execs.length > 0) {
    out.push('', 'execs the gateway still runs after the drain:')
    for (const e of left.execs.slice(0, 25)) out.push(`  ${e.id} ${e.sandboxId} status=${e.status} created=${rel(Date.parse(e.createdAt))} started=${rel(e.startedAt === null ? undefined : Date.parse(e.startedAt))} ${String(e.command[2]).split('\n')[0]}`)
  }

  if (DUMP_PATH !== '') {
    writeFileSync(DUMP_PATH, JSON.stringify({
      seed: SEED,
      runStart: world.runStart,
      deadline: world.deadline,
      knobs: KNOBS,
      faults: world.faults,
      restarts: g.restarts,
      execs: verdicts.map((v) => ({ ...v.obs, daemon: v.daemon, category: v.category, kind: v.kind, faults: v.faults.map((f) => f.n), reasons: v.reasons, notAllowed: v.notAllowed, detectMs: v.detectMs, survived: v.survived?.n }))
    }, null, 1))
    out.push(`every exec and fault written to ${DUMP_PATH}`)
  }
  const failures: string[] = []
  if (hung > 0) failures.push(`${hung} hung`)
  if (wrong > 0) failures.push(`${wrong} wrong`)
  if (notAllowed.length > 0) failures.push(`${notAllowed.length} × 503 or lost where the fault allows only the true exit`)
  if (trueExits < MIN_TRUE_EXITS) failures.push(`only ${trueExits} execs ended with their true exit (need ≥ ${MIN_TRUE_EXITS}: a soak that did nothing proves nothing)`)
  if (left.running !== 0) failures.push(`the gateway's active execs are ${left.running < 0 ? 'unknown (no /metrics answer)' : left.running} after the drain, not 0`)
  if (left.active.length > 0) failures.push(`activeExecs not back to 0: ${left.active.join(' ')}`)
  if (g instanceof SoakCluster && g.forcedDrains.length > 0) failures.push(`drains SIGKILLed: ${g.forcedDrains.join('; ')}`)
  const line = `soak: ${passed} passed, ${failed} failed${failures.length === 0 ? '' : ` (${failures.join('; ')})`}`
  out.push('', line)
  return { out, failures, line }
}
