// What a client does when the gateway restarts under it (SIGKILL, a successor on the same ports
// and data dir): a refused connection never reached a gateway and is sent again; a sandbox the
// successor does not know yet (its supervisor is still reconnecting) is asked again; a reader
// that is cut off reconnects from its offsets (Last-Event-ID for SSE, the query offsets for the
// WebSocket and NDJSON); a POST whose answer was cut off finds its exec by its command, which
// carries the exec's unique key. The successor answers 404 for an exec it did not get back from
// a sandbox: the exec was lost to the restart.
import { sleep } from '../test/helpers/wait.js'
import { httpCall, streamNdjson, streamSse, streamWs, type HttpOutcome, type ReadOptions, type StreamRead } from './clients.js'
import { CLUSTER, KNOBS } from './knobs.js'
import type { Mode } from './plans.js'
import { restartedSince, world } from './world.js'

const RETRY_MS = 200
// Cluster mode: reconnects of one reader before its cut is taken as its answer.
const CLUSTER_RECONNECTS = 40
// A GET for an id the successor does not know yet waits up to the session wait for the sandboxes
// to report it (docs/api.md §5 rule 4), so a call is given that long plus margin.
const CALL_MS = KNOBS.sessionWaitMs + 5000

// Whether the gateway may not know every sandbox yet: it is down, or its successor started less
// than the session wait (the supervisors' time to reconnect) ago.
function justRestarted (): boolean {
  const r = world.gw.restarts[world.gw.restarts.length - 1]
  return r !== undefined && (r.upAt === undefined || Date.now() - r.upAt < KNOBS.sessionWaitMs + 2000)
}

// Whether a failure at `since` or later was the restart's doing: the connection was refused, or
// a restart began since the call did.
const cutByRestart = (r: { refused?: boolean, error?: string }, since: number): boolean =>
  r.refused === true || /ECONNREFUSED/.test(r.error ?? '') || restartedSince(since) || !world.gw.up

// Cluster mode: answers that say another replica will serve it, not what became of the exec:
// haproxy's own 502/503/504 (no problem JSON), a draining replica's shutting_down before it took
// the request, a forward to a replica that is gone or moving (replica_unavailable).
const code = (r: HttpOutcome): unknown => r.ok ? r.json?.code : undefined
const fromProxy = (r: HttpOutcome): boolean => CLUSTER && r.ok && [502, 503, 504].includes(r.status) && typeof code(r) !== 'string'
const passedOn = (r: HttpOutcome): boolean => CLUSTER && r.ok && r.status === 503 && (code(r) === 'shutting_down' || code(r) === 'replica_unavailable')

// An idempotent call (GET, DELETE) that goes on through a restart (cluster mode: through any
// cut connection or passed-on answer: it may be asked again).
export async function callThrough (method: 'GET' | 'DELETE', path: string, left: () => number): Promise<HttpOutcome> {
  for (;;) {
    const t = Date.now()
    const r = await httpCall(method, path, undefined, Math.max(1, Math.min(left(), CALL_MS)))
    const again = fromProxy(r) || passedOn(r) || (CLUSTER && !r.ok && !r.timedOut)
    if ((r.ok && !again) || left() <= 0 || (!r.ok && !again && !cutByRestart(r, t))) return r
    await sleep(Math.min(RETRY_MS, Math.max(1, left())))
  }
}

// 'dropped': the connection was cut by a restart after the request was sent; the exec may exist.
export async function postThrough (path: string, body: unknown, timeoutMs: () => number): Promise<HttpOutcome | 'dropped'> {
  for (;;) {
    const t = Date.now()
    const ms = timeoutMs()
    const r = await httpCall('POST', path, body, Math.max(1, ms))
    const notTaken = r.ok && r.status === 503 && (code(r) === undefined || (code(r) === 'shutting_down' && r.json?.execId === undefined))
    const again = ms > RETRY_MS && ((!r.ok && r.refused === true) ||
      (r.ok && r.status === 404 && r.json?.code === 'sandbox_not_found' && justRestarted()) || (CLUSTER && notTaken))
    if (again) { await sleep(RETRY_MS); continue }
    if (!r.ok && cutByRestart(r, t)) return 'dropped'
    // Cluster mode: cut on its way through haproxy or a forward; the exec may exist.
    if (CLUSTER && ((!r.ok && !r.timedOut) || fromProxy(r) || (passedOn(r) && r.ok && r.json?.execId === undefined))) return 'dropped'
    return r
  }
}

// One list per sandbox at a time, shared by every client looking for its exec after a restart.
const lists = new Map<string, { at: number, p: Promise<HttpOutcome> }>()

// The id of the exec whose command is this script, once the successor knows it; undefined when
// the session wait after the successor's start has passed without it (it was not kept).
export async function findExec (sandbox: string, script: string, left: () => number): Promise<string | undefined> {
  for (;;) {
    const r = world.gw.restarts[world.gw.restarts.length - 1]
    const until = r?.upAt === undefined ? Infinity : r.upAt + KNOBS.sessionWaitMs + 2000
    let l = lists.get(sandbox)
    if (l === undefined || Date.now() - l.at > 400) {
      l = { at: Date.now(), p: httpCall('GET', `/v1/execs?sandboxId=${sandbox}`, undefined, 5000) }
      lists.set(sandbox, l)
    }
    const res = await l.p
    if (res.ok && res.status === 200 && Array.isArray(res.json?.execs)) {
      const e = (res.json.execs as Array<{ id: string, command: string[] }>).find((x) => x.command[2] === script)
      if (e !== undefined) return e.id
      if (Date.now() > until) return undefined
    }
    if (left() <= 0) return undefined
    await sleep(Math.min(500, Math.max(1, left())))
  }
}

const read = (mode: Exclude<Mode, 'wait'>, id: string, ms: number, feed: (ev: any) => void, o: ReadOptions): Promise<StreamRead> =>
  mode === 'ws' ? streamWs(id, ms, feed, o) : mode === 'sse' ? streamSse(id, ms, feed, o) : streamNdjson(id, ms, feed, o)

export interface Followed {
  s: StreamRead
  // Why the exec was lost to a restart, when it was.
  lost?: string
  reconnects: number
}

// A reader that reconnects, from the offsets it has reached, when a restart cuts it off. A
// client that was sending stdin cannot know which of its bytes the dead gateway passed on: it
// asks the exec record (stdinBytes, what the sandbox received) and sends again from there.
// `since`: when the client learnt the exec's id; a 404 after a restart since then is a loss.
export async function follow (mode: Exclude<Mode, 'wait'>, id: string, since: number, left: () => number, feed: (ev: any) => void, ended: () => boolean,
  offsets: () => { stdout: number, stderr: number }, first: ReadOptions): Promise<Followed> {
  let o = first
  let reconnects = 0
  for (;;) {
    const t = Date.now()
    const s = await read(mode, id, Math.max(1, left()), feed, o)
    if (s.status === 404 && restartedSince(since)) return { s, lost: `after the gateway restart, ${mode} attach → 404: the successor did not get the exec back`, reconnects }
    // Cluster mode: the replicas do not know the exec any more (its replica, or its sandbox, moved or went).
    if (CLUSTER && s.status === 404) return { s, lost: `${mode} attach${reconnects > 0 ? ` after ${reconnects} reconnect(s)` : ''} → 404: no replica knows the exec (${s.error?.slice(0, 160) ?? ''})`, reconnects }
    if (s.timedOut || ended()) return { s, reconnects }
    // Cluster mode: a 1012 close (the sandbox moved, or the replica drains), a stream that ends
    // without a final event, or a replica or haproxy that could not serve it: reconnect by offsets.
    if (CLUSTER ? !(s.status === undefined || [502, 503, 504].includes(s.status)) || reconnects >= CLUSTER_RECONNECTS : !cutByRestart({ error: s.error }, t)) return { s, reconnects }
    if (left() <= 0) return { s: { timedOut: true }, reconnects }
    if (CLUSTER) await sleep(Math.min(RETRY_MS / 2, left()))
    // A refused attempt (the successor is not up yet) is no resume; the cut before it was. Nor
    // is a 503 (cluster mode: the exec's replica is gone and its state not known anywhere until
    // its sandbox comes back or the reaper ends it; haproxy with no server up): it is asked
    // again until the exec's own bound.
    if (/ECONNREFUSED/.test(s.error ?? '') || s.status === 503) await sleep(Math.min(RETRY_MS, left()))
    else reconnects++
    o = { offsets: offsets() }
    if (first.stdin !== undefined) {
      const rec = await callThrough('GET', `/v1/execs/${id}`, left)
      if (rec.ok && rec.status === 404 && restartedSince(since)) return { s, lost: 'after the gateway restart, GET → 404: the successor did not get the exec back', reconnects }
      if (!rec.ok || rec.status !== 200 || typeof rec.json?.stdinBytes !== 'number') {
        if (left() <= 0) return { s: { timedOut: true }, reconnects }
        return { s: { timedOut: false, error: `the exec record to resume stdin from: ${rec.ok ? `HTTP ${rec.status}` : rec.error ?? 'no answer'}` }, reconnects }
      }
      o = { ...o, stdin: { ...first.stdin, from: rec.json.stdinBytes as number } }
    }
  }
}
