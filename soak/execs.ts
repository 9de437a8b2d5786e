// One exec, start to verdict: start it, read it the way its plan says (?wait=true, attached from
// the start, attached late, paused, feeding stdin, or nobody attached until the end), and check
// every byte, offset, gap, final event and close code against the plan; then the agents that
// run execs back to back. Like any client, it goes on through a gateway restart: a refused
// connection is tried again, a reader cut off reconnects from its offsets, and a ?wait=true
// whose answer was cut off finds its exec again (see resume.ts).
import { sleep } from '../test/helpers/wait.js'
import { httpCall, type ReadOptions, type StreamRead } from './clients.js'
import { StreamCheck } from './expected.js'
import { CLUSTER, MAX_EXECS_PER_AGENT, RUN_ID, SEED, rng } from './knobs.js'
import { makePlan, planBytes, type Mode, type Plan } from './plans.js'
import { callThrough, findExec, follow, postThrough } from './resume.js'
import { log, rel, restartAllowance, restartedSince, world } from './world.js'

import { EventCheck, gapsAfterEnd, judgeError, judgeExit, json, type Checks, type Gap, type Stream } from './event-check.js'
import { observations, problem, type Observation } from './observation.js'

const LARGE_BYTES = 1024 * 1024

// A later GET must say the same, field for field (docs/api.md §3). A restart since the answer may
// have taken an OpenSSH exec's record with it.
async function checkRecord (obs: Observation, plan: Plan, left: () => number): Promise<void> {
  if (obs.execId === undefined) return
  let r = await callThrough('GET', `/v1/execs/${obs.execId}`, () => Math.max(left(), 5000))
  if (r.ok && r.status === 404 && restartedSince(obs.t0)) { obs.notes.push('record gone after a gateway restart'); return }
  // A successor rebuilds a kept exec that had ended as running until its daemon has replayed it.
  const rebuiltSince = Date.now()
  while (r.ok && r.status === 200 && (r.json.status === 'running' || r.json.status === 'pending') && obs.outcome !== 'error' &&
    restartedSince(obs.t0) && Date.now() - rebuiltSince < 10_000) {
    await sleep(200)
    r = await callThrough('GET', `/v1/execs/${obs.execId}`, () => 5000)
  }
  if (Date.now() - rebuiltSince > 100) obs.notes.push(`after the gateway restart, GET said running for ${Date.now() - rebuiltSince} ms although the exec had ended`)
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

// What the gateway's own record says, for a hung exec's report.
async function gatewayViewOf (plan: Plan, execId: string | undefined): Promise<string> {
  let j: any
  if (execId !== undefined) {
    const r = await httpCall('GET', `/v1/execs/${execId}`, undefined, 3000)
    j = r.ok && r.status === 200 ? r.json : undefined
  } else {
    const r = await httpCall('GET', `/v1/execs?sandboxId=${plan.sandbox}`, undefined, 3000)
    j = r.ok && r.status === 200 ? (r.json.execs as any[]).find((x) => x.command[2] === plan.script) : undefined
  }
  const sb = await httpCall('GET', `/v1/sandboxes/${plan.sandbox}`, undefined, 3000)
  const session = sb.ok && sb.status === 200 ? sb.json.status : 'unknown'
  if (j === undefined) return `the gateway has no record of it (or did not answer); sandbox ${session}`
  return `gateway record ${j.id}: status=${j.status} exitCode=${j.exitCode} error=${j.error === null ? 'null' : j.error.code} startedAt=${rel(j.startedAt === null ? undefined : Date.parse(j.startedAt))} endedAt=${rel(j.endedAt === null ? undefined : Date.parse(j.endedAt))} stdoutBytes=${j.stdoutBytes}/${plan.stdout.bytes} stderrBytes=${j.stderrBytes}/${plan.stderr.bytes}; sandbox ${session}`
}

async function markHung (obs: Observation, plan: Plan, what: string): Promise<void> {
  obs.outcome = 'hung'
  obs.tEnd = Date.now()
  obs.problems.push(`${what}: no answer within its bound of ${plan.boundMs} ms (planned ${plan.plannedMs} ms)${restartAllowance(obs.t0) > 0 ? ` + ${restartAllowance(obs.t0)} ms for gateway restarts` : ''}`)
  obs.gatewayView = await gatewayViewOf(plan, obs.execId)
}

function markLost (obs: Observation, why: string): void {
  obs.outcome = 'lost'
  obs.tEnd = Date.now()
  obs.detail = why
}

type Body = Record<string, unknown>

// Reads an exec's events through restarts; false when it ended without a verdict on its events
// (hung, lost, or no final event: the observation says which).
async function readEvents (obs: Observation, id: string, mode: Exclude<Mode, 'wait'>, check: EventCheck, left: () => number, first: ReadOptions): Promise<StreamRead | undefined> {
  const f = await follow(mode, id, obs.t0, left, check.feed, () => check.final !== undefined, () => ({ stdout: check.out.stdout.offset, stderr: check.out.stderr.offset }), first)
  obs.reconnects += f.reconnects
  if (f.lost !== undefined) { check.finish(); markLost(obs, f.lost); return undefined }
  return f.s
}

// The exec of a POST whose answer a restart cut off, found again and read from 0 like a reader
// attached from the start; lost when the successor never reports it.
async function resumeDropped (plan: Plan, obs: Observation, left: () => number): Promise<string | undefined> {
  const id = await findExec(plan.sandbox, plan.script, left)
  if (id === undefined) {
    if (left() <= 0) await markHung(obs, plan, 'POST cut off by a gateway restart; its exec was never found again')
    else markLost(obs, 'POST cut off by a gateway restart; the successor never reported its exec')
    return undefined
  }
  obs.execId = id
  obs.reconnects++
  return id
}

// POST ?wait=true; a failed exec's replayed /events must end with the same error.
async function runWait (plan: Plan, obs: Observation, body: Body, left: () => number): Promise<boolean> {
  const r = await postThrough(`/v1/sandboxes/${plan.sandbox}/execs?wait=true`, body, left)
  obs.tEnd = Date.now()
  if (r === 'dropped') {
    const id = await resumeDropped(plan, obs, left)
    if (id === undefined) return false
    return await judgeEvents(plan, obs, id, 'ndjson', undefined, left, { offsets: { stdout: 0, stderr: 0 } }, false)
  }
  if (!r.ok) {
    if (r.timedOut) await markHung(obs, plan, 'POST ?wait=true')
    else problem(obs, `POST ?wait=true ended without an answer: ${r.error}`)
    return false
  }
  obs.httpStatus = r.status
  const b = r.json
  // Cluster mode: the exec moved with its sandbox and the replica answering the wait did not
  // find its new owner in time; the answer says to read it by its id, as a client does.
  if (CLUSTER && r.status === 503 && b?.code === 'replica_unavailable' && typeof b.execId === 'string') {
    obs.notes.push(`?wait=true → 503 replica_unavailable, read again by its id: ${String(b.detail).slice(0, 200)}`)
    obs.execId = b.execId
    obs.reconnects++
    return await judgeEvents(plan, obs, b.execId, 'ndjson', undefined, left, { offsets: { stdout: 0, stderr: 0 } }, false)
  }
  // Cluster mode: the replica answering the wait lost track of the exec it created.
  if (CLUSTER && r.status === 404 && b?.code === 'exec_not_found') { markLost(obs, `?wait=true → 404 exec_not_found: ${String(b.detail)}`); return false }
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
    const t = Date.now()
    const replay = await streamNdjsonOnce(obs.execId, check)
    check.finish()
    if (restartedSince(t)) obs.notes.push('the replay of the failed exec was cut by a gateway restart')
    else if (replay.error !== undefined || replay.timedOut) problem(obs, `replay of the failed exec: ${replay.error ?? 'timed out'}`)
    else if (check.final?.type !== 'error' || check.final.code !== b.code) problem(obs, `replay ends with ${json(check.final)}, the answer was ${b.code}`)
    c = check.out
  } else if (b.code !== 'too_many_requests') {
    problem(obs, `problem ${b.code} without an execId`)
  }
  judgeError(obs, b, c)
  return true
}

// Cluster mode: the replay reconnects by offsets like any reader (a drain or a move may cut it).
const streamNdjsonOnce = async (id: string, check: EventCheck): Promise<StreamRead> => {
  const until = Date.now() + (CLUSTER ? 15_000 : 5000)
  return await follow('ndjson', id, Date.now(), () => until - Date.now(), check.feed, () => !CLUSTER || check.final !== undefined,
    () => ({ stdout: check.out.stdout.offset, stderr: check.out.stderr.offset }), {}).then((f) => f.s)
}

// GET until the exec has ended, or has printed `until` stdout bytes: the record then, or
// undefined (hung, lost, or a GET that failed).
async function pollRecord (plan: Plan, obs: Observation, left: () => number, until: 'end' | number): Promise<any> {
  for (;;) {
    const ms = left()
    if (ms <= 0) { await markHung(obs, plan, until === 'end' ? 'nobody attached: GET never showed the end' : `waiting for ${until} stdout bytes before attaching`); return undefined }
    const t = Date.now()
    const r = await callThrough('GET', `/v1/execs/${obs.execId}`, left)
    if (!r.ok && r.timedOut && left() <= 0) continue
    if (r.ok && r.status === 404 && restartedSince(t - 1000)) { markLost(obs, 'after the gateway restart, GET → 404: the successor did not get the exec back'); return undefined }
    if (CLUSTER && r.ok && r.status === 404) { markLost(obs, `GET → 404: no replica knows the exec: ${String(r.json?.detail)}`); return undefined }
    // A replica that was just killed, or an exec on its way between replicas: docs/cluster.md says
    // retry, and the exec's bound still holds.
    if (CLUSTER && r.ok && r.status === 503 && (r.json?.code === 'replica_unavailable' || r.json?.code === 'directory_unavailable')) {
      const note = `GET → 503 ${String(r.json.code)}, retried`
      if (!obs.notes.includes(note)) obs.notes.push(note)
      await sleep(Math.min(250, Math.max(1, left())))
      continue
    }
    if (!r.ok || r.status !== 200) { obs.tEnd = Date.now(); problem(obs, `GET /v1/execs/${obs.execId} while waiting: ${r.ok ? `HTTP ${r.status}` : r.error}`); return undefined }
    const j = r.json
    if (j.status === 'exited' || j.status === 'failed' || (typeof until === 'number' && j.stdoutBytes >= until)) return j
    await sleep(Math.min(until === 'end' ? 250 : 100, Math.max(1, left())))
  }
}

// Reads the events (through restarts) and judges the final one.
async function judgeEvents (plan: Plan, obs: Observation, id: string, mode: Exclude<Mode, 'wait'>, gaps: Partial<Record<Stream, Gap>> | undefined,
  left: () => number, first: ReadOptions, ended: boolean): Promise<boolean> {
  const check = new EventCheck(obs, plan, first.offsets ?? { stdout: 0, stderr: 0 }, gaps)
  const s = await readEvents(obs, id, mode, check, left, first)
  if (s === undefined) return false
  if (!ended) obs.tEnd = Date.now()
  if (s.timedOut) { await markHung(obs, plan, `${mode} reader${ended ? ' of an exec that had ended' : ''}`); return false }
  if (s.error !== undefined) problem(obs, `${mode} reader: ${s.error}`)
  check.finish()
  obs.bytes += s.stdinSent ?? 0
  const final = check.final
  if (final === undefined) {
    problem(obs, `${mode} stream ended without a final event (${check.events} events${s.closeCode === undefined ? '' : `, close code ${s.closeCode}`})`)
    return false
  }
  if (plan.pause !== undefined && s.paused !== true && obs.reconnects === 0) obs.notes.push('the reader did not get to pause')
  if (final.type === 'exit') {
    judgeExit(obs, plan, final, check.out)
    if (plan.stdin !== undefined && s.stdinSent !== plan.stdin.data.bytes) problem(obs, `exit after ${String(s.stdinSent)} of ${plan.stdin.data.bytes} stdin bytes were sent, before eof`)
    if (mode === 'ws' && s.closeCode !== 1000) problem(obs, `WebSocket closed with ${s.closeCode} after exit, want 1000`)
  } else {
    judgeError(obs, { code: final.code, status: final.status, detail: final.message }, check.out)
    if (mode === 'ws' && s.closeCode !== 1011) problem(obs, `WebSocket closed with ${s.closeCode} after error, want 1011`)
  }
  return true
}

// POST, then a WebSocket, NDJSON or SSE reader: from the start, or once the plan's wait is over.
async function runAttached (plan: Plan, obs: Observation, body: Body, left: () => number): Promise<boolean> {
  const r = await postThrough(`/v1/sandboxes/${plan.sandbox}/execs`, body, () => Math.min(left(), 10_000))
  let id: string
  if (r === 'dropped') {
    const found = await resumeDropped(plan, obs, left)
    if (found === undefined) return false
    id = found
  } else {
    if (!r.ok) {
      if (r.timedOut) await markHung(obs, plan, 'POST (no wait)')
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
    id = String(r.json.id)
    obs.execId = id
  }
  let gaps: Partial<Record<Stream, Gap>> | undefined
  let readLeft = left
  if (plan.attachAfter !== undefined) {
    const rec = await pollRecord(plan, obs, left, plan.attachAfter)
    if (rec === undefined) return false
    if (rec.status === 'exited' || rec.status === 'failed') {
      // The answer is in; reading it back is bounded by its size.
      obs.tEnd = Date.now()
      gaps = gapsAfterEnd(rec, plan.offsets)
      const readUntil = Date.now() + Math.max(left(), 5000 + Math.ceil(planBytes(plan) / 1000))
      const t = Date.now()
      readLeft = () => readUntil + restartAllowance(t) - Date.now()
    }
  }
  const mode = plan.mode === 'wait' ? 'ndjson' : plan.mode
  const first: ReadOptions = {
    offsets: plan.offsets,
    ...(plan.pause === undefined ? {} : { pause: plan.pause }),
    ...(plan.stdin === undefined ? {} : { stdin: { ...plan.stdin, rand: rng(`${SEED}/stdin-chunks/${plan.key}`) } })
  }
  return await judgeEvents(plan, obs, id, mode, gaps, readLeft, first, gaps !== undefined)
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
    reconnects: 0,
    relayEvents: 0,
    problems: [],
    notes: []
  }
  // A gateway restart adds its outage and the reconnect after it to the bound.
  const left = (): number => t0 + plan.boundMs + restartAllowance(t0) - Date.now()
  const body: Body = { command: ['sh', '-c', plan.script], env: { SOAK_RUN: RUN_ID }, ...(plan.interactive ? { interactive: true } : {}) }
  try {
    const answered = plan.mode === 'wait' ? await runWait(plan, obs, body, left) : await runAttached(plan, obs, body, left)
    if (answered) {
      await checkRecord(obs, plan, left)
      // Megabytes would otherwise stay in the gateway for the TTL.
      if (obs.execId !== undefined && planBytes(plan) > LARGE_BYTES) {
        const t = Date.now()
        const d = await callThrough('DELETE', `/v1/execs/${obs.execId}`, () => 5000)
        const gone = d.ok && d.status === 404 && restartedSince(Math.min(t, obs.t0))
        if (!gone && (!d.ok || d.status !== 204)) problem(obs, `DELETE of the ended exec: ${d.ok ? `HTTP ${d.status}` : d.error}`)
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
