// The verdict on every exec (true exit, honest error, hung, wrong, tied to the fault that hit its
// sandbox) and the report: the tables by fault, by reader and by shape, faults, memory, details.
import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import v8 from 'node:v8'
import vm from 'node:vm'
import { median } from '../test/helpers/stats.js'
import { ALL_FAULT_KINDS, CLUSTER, MUST_DETECT_MS, isWholeFault, type FaultKind } from './knobs.js'
import { SHAPES } from './plans.js'
import { HONEST_503, type Observation } from './observation.js'
import { allowedBy, cutsTheRelay, expectedText, mustCut, type Daemon } from './outcomes.js'
import { rel, world, type Fault } from './world.js'

type Category = 'true' | '503' | 'honest' | 'lost' | 'hung' | 'wrong'
export interface Verdict {
  obs: Observation
  daemon: Daemon
  category: Category
  kind: FaultKind | 'none'
  faults: Fault[]
  reasons: string[]
  // A 503 or a loss that none of the exec's faults allows on its daemon (outcomes.ts).
  notAllowed: string | undefined
  survived: Fault | undefined
  detectMs: number | undefined
}

function faultsOf (obs: Observation): Fault[] {
  return world.faults.filter((f) => (f.sandbox === obs.sandbox || f.sandbox === '*') && f.start <= obs.tEnd && (f.recovered ?? Date.now()) + 1000 >= obs.t0)
}

const daemonOf = (sandbox: string): Daemon => world.sandboxes.find((s) => s.id === sandbox)?.kind ?? 'embedded'

export function judge (obs: Observation): Verdict {
  const fs = faultsOf(obs)
  const daemon = daemonOf(obs.sandbox)
  // The fault closest to the outcome: the latest one that began before the answer (faults are
  // in start order, and every overlapping fault began before the answer).
  const primary = fs[fs.length - 1]
  const v: Verdict = { obs, daemon, category: 'true', kind: primary?.kind ?? 'none', faults: fs, reasons: [...obs.problems], notAllowed: undefined, survived: undefined, detectMs: undefined }
  if (obs.outcome === 'hung') { v.category = 'hung'; return v }
  // The command cannot have ended before t0 + its sleeps; an exit status that needed a relay
  // that was killed or reset before then could not have been delivered.
  const minEnd = obs.t0 + obs.sleepMs
  const ranThrough = (f: Fault): boolean => obs.startedAt !== undefined && obs.startedAt < f.start - 100 && minEnd > f.start + 300
  if (obs.outcome === 'exit') {
    for (const f of fs) {
      if (!ranThrough(f)) continue
      if (cutsTheRelay(f, daemon, obs.sandbox)) {
        const how = f.kind === 'kill' ? 'its supervisor was SIGKILLed' : f.kind === 'reset' ? 'its relay was reset' : f.kind === 'replica-kill' ? `its replica ${f.replica ?? '?'} was SIGKILLed` : 'the gateway was SIGKILLed'
        v.reasons.push(`exit ${String(obs.exitCode)} reported although ${how} at ${rel(f.start)} while the command was still sleeping (started ${rel(obs.startedAt)}, cannot end before ${rel(minEnd)}) and ${daemon} keeps nothing`)
      } else if (mustCut(f, daemon) && f.durationMs >= MUST_DETECT_MS[f.kind]) {
        v.survived = f
      }
    }
  }
  if (obs.outcome === 'error' && primary !== undefined && obs.startedAt !== undefined && obs.startedAt < primary.start) {
    v.detectMs = obs.tEnd - primary.start
  }
  if (v.reasons.length > 0 || obs.outcome === 'broken') v.category = 'wrong'
  else if (obs.outcome === 'exit') v.category = 'true'
  else if (obs.outcome === 'lost') v.category = 'lost'
  else v.category = HONEST_503.has(obs.code ?? '') ? '503' : 'honest'
  if (v.category === '503' || v.category === 'lost') {
    const key = v.category as '503' | 'lost'
    const startedBy = (f: Fault): number | undefined => {
      if (!isWholeFault(f.kind)) return obs.startedAt
      return world.gw.restarts.find((r) => Math.abs(r.killAt - f.start) < 60_000 && r.killAt >= f.start)?.started.get(obs.key) ?? undefined
    }
    const allowed = fs.some((f) => allowedBy(f, daemon, startedBy(f), obs.sandbox)[key])
    if (!allowed) {
      v.notAllowed = `${v.category === 'lost' ? CLUSTER ? `lost (${obs.detail ?? ''})` : 'lost to a gateway restart' : `503 ${obs.code ?? ''}`} on the ${daemon} daemon, which no fault in its lifetime allows (${fs.map((f) => `${f.kind}#${f.n}: ${expectedText(f.kind, daemon)}`).join(', ') || 'no fault: true only'})`
    }
  }
  return v
}

export function codeVersion (): string {
  try {
    const opts = { cwd: process.cwd(), encoding: 'utf8' as const, timeout: 5000, stdio: ['ignore', 'pipe', 'ignore'] as Array<'ignore' | 'pipe'> }
    const head = execFileSync('git', ['rev-parse', '--short', 'HEAD'], opts).trim()
    const dirty = execFileSync('git', ['status', '--porcelain', '--untracked-files=no', '--', 'src', 'routes', 'bin'], opts).split('\n').filter((l) => l.trim() !== '').length
    return dirty === 0 ? head : `${head} + uncommitted changes in ${dirty} file(s) under src/ routes/ bin/`
  } catch { return 'unknown (no git)' }
}

function table (header: string[], rows: Array<Array<string | number>>): string {
  const cells = [header, ...rows.map((r) => r.map(String))]
  const widths = header.map((_, i) => Math.max(...cells.map((r) => r[i]!.length)))
  const fmt = (r: string[]): string => r.map((c, i) => i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)).join('  ')
  return [fmt(header), widths.map((w) => '-'.repeat(w)).join('  '), ...cells.slice(1).map(fmt)].join('\n')
}

export function describeVerdict (v: Verdict): string {
  const o = v.obs
  const fs = v.faults.map((f) => `${f.kind}#${f.n}@${rel(f.start)}${f.durationMs > 0 ? `/${f.durationMs}ms` : ''}${f.replica === undefined ? '' : `(${f.replica} held ${f.sandboxes?.join('+') ?? ''})`}`).join(',') || 'none'
  const script = JSON.stringify(o.script) + (o.script.length >= 200 ? '…' : '')
  return [
    `  ${o.key} ${o.shape} ${o.sandbox} (${v.daemon}) ${o.mode} execId=${o.execId ?? '?'} t0=${rel(o.t0)} end=${rel(o.tEnd)} started=${rel(o.startedAt)} bound=${o.boundMs}ms faults=${fs}`,
    `    answer: ${o.outcome}${o.httpStatus === undefined ? '' : ` HTTP ${o.httpStatus}`}${o.outcome === 'exit' ? ` exitCode=${String(o.exitCode)} (want ${o.wantExit})` : ''}${o.code === undefined ? '' : ` ${o.code}: ${o.detail}`}${o.outcome === 'lost' ? `: ${o.detail}` : ''}`,
    ...v.reasons.map((r) => `    why: ${r}`),
    ...(v.notAllowed === undefined ? [] : [`    not allowed: ${v.notAllowed}`]),
    ...(o.reconnects > 0 || o.relayEvents > 0 ? [`    reader reconnects ${o.reconnects}, relay events ${o.relayEvents}`] : []),
    ...(o.gatewayView === undefined ? [] : [`    ${o.gatewayView}`]),
    `    script: ${script}`
  ].join('\n')
}

// Heap in use after a full collection (gc is exposed at run time; without it, the plain number).
export function heapAfterGcMb (): number {
  try {
    v8.setFlagsFromString('--expose-gc')
    const gc = vm.runInNewContext('gc') as () => void
    gc()
    gc()
  } catch { /* no gc: the number below includes garbage */ }
  return process.memoryUsage().heapUsed / 2 ** 20
}

export function procRssMb (pid: number): string {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
    return m === null ? '?' : (Number(m[1]) / 1024).toFixed(0)
  } catch { return 'gone' }
}

// The verdict table by fault kind × daemon, then the same counts by reader and by shape.
export function verdictTables (verdicts: Verdict[]): string[] {
  const kinds: Array<FaultKind | 'none'> = ['none', ...ALL_FAULT_KINDS]
  const count = (vs: Verdict[], c: Category): number => vs.filter((v) => v.category === c).length
  const counts = (label: string, vs: Verdict[]): Array<string | number> =>
    [label, vs.length, count(vs, 'true'), count(vs, '503'), count(vs, 'honest'), count(vs, 'lost'), count(vs, 'hung'), count(vs, 'wrong'), vs.filter((v) => v.notAllowed !== undefined).length]
  const rowFor = (label: string, expected: string, vs: Verdict[]): Array<string | number> => {
    const det = vs.map((v) => v.detectMs).filter((x): x is number => x !== undefined)
    return [...counts(label, vs), expected, vs.filter((v) => v.survived !== undefined).length, det.length === 0 ? '-' : `${median(det)}/${Math.max(...det)}`]
  }
  const cols = ['execs', 'true exit', '503', '502/504/429', CLUSTER ? 'lost to replica fault' : 'lost to restart', 'hung', 'wrong', 'not allowed']
  const rows: Array<Array<string | number>> = []
  for (const k of kinds) {
    for (const d of ['embedded', 'openssh'] as const) {
      const vs = verdicts.filter((v) => v.kind === k && v.daemon === d)
      if (vs.length > 0 || (k === 'none' && d === 'embedded')) rows.push(rowFor(`${k} · ${d}`, expectedText(k, d), vs))
    }
  }
  rows.push(rowFor('TOTAL', '', verdicts))
  const modeRows = (['wait', 'ws', 'ndjson', 'sse'] as const).map((m) => {
    const vs = verdicts.filter((v) => v.obs.mode === m)
    return [...counts(m, vs), vs.reduce((a, v) => a + v.obs.reconnects, 0)]
  })
  const mib = (vs: Verdict[]): string => (vs.reduce((a, v) => a + v.obs.bytes, 0) / 2 ** 20).toFixed(1)
  const shapeRows = SHAPES.map((s) => ({ s, vs: verdicts.filter((v) => v.obs.shape === s) })).filter(({ s, vs }) => vs.length > 0 || s === 'classic')
    .map(({ s, vs }) => [...counts(s, vs), mib(vs)])
  const large = verdicts.filter((v) => v.obs.shape !== 'classic')
  shapeRows.push([...counts('large, all', large), mib(large)])
  return [
    'by fault kind × daemon (expected: what that fault may end an exec with there; "not allowed": a 503 or a loss outside it):',
    table(['fault · daemon', ...cols, 'expected', 'survived', 'detect ms p50/max'], rows),
    '', 'by reader (reconnects: readers cut off by a gateway restart that resumed from their offsets, and POSTs found again):', table(['mode', ...cols, 'reconnects'], modeRows),
    '', `by shape (large shapes: ${large.length} of ${verdicts.length} execs; MiB: output received and checked, plus stdin sent):`,
    table(['shape', ...cols, 'MiB'], shapeRows)
  ]
}

export function faultTable (): string {
  const faultRows = ALL_FAULT_KINDS.map((k) => {
    const fs = world.faults.filter((f) => f.kind === k)
    const rec = fs.filter((f) => f.recovered !== undefined && f.endAction !== undefined).map((f) => f.recovered! - f.endAction!)
    return [k, fs.length, fs.length === 0 ? '-' : Math.round(fs.reduce((a, f) => a + f.durationMs, 0) / fs.length), rec.length === 0 ? '-' : Math.max(...rec),
      fs.filter((f) => f.reconnected === true).length, fs.filter((f) => f.recoveryTimedOut === true).length]
  }).filter((r) => r[1] !== 0)
  return faultRows.length === 0 ? '  none' : table(['kind', 'count', 'mean dur ms', 'max recovery ms', 'reconnected', 'not recovered'], faultRows)
}
