// One exec, start to verdict: start it, read it the way its plan says (?wait=true, attached from
// the start, attached late, paused, feeding stdin, or nobody attached until the end), and check
// every byte, offset, gap, final event and close code against the plan; then the agents that
// run execs back to back.
import { sleep } from '../test/helpers/wait.js'
import { httpCall, streamNdjson, streamWs } from './clients.js'
import { StreamCheck } from './expected.js'
import { KNOBS, MAX_EXECS_PER_AGENT, RUN_ID, SEED, rng } from './knobs.js'
import { makePlan, planBytes, type Mode, type Plan, type Shape } from './plans.js'
import { log, rel, sessionOf, world } from './world.js'

type Outcome = 'exit' | 'error' | 'hung' | 'broken'
export interface Observation {
  key: string
  sandbox: string
  shape: Shape
  mode: Mode
  script: string
  wantExit: number
  sleepMs: number
  boundMs: number
  t0: number
  tEnd: number
  outcome: Outcome
  httpStatus?: number
  exitCode?: number | null
  code?: string
  detail?: string
  execId?: string
  startedAt?: number
  // Output bytes received and checked, plus stdin bytes sent.
  bytes: number
  problems: string[]
  notes: string[]
  gatewayView?: string
}
export const observations: Observation[] = []

export const HONEST_503 = new Set(['relay_unavailable', 'sandbox_unavailable'])
const HONEST_OTHER: Record<string, number> = { ssh_failed: 502, relay_open_timeout: 504, too_many_requests: 429 }
const codeStatus = (code: string): number | undefined => HONEST_503.has(code) ? 503 : HONEST_OTHER[code]
const LARGE_BYTES = 1024 * 1024
const MAX_PROBLEMS = 12

function problem (obs: Observation, why: string): void {
  if (obs.problems.length < MAX_PROBLEMS) obs.problems.push(why)
  else if (obs.problems.length === MAX_PROBLEMS) obs.problems.push('… (more problems not shown)')
}

type Stream = 'stdout' | 'stderr'
interface Gap { from: number, to: number }
type Checks = Record<Stream, StreamCheck>
const json = (x: unknown): string => JSON.stringify(x).slice(0, 160)

// What a reader must get after the end, from these offsets: one gap up to the oldest byte the
// gateway still holds, for each stream that printed more than it retains past the offset.
function gapsAfterEnd (rec: { stdoutBytes: number, stderrBytes: number }, from: Record<Stream, number>): Partial<Record<Stream, Gap>> {
  const gaps: Partial<Record<Stream, Gap>> = {}
  for (const s of ['stdout', 'stderr'] as const) {
    const held = (s === 'stdout' ? rec.stdoutBytes : rec.stderrBytes) - KNOBS.retentionBytes
    if (held > from[s]) gaps[s] = { from: from[s], to: held }
  }
  return gaps
}

// The events of one reader, checked as they arrive. `gaps` undefined: a reader attached while
// the exec runs, which never sees a gap; otherwise exactly the gaps listed.
class EventCheck {
  readonly out: Checks
  final: any
  events = 0
  readonly #obs: Observation
  readonly #gaps: Partial<Record<Stream, Gap>> | undefined
  readonly #gapSeen = { stdout: false, stderr: false }
  #late = false

  constructor (obs: Observation, plan: Plan, from: Record<Stream, number>, gaps: Partial<Record<Stream, Gap>> | undefined) {
    this.#obs = obs
    this.#gaps = gaps
    this.out = { stdout: new StreamCheck(plan.stdout, from.stdout), stderr: new StreamCheck(plan.stderr, from.stderr) }
  }

  feed = (ev: any): void => {
    this.events++
    if (this.final !== undefined) {
      if (!this.#late) problem(this.#obs, `event after the final event: ${json(ev)}`)
      this.#late = true
      return
    }
    if (ev.type === 'stdout' || ev.type === 'stderr') {
      const s = ev.type as Stream
      const want = this.#gaps?.[s]
      if (want !== undefined && !this.#gapSeen[s]) {
        this.#gapSeen[s] = true
        problem(this.#obs, `${s} data at offset ${ev.offset} without the gap ${json(want)} first`)
      }
      if (ev.offset !== this.out[s].offset) problem(this.#obs, `${s} event at offset ${ev.offset}, expected ${this.out[s].offset}`)
      this.out[s].feed(Buffer.from(String(ev.data), 'utf8'))
    } else if (ev.type === 'gap') {
      const s = ev.stream as Stream
      const want = this.#gaps?.[s]
      if (this.#gaps === undefined) problem(this.#obs, `gap event seen by an attached reader: ${json(ev)}`)
      else if (want === undefined || this.#gapSeen[s] || ev.from !== want.from || ev.to !== want.to) problem(this.#obs, `gap ${json(ev)}, want ${want === undefined ? 'none' : json(want)}`)
      else { this.#gapSeen[s] = true; this.out[s].skip(ev.to) }
    } else if (ev.type === 'exit' || ev.type === 'error') {
      this.final = ev
    } else if (ev.type !== 'heartbeat') {
      problem(this.#obs, `unexpected event ${json(ev)}`)
    }
  }

  finish (): void {
    for (const s of ['stdout', 'stderr'] as const) {
      const want = this.#gaps?.[s]
      if (want !== undefined && !this.#gapSeen[s]) problem(this.#obs, `no gap event for ${s}, want ${json(want)}`)
    }
    this.#obs.bytes += this.out.stdout.offset + this.out.stderr.offset
  }
}

function judgeExit (obs: Observation, plan: Plan, r: { exitCode: unknown, signal: unknown, timedOut: unknown }, c: Checks): void {
  obs.outcome = 'exit'
  obs.exitCode = typeof r.exitCode === 'number' ? r.exitCode : null
  if (r.exitCode !== plan.exitCode) problem(obs, `exit code ${String(r.exitCode)} (signal ${String(r.signal)}), the script exits ${plan.exitCode}`)
  if (r.signal !== null) problem(obs, `signal ${String(r.signal)} on a command that exits normally`)
  if (r.timedOut !== false) problem(obs, `timedOut ${String(r.timedOut)} without timeoutSeconds`)
  if (!c.stdout.complete()) problem(obs, `stdout: ${c.stdout.describe()}`)
  if (!c.stderr.complete()) problem(obs, `stderr: ${c.stderr.describe()}`)
}

function judgeError (obs: Observation, e: { code: unknown, status: unknown, detail: unknown }, c: Checks | undefined): void {
  obs.outcome = 'error'
  obs.code = String(e.code)
  obs.detail = String(e.detail ?? '')
  const want = codeStatus(obs.code)
  if (want === undefined) problem(obs, `error ${obs.code} (status ${String(e.status)}) is not an honest liveness outcome: ${obs.detail}`)
  else if (e.status !== want) problem(obs, `error ${obs.code} carries status ${String(e.status)}, the contract says ${want}`)
  if (c !== undefined && !c.stdout.prefixOk()) problem(obs, `stdout of a failed exec is not a prefix of the expected: ${c.stdout.describe()}`)
  if (c !== undefined && !c.stderr.prefixOk()) problem(obs, `stderr of a failed exec is not a prefix of the expected: ${c.stderr.describe()}`)
}

// A later GET must say the same, field for field (CONTRACT §3).
async function checkRecord (obs: Observation, plan: Plan): Promise<void> {
  if (obs.execId === undefined) return
  const r = await httpCall('GET', `/v1/execs/${obs.execId}`, undefined, 5000)
  if (!r.ok || r.status !== 200) { problem(obs, `GET /v1/execs/${obs.execId}: ${r.ok ? `HTTP ${r.status}` : r.error}`); return }
  const j = r.json
  if (j.startedAt !== null) obs.startedAt = Date.parse(j.startedAt)
  if (obs.outcome === 'exit') {
    if (j.status !== 'exited' || j.exitCode !== obs.exitCode || j.signal !== null) problem(obs, `GET says status=${j.status} exitCode=${j.exitCode} signal=${j.signal}, the answer said exit ${String(obs.exitCode)}`)
    if (j.stdoutBytes !== plan.stdout.bytes || j.stderrBytes !== plan.stderr.bytes) problem(obs, `GET says ${j.stdoutBytes}/${j.stderrBytes} output bytes, the script prints ${plan.stdout.bytes}/${plan.stderr.bytes}`)
  } else if (obs.outcome === 'error') {
    if (j.status !== 'failed' || j.exitCode !== null || j.error?.code !== obs.code) problem(obs, `GET says status=${j.status} exitCode=${j.exitCode} error=${j.error?.code}, the answer said error ${obs.code}`)
    if (j.stdoutBytes > plan.stdout.bytes || j.stderrBytes > plan.stderr.bytes) problem(obs, `GET says ${j.stdoutBytes}/${j.stderrBytes} output bytes, more than the script prints (${plan.stdout.bytes}/${plan.stderr.bytes})`)
  }
}

function gatewayViewOf (plan: Plan, execId: string | undefined): string {
  const g = world.g
  const e = execId !== undefined ? g.gw.execs.get(execId) : g.gw.execs.list({ sandboxId: plan.sandbox }).find((x) => x.spec.command[2] === plan.script)
  if (e === undefined) return 'the gateway has no record of it'
  const j = e.toJSON()
  return `gateway record ${j.id}: status=${j.status} exitCode=${j.exitCode} error=${j.error === null ? 'null' : j.error.code} startedAt=${rel(j.startedAt === null ? undefined : Date.parse(j.startedAt))} endedAt=${rel(j.endedAt === null ? undefined : Date.parse(j.endedAt))} stdoutBytes=${j.stdoutBytes}/${plan.stdout.bytes} stderrBytes=${j.stderrBytes}/${plan.stderr.bytes}; sandbox session ${sessionOf(plan.sandbox) === undefined ? 'absent' : 'present'}`
}

function markHung (obs: Observation, plan: Plan, what: string): void {
  obs.outcome = 'hung'
  obs.tEnd = Date.now()
  obs.problems.push(`${what}: no answer within its bound of ${plan.boundMs} ms (planned ${plan.plannedMs} ms)`)
  obs.gatewayView = gatewayViewOf(plan, obs.execId)
  const started = obs.execId === undefined ? undefined : world.g.gw.execs.get(obs.execId)?.startedAt
  if (started !== undefined) obs.startedAt = started.getTime()
}

type Body = Record<string, unknown>

// POST ?wait=true; a failed exec's replayed /events must end with the same error.
async function runWait (plan: Plan, obs: Observation, body: Body, left: () => number): Promise<boolean> {
  const r = await httpCall('POST', `/v1/sandboxes/${plan.sandbox}/execs?wait=true`, body, left())
  obs.tEnd = Date.now()
  if (!r.ok) {
    if (r.timedOut) markHung(obs, plan, 'POST ?wait=true')
    else problem(obs, `POST ?wait=true ended without an answer: ${r.error}`)
    return false
  }
  obs.httpStatus = r.status
  const b = r.json
  if (r.status === 200 && typeof b === 'object' && b !== null) {
    obs.execId = b.id
    const c: Checks = { stdout: new StreamCheck(plan.stdout), stderr: new StreamCheck(plan.stderr) }
    c.stdout.feed(Buffer.from(String(b.stdout), 'utf8'))
    c.stderr.feed(Buffer.from(String(b.stderr), 'utf8'))
    obs.bytes += c.stdout.offset + c.stderr.offset
    judgeExit(obs, plan, b, c)
    if (b.stdoutTruncated !== false || b.stderrTruncated !== false) problem(obs, 'output marked truncated below the retention limit')
    return true
  }
  if (typeof b !== 'object' || b === null || typeof b.code !== 'string') { problem(obs, `unexpected HTTP ${r.status}: ${r.text.slice(0, 300)}`); return false }
  obs.execId = typeof b.execId === 'string' ? b.execId : undefined
  if (b.status !== r.status) problem(obs, `problem status ${b.status} on an HTTP ${r.status}`)
  let c: Checks | undefined
  if (obs.execId !== undefined) {
    const check = new EventCheck(obs, plan, { stdout: 0, stderr: 0 }, undefined)
    const replay = await streamNdjson(obs.execId, 5000, check.feed)
    check.finish()
    if (replay.error !== undefined || replay.timedOut) problem(obs, `replay of the failed exec: ${replay.error ?? 'timed out'}`)
    else if (check.final?.type !== 'error' || check.final.code !== b.code) problem(obs, `replay ends with ${json(check.final)}, the answer was ${b.code}`)
    c = check.out
  } else if (b.code !== 'too_many_requests') {
    problem(obs, `problem ${b.code} without an execId`)
  }
  judgeError(obs, b, c)
  return true
}

// GET until the exec has ended, or has printed `until` stdout bytes: the record then, or
// undefined (hung, or a GET that failed).
async function pollRecord (plan: Plan, obs: Observation, left: () => number, until: 'end' | number): Promise<any> {
  for (;;) {
    const ms = left()
    if (ms <= 0) { markHung(obs, plan, until === 'end' ? 'nobody attached: GET never showed the end' : `waiting for ${until} stdout bytes before attaching`); return undefined }
    const r = await httpCall('GET', `/v1/execs/${obs.execId}`, undefined, Math.min(ms, 5000))
    if (!r.ok && r.timedOut && left() <= 0) continue
    if (!r.ok || r.status !== 200) { obs.tEnd = Date.now(); problem(obs, `GET /v1/execs/${obs.execId} while waiting: ${r.ok ? `HTTP ${r.status}` : r.error}`); return undefined }
    const j = r.json
    if (j.status === 'exited' || j.status === 'failed' || (typeof until === 'number' && j.stdoutBytes >= until)) return j
    await sleep(Math.min(until === 'end' ? 250 : 100, Math.max(1, left())))
  }
}

// POST, then a WebSocket or NDJSON reader: from the start, or once the plan's wait is over.
async function runAttached (plan: Plan, obs: Observation, body: Body, left: () => number): Promise<boolean> {
  const r = await httpCall('POST', `/v1/sandboxes/${plan.sandbox}/execs`, body, Math.min(left(), 10_000))
  if (!r.ok) {
    if (r.timedOut) markHung(obs, plan, 'POST (no wait)')
    else { obs.tEnd = Date.now(); problem(obs, `POST ended without an answer: ${r.error}`) }
    return false
  }
  obs.httpStatus = r.status
  if (r.status !== 201) {
    obs.tEnd = Date.now()
    if (typeof r.json?.code === 'string') judgeError(obs, r.json, undefined)
    else problem(obs, `POST → unexpected HTTP ${r.status}: ${r.text.slice(0, 300)}`)
    return false
  }
  const id = String(r.json.id)
  obs.execId = id
  let gaps: Partial<Record<Stream, Gap>> | undefined
  let readMs = left()
  if (plan.attachAfter !== undefined) {
    const rec = await pollRecord(plan, obs, left, plan.attachAfter)
    if (rec === undefined) return false
    if (rec.status === 'exited' || rec.status === 'failed') {
      // The answer is in; reading it back is bounded by its size.
      obs.tEnd = Date.now()
      gaps = gapsAfterEnd(rec, plan.offsets)
      readMs = Math.max(left(), 5000 + Math.ceil(planBytes(plan) / 1000))
    }
  }
  const ended = gaps !== undefined
  const check = new EventCheck(obs, plan, plan.offsets, gaps)
  const opts = {
    offsets: plan.offsets,
    ...(plan.pause === undefined ? {} : { pause: plan.pause }),
    ...(plan.stdin === undefined ? {} : { stdin: { ...plan.stdin, rand: rng(`${SEED}/stdin-chunks/${plan.key}`) } })
  }
  const s = plan.mode === 'ws' ? await streamWs(id, readMs, check.feed, opts) : await streamNdjson(id, readMs, check.feed, opts)
  if (!ended) obs.tEnd = Date.now()
  if (s.timedOut) { markHung(obs, plan, `${plan.mode} reader${ended ? ' of an exec that had ended' : ''}`); return false }
  if (s.error !== undefined) problem(obs, `${plan.mode} reader: ${s.error}`)
  check.finish()
  obs.bytes += s.stdinSent ?? 0
  const final = check.final
  if (final === undefined) {
    problem(obs, `${plan.mode} stream ended without a final event (${check.events} events${s.closeCode === undefined ? '' : `, close code ${s.closeCode}`})`)
    return false
  }
  if (plan.pause !== undefined && s.paused !== true) obs.notes.push('the reader did not get to pause')
  if (final.type === 'exit') {
    judgeExit(obs, plan, final, check.out)
    if (plan.stdin !== undefined && s.stdinSent !== plan.stdin.data.bytes) problem(obs, `exit after ${String(s.stdinSent)} of ${plan.stdin.data.bytes} stdin bytes were sent, before eof`)
    if (plan.mode === 'ws' && s.closeCode !== 1000) problem(obs, `WebSocket closed with ${s.closeCode} after exit, want 1000`)
  } else {
    judgeError(obs, { code: final.code, status: final.status, detail: final.message }, check.out)
    if (plan.mode === 'ws' && s.closeCode !== 1011) problem(obs, `WebSocket closed with ${s.closeCode} after error, want 1011`)
  }
  return true
}

async function runExec (plan: Plan): Promise<Observation> {
  const t0 = Date.now()
  const obs: Observation = {
    key: plan.key,
    sandbox: plan.sandbox,
    shape: plan.shape,
    mode: plan.mode,
    script: plan.script,
    wantExit: plan.exitCode,
    sleepMs: plan.sleepMs,
    boundMs: plan.boundMs,
    t0,
    tEnd: t0,
    outcome: 'broken',
    bytes: 0,
    problems: [],
    notes: []
  }
  const left = (): number => t0 + plan.boundMs - Date.now()
  const body: Body = { command: ['sh', '-c', plan.script], env: { SOAK_RUN: RUN_ID }, ...(plan.interactive ? { interactive: true } : {}) }
  try {
    const answered = plan.mode === 'wait' ? await runWait(plan, obs, body, left) : await runAttached(plan, obs, body, left)
    if (answered) {
      await checkRecord(obs, plan)
      // Megabytes would otherwise stay in the gateway for the TTL.
      if (obs.execId !== undefined && planBytes(plan) > LARGE_BYTES) {
        const d = await httpCall('DELETE', `/v1/execs/${obs.execId}`, undefined, 5000)
        if (!d.ok || d.status !== 204) problem(obs, `DELETE of the ended exec: ${d.ok ? `HTTP ${d.status}` : d.error}`)
      }
    }
  } catch (err) {
    obs.tEnd = Date.now()
    problem(obs, `soak client threw: ${String(err)}`)
  }
  return obs
}

export async function agentLoop (agent: number): Promise<void> {
  const r = rng(`${SEED}/agent/${agent}`)
  const sandbox = world.sandboxes[agent % world.sandboxes.length]!.id
  await sleep(r() * 3000)
  for (let seq = 0; seq < MAX_EXECS_PER_AGENT && Date.now() < world.deadline && !world.aborted; seq++) {
    const obs = await runExec(makePlan(agent, seq, sandbox))
    // Keep a flat copy of the start only: a slice would be a V8 sliced string that keeps the
    // whole script (up to 25 KB) alive and inflate the leak check with the driver's own records.
    if (obs.script.length > 200) obs.script = [...obs.script.slice(0, 200)].join('')
    observations.push(obs)
    if (obs.outcome === 'hung' || obs.problems.length > 0) {
      log(`[soak ${rel(obs.tEnd)}] ${obs.outcome === 'hung' ? 'HUNG' : 'PROBLEM'} ${obs.key} ${obs.shape} ${obs.sandbox} ${obs.mode}: ${obs.problems.join('; ').slice(0, 400)}`)
    }
    await sleep(r() * 400)
  }
}
