// The soak: many agents run long, mostly silent execs with bursts of output against one in-process
// gateway and real supervisor processes, while a chaos loop kills, stops, blackholes and resets
// them. Every exec must end within its bound with its true exit status (exact output, exact code)
// or an honest error (503 relay_unavailable / sandbox_unavailable, or the other bounded errors of
// CONTRACT §5: 502 ssh_failed, 504 relay_open_timeout, 429), never a hang, never a made-up exit.
// How to run it and read it: soak/README.md.
import { describe, expect, it, afterAll } from 'vitest'
import http from 'node:http'
import { readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { execFileSync } from 'node:child_process'
import v8 from 'node:v8'
import vm from 'node:vm'
import WebSocket from 'ws'
import { startGateway, type TestGateway } from '../test/helpers/gateway.js'
import { startSupervisorProcess, type SupervisorProcess } from '../test/helpers/supervisor-process.js'
import { startTcpProxy, type TcpProxy } from '../test/helpers/tcp-proxy.js'
import { startOpenSshd, type OpenSshd, sandboxAccount } from '../test/helpers/openssh.js'
import { sleep } from '../test/helpers/wait.js'
import type { GatewayConfig } from '../src/config.js'
import { intEnv } from '../test/helpers/env.js'

declare module 'vitest' {
  interface TaskMeta { soakLine?: string }
}

// ---------------------------------------------------------------- knobs


const DURATION_S = intEnv('SOAK_DURATION_S', 120, 1, 7 * 24 * 3600)
const AGENTS = intEnv('SOAK_AGENTS', 80, 1, 2000)
const SANDBOXES = intEnv('SOAK_SANDBOXES', 8, 1, 64)
const OPENSSH_SANDBOXES = Math.min(SANDBOXES, intEnv('SOAK_OPENSSH', 1, 0, 64))
const SLACK_MS = intEnv('SOAK_SLACK_MS', 10_000, 0, 600_000)
const MIN_TRUE_EXITS = intEnv('SOAK_MIN_EXECS', 50, 0, 1_000_000_000)
const CHAOS_MIN_MS = intEnv('SOAK_CHAOS_MIN_MS', 2000, 100, 600_000)
const CHAOS_MAX_MS = intEnv('SOAK_CHAOS_MAX_MS', 5000, CHAOS_MIN_MS, 600_000)
const DUMP_PATH = process.env.SOAK_DUMP ?? ''
const HEAP_SNAPSHOT_PATH = process.env.SOAK_HEAP_SNAPSHOT ?? ''
const SEED = process.env.SOAK_SEED !== undefined && process.env.SOAK_SEED !== '' ? process.env.SOAK_SEED : String(Date.now() % 1_000_000_000)
const MAX_EXECS_PER_AGENT = 100_000

const ALL_FAULT_KINDS = ['kill', 'stop', 'blackhole', 'reset', 'wedge'] as const
type FaultKind = typeof ALL_FAULT_KINDS[number]
const FAULT_KINDS: FaultKind[] = (() => {
  const raw = process.env.SOAK_FAULTS
  if (raw === undefined || raw === '') return [...ALL_FAULT_KINDS]
  if (raw === 'none') return []
  const kinds = raw.split(',').map((s) => s.trim()).filter((s) => s !== '')
  for (const k of kinds) if (!(ALL_FAULT_KINDS as readonly string[]).includes(k)) throw new Error(`SOAK_FAULTS: unknown fault kind ${k} (use ${ALL_FAULT_KINDS.join(',')} or none)`)
  return kinds as FaultKind[]
})()

// Short liveness knobs so that faults resolve in seconds.
const KNOBS = {
  sshKeepaliveIntervalMs: 1000,
  sshKeepaliveCountMax: 3,
  h2PingIntervalMs: 1000,
  h2PingTimeoutMs: 1000,
  closeWaitMs: 500,
  sessionWaitMs: 5000,
  relayOpenTimeoutMs: 5000,
  sshReadyTimeoutMs: 5000,
  // Short, so that the sweeper runs during the soak and RSS shows retention, not accumulation.
  execTtlS: 30
} satisfies Partial<GatewayConfig>

const KEEPALIVE_BOUND_MS = KNOBS.sshKeepaliveIntervalMs * (KNOBS.sshKeepaliveCountMax + 1)
const PING_BOUND_MS = KNOBS.h2PingIntervalMs + KNOBS.h2PingTimeoutMs
const DETECTION_BOUND_MS = Math.max(KEEPALIVE_BOUND_MS, PING_BOUND_MS, KNOBS.sessionWaitMs, KNOBS.relayOpenTimeoutMs, KNOBS.sshReadyTimeoutMs)
// A fault that lasts longer than this must have been detected by the gateway (ping / keepalive
// bound plus margin); a running exec that still reports an exit through it "survived" it.
const MUST_DETECT_MS: Record<FaultKind, number> = { kill: 0, reset: 0, stop: PING_BOUND_MS + 1500, blackhole: PING_BOUND_MS + 1500, wedge: KEEPALIVE_BOUND_MS + 1500 }

const RUN_ID = `${process.pid}-${Date.now()}`
const BIG_BURST_P = 0.08

// ---------------------------------------------------------------- seeded randomness

type Rand = () => number
function hash32 (s: string): number {
  let h = 0x811c9dc5
  for (let i = 0; i < s.length; i++) { h ^= s.charCodeAt(i); h = Math.imul(h, 0x01000193) }
  return h >>> 0
}
// mulberry32
function rng (seed: string): Rand {
  let a = hash32(seed)
  return () => {
    a = (a + 0x6D2B79F5) | 0
    let t = Math.imul(a ^ (a >>> 15), 1 | a)
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}
const pick = <T>(r: Rand, xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!

// ---------------------------------------------------------------- exec plans

type Mode = 'wait' | 'ws' | 'ndjson'
interface Plan {
  key: string
  agent: number
  seq: number
  sandbox: string
  mode: Mode
  script: string
  stdout: string
  stderr: string
  stdoutBytes: number
  stderrBytes: number
  exitCode: number
  sleepMs: number
  plannedMs: number
  boundMs: number
}

const MULTIBYTE = ['é', 'ß', 'Ω', '→', '日', '本', '🙂']
// Text for inside single quotes: anything but ' and NUL; some newlines and multibyte characters.
function literal (r: Rand, bytes: number): string {
  const parts: string[] = []
  let n = 0
  while (n < bytes) {
    const x = r()
    let c: string
    if (x < 0.04) c = pick(r, MULTIBYTE)
    else if (x < 0.07) c = '\n'
    else {
      const code = 0x20 + Math.floor(r() * 95)
      c = code === 0x27 ? '"' : String.fromCharCode(code)
    }
    parts.push(c)
    n += Buffer.byteLength(c)
  }
  return parts.join('')
}
const TOKEN_CHARS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'
function token (r: Rand, len: number): string {
  let s = ''
  for (let i = 0; i < len; i++) s += TOKEN_CHARS[Math.floor(r() * TOKEN_CHARS.length)]
  return s
}
function repeatTo (unit: string, n: number): string {
  return unit.repeat(Math.ceil(n / unit.length)).slice(0, n)
}

// One burst of deterministic output: a literal (printf), sometimes 100 KB+ (yes | head -c).
function burst (r: Rand, redirect: string, allowBig: boolean): { sh: string[], text: string } {
  const sh: string[] = []
  let text = ''
  const x = r()
  const litBytes = x < 0.7 ? 1 + Math.floor(r() * 200) : x < 0.95 ? 200 + Math.floor(r() * 3800) : 4000 + Math.floor(r() * 6000)
  const lit = literal(r, litBytes)
  sh.push(`printf '%s' '${lit}'${redirect}`)
  text += lit
  if (allowBig && r() < BIG_BURST_P) {
    const tok = token(r, 1 + Math.floor(r() * 60))
    const n = 100_000 + Math.floor(r() * 300_000)
    sh.push(`yes '${tok}' | head -c ${n}${redirect}`)
    text += repeatTo(`${tok}\n`, n)
    if (r() < 0.5) {
      const tail = literal(r, 1 + Math.floor(r() * 100))
      sh.push(`printf '%s' '${tail}'${redirect}`)
      text += tail
    }
  }
  return { sh, text }
}

function sleepS (r: Rand): number {
  const v = r() < 0.6 ? 0.5 + r() * 2.5 : 3 + r() * 5
  return Math.round(v * 10) / 10
}

function makePlan (agent: number, seq: number, sandbox: string): Plan {
  const r = rng(`${SEED}/exec/${agent}/${seq}`)
  const key = `a${agent}.${seq}`
  const s1 = sleepS(r)
  const s2 = sleepS(r)
  const a = burst(r, '', true)
  const b = burst(r, ' >&2', true)
  const extra = r() < 0.3 ? burst(r, '', false) : undefined
  const exitCode = Math.floor(r() * 256)
  const m = r()
  const mode: Mode = m < 0.7 ? 'wait' : m < 0.85 ? 'ws' : 'ndjson'
  const lines = [`: soak ${key}`, `sleep ${s1.toFixed(1)}`, ...a.sh, `sleep ${s2.toFixed(1)}`, ...b.sh, ...(extra?.sh ?? []), `exit ${exitCode}`]
  const stdout = a.text + (extra?.text ?? '')
  const stderr = b.text
  const stdoutBytes = Buffer.byteLength(stdout)
  const stderrBytes = Buffer.byteLength(stderr)
  const sleepMs = Math.round((s1 + s2) * 1000)
  // Output at ≥ 0.5 MB/s even on a loaded machine, plus process start-up.
  const plannedMs = sleepMs + 300 + Math.ceil((stdoutBytes + stderrBytes) / 500)
  return {
    key, agent, seq, sandbox, mode, script: lines.join('\n'), stdout, stderr, stdoutBytes, stderrBytes,
    exitCode, sleepMs, plannedMs, boundMs: plannedMs + DETECTION_BOUND_MS + KNOBS.closeWaitMs + SLACK_MS
  }
}

// ---------------------------------------------------------------- observations

type Outcome = 'exit' | 'error' | 'hung' | 'broken'
interface Observation {
  key: string
  sandbox: string
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
  problems: string[]
  notes: string[]
  gatewayView?: string
}

const HONEST_503 = new Set(['relay_unavailable', 'sandbox_unavailable'])
const HONEST_OTHER: Record<string, number> = { ssh_failed: 502, relay_open_timeout: 504, too_many_requests: 429 }
const codeStatus = (code: string): number | undefined => HONEST_503.has(code) ? 503 : HONEST_OTHER[code]

function firstDiff (got: string, want: string): string {
  let i = 0
  while (i < got.length && i < want.length && got[i] === want[i]) i++
  return `${got.length} chars, want ${want.length}; first difference at char ${i}: got ${JSON.stringify(got.slice(i, i + 40))}, want ${JSON.stringify(want.slice(i, i + 40))}`
}

// Output carried by a failed exec: a prefix of what the script prints. The gateway flushes a
// character cut by the failure as U+FFFD, so trailing replacement characters standing where the
// expected text has a multibyte character are accepted.
function isPrefixOf (got: string, want: string): boolean {
  if (want.startsWith(got)) return true
  let p = got
  let n = 0
  while (p.endsWith('\uFFFD') && n < 3) { p = p.slice(0, -1); n++ }
  return n > 0 && want.startsWith(p) && (want.codePointAt(p.length) ?? 0) > 0x7f
}

// ---------------------------------------------------------------- HTTP / WebSocket clients

type HttpOutcome =
  | { ok: true, status: number, text: string, json: any }
  | { ok: false, timedOut: boolean, error: string, partial: string }

let publicUrl = ''

// One request on its own connection (no keep-alive pool to race with), bounded by timeoutMs.
function httpCall (method: string, path: string, body: unknown, timeoutMs: number, headers: Record<string, string> = {}): Promise<HttpOutcome> {
  return new Promise((resolve) => {
    const url = new URL(path, publicUrl)
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body))
    const chunks: Buffer[] = []
    let settled = false
    const partial = (): string => Buffer.concat(chunks).toString('utf8')
    const finish = (o: HttpOutcome): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      resolve(o)
    }
    const req = http.request({
      host: url.hostname,
      port: Number(url.port),
      path: url.pathname + url.search,
      method,
      agent: false,
      headers: payload === undefined ? headers : { ...headers, 'content-type': 'application/json', 'content-length': String(payload.length) }
    }, (res) => {
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        const text = partial()
        let json: any
        try { json = JSON.parse(text) } catch { json = undefined }
        finish({ ok: true, status: res.statusCode ?? 0, text, json })
      })
      res.on('error', (err) => finish({ ok: false, timedOut: false, error: `response error: ${err.message}`, partial: partial() }))
      res.on('close', () => finish({ ok: false, timedOut: false, error: 'response closed before its end', partial: partial() }))
    })
    req.on('error', (err) => finish({ ok: false, timedOut: false, error: `request error: ${err.message}`, partial: partial() }))
    const timer = setTimeout(() => {
      finish({ ok: false, timedOut: true, error: `no complete answer within ${timeoutMs} ms`, partial: partial() })
      req.destroy()
    }, Math.max(1, timeoutMs))
    req.end(payload)
  })
}

interface StreamRead { events: any[], timedOut: boolean, error?: string, closeCode?: number }

function readNdjson (execId: string, timeoutMs: number): Promise<StreamRead> {
  return httpCall('GET', `/v1/execs/${execId}/events`, undefined, timeoutMs, { accept: 'application/x-ndjson' }).then((r) => {
    const text = r.ok ? r.text : r.partial
    const events: any[] = []
    let error: string | undefined
    const lines = text.split('\n')
    // A line after the last newline is incomplete (cut off); only complete lines are events.
    for (const line of lines.slice(0, -1)) {
      if (line.trim() === '') continue
      try { events.push(JSON.parse(line)) } catch { error = `unparsable NDJSON line ${JSON.stringify(line.slice(0, 100))}` }
    }
    if (r.ok && r.status !== 200) error = `GET /events → HTTP ${r.status}: ${r.text.slice(0, 200)}`
    if (!r.ok && !r.timedOut) error = r.error
    return { events, timedOut: !r.ok && r.timedOut, ...(error === undefined ? {} : { error }) }
  })
}

function readWs (execId: string, timeoutMs: number): Promise<StreamRead> {
  return new Promise((resolve) => {
    const events: any[] = []
    let settled = false
    const ws = new WebSocket(`${publicUrl.replace(/^http/, 'ws')}/v1/execs/${execId}/stream`)
    const finish = (r: Omit<StreamRead, 'events'>): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      resolve({ events, ...r })
    }
    const timer = setTimeout(() => { finish({ timedOut: true }); ws.terminate() }, Math.max(1, timeoutMs))
    ws.on('message', (data, isBinary) => {
      if (isBinary) { events.push({ type: '(binary frame)' }); return }
      try { events.push(JSON.parse(data.toString())) } catch { events.push({ type: '(unparsable)', raw: data.toString().slice(0, 100) }) }
    })
    ws.on('unexpected-response', (_req, res) => { finish({ timedOut: false, error: `WebSocket refused: HTTP ${res.statusCode}` }); ws.terminate() })
    ws.on('error', (err) => finish({ timedOut: false, error: `WebSocket error: ${err.message}` }))
    ws.on('close', (code) => finish({ timedOut: false, closeCode: code }))
  })
}

// ---------------------------------------------------------------- the world

interface Sandbox {
  id: string
  kind: 'embedded' | 'openssh'
  proxy: TcpProxy
  sshdProxy: TcpProxy | undefined
  sup: SupervisorProcess
  busy: boolean
}

interface Fault {
  n: number
  kind: FaultKind
  sandbox: string
  start: number
  durationMs: number
  endAction?: number
  recovered?: number
  reconnected?: boolean
  recoveryTimedOut?: boolean
}

let g: TestGateway
let sshd: OpenSshd | undefined
const sandboxes: Sandbox[] = []
const allSupervisors: SupervisorProcess[] = []
const faults: Fault[] = []
const observations: Observation[] = []
const cleanups: Array<() => Promise<void>> = []
let runStart = Date.now()
let deadline = Date.now()
let aborted = false

const rel = (t: number | undefined): string => t === undefined ? '?' : `+${((t - runStart) / 1000).toFixed(1)}s`
const log = (line: string): void => { process.stdout.write(`${line}\n`) }

async function bounded<T> (p: Promise<T>, ms: number, what: string): Promise<T | undefined> {
  let t: NodeJS.Timeout | undefined
  const r = await Promise.race([p, new Promise<undefined>((resolve) => { t = setTimeout(() => { log(`[soak] cleanup: ${what} did not finish within ${ms} ms`); resolve(undefined) }, ms) })])
  clearTimeout(t)
  return r
}

function startSupervisor (sb: Omit<Sandbox, 'sup' | 'busy'>): SupervisorProcess {
  const sup = startSupervisorProcess({
    gatewayUrl: `http://${sb.proxy.host}:${sb.proxy.port}`,
    sandboxId: sb.id,
    token: g.token(sb.id),
    ...(sb.sshdProxy === undefined ? {} : { sshTarget: `${sb.sshdProxy.host}:${sb.sshdProxy.port}`, sshUser: sandboxAccount() })
  })
  allSupervisors.push(sup)
  return sup
}

const sessionOf = (id: string): { connectedAt: Date } | undefined => g.gw.registry.get(id)?.session

// Kills whatever the execs of this run left behind (commands of a SIGKILLed supervisor keep
// running as orphans): every process whose environment carries this run's SOAK_RUN tag.
function killTaggedProcesses (): number {
  const tag = `SOAK_RUN=${RUN_ID}`
  let killed = 0
  let entries: string[] = []
  try { entries = readdirSync('/proc').filter((d) => /^\d+$/.test(d)) } catch { return 0 }
  for (const pid of entries) {
    if (Number(pid) === process.pid) continue
    let environ: string
    try { environ = readFileSync(`/proc/${pid}/environ`, 'latin1') } catch { continue }
    if (!environ.split('\0').includes(tag)) continue
    try { process.kill(Number(pid), 'SIGKILL'); killed++ } catch { /* gone */ }
  }
  return killed
}

async function cleanupAll (): Promise<void> {
  aborted = true
  while (cleanups.length > 0) {
    const c = cleanups.pop()!
    await bounded(c().catch((err: unknown) => log(`[soak] cleanup step failed: ${String(err)}`)), 15_000, 'a cleanup step')
  }
  for (let i = 0; i < 3; i++) {
    if (killTaggedProcesses() === 0) break
    await sleep(200)
  }
}

// ---------------------------------------------------------------- chaos

async function awaitRecovery (sb: Sandbox, f: Fault, before: unknown): Promise<void> {
  const t = f.endAction!
  if (f.kind === 'wedge') { f.recovered = t; f.reconnected = false; return }
  for (let i = 0; i < 2000 && Date.now() - t < 20_000; i++) {
    const s = sessionOf(sb.id)
    if (s !== undefined && s.connectedAt.getTime() >= f.start) { f.recovered = Date.now(); f.reconnected = true; return }
    // The connection outlived the fault (it was shorter than the gateway's ping bound).
    if (s !== undefined && s === before && Date.now() - t > PING_BOUND_MS + 2000) { f.recovered = t; f.reconnected = false; return }
    await sleep(50)
  }
  f.recovered = Date.now()
  f.recoveryTimedOut = true
}

async function runFault (sb: Sandbox, kind: FaultKind, durationMs: number): Promise<void> {
  sb.busy = true
  const before = sessionOf(sb.id)
  const f: Fault = { n: faults.length + 1, kind, sandbox: sb.id, start: Date.now(), durationMs }
  faults.push(f)
  try {
    switch (kind) {
      case 'kill':
        sb.sup.signal('SIGKILL')
        await sleep(durationMs)
        if (!aborted) sb.sup = startSupervisor(sb)
        break
      case 'stop':
        sb.sup.signal('SIGSTOP')
        await sleep(durationMs)
        sb.sup.signal('SIGCONT')
        break
      case 'blackhole':
        sb.proxy.blackholeAll()
        await sleep(durationMs)
        sb.proxy.setMode('pass')
        break
      case 'reset':
        sb.proxy.resetAll()
        break
      case 'wedge':
        sb.sshdProxy!.blackholeAll()
        await sleep(durationMs)
        sb.sshdProxy!.setMode('pass')
        break
    }
    f.endAction = Date.now()
    await awaitRecovery(sb, f, before)
    const what = kind === 'kill' ? `restarted after ${durationMs} ms` : kind === 'reset' ? 'connections reset' : `for ${durationMs} ms`
    log(`[chaos ${rel(f.start)}] #${f.n} ${kind} ${sb.id} ${what}; ${f.recoveryTimedOut === true ? 'NOT reconnected within 20 s' : f.reconnected === true ? `reconnected ${rel(f.recovered)}` : 'connection survived'}`)
  } finally {
    sb.busy = false
  }
}

async function chaosLoop (): Promise<void> {
  if (FAULT_KINDS.length === 0) return
  const r = rng(`${SEED}/chaos`)
  const running: Array<Promise<void>> = []
  await sleep(Math.min(3000, Math.max(0, deadline - Date.now())))
  for (let i = 0; i < 100_000 && Date.now() < deadline && !aborted; i++) {
    const free = sandboxes.filter((s) => !s.busy)
    if (free.length > 0) {
      const sb = pick(r, free)
      const kinds = FAULT_KINDS.filter((k) => k !== 'wedge' || sb.sshdProxy !== undefined)
      if (kinds.length > 0) {
        // Only OpenSSH sandboxes can be wedged, and the keepalive bound is only exercised by a
        // wedge: give it a fair share there.
        const kind = kinds.includes('wedge') && r() < 0.4 ? 'wedge' : pick(r, kinds)
        const durationMs = kind === 'kill' ? 500 + Math.floor(r() * 2500) : kind === 'reset' ? 0 : 1000 + Math.floor(r() * 5000)
        running.push(runFault(sb, kind, durationMs))
      }
    }
    await sleep(Math.min(CHAOS_MIN_MS + r() * (CHAOS_MAX_MS - CHAOS_MIN_MS), Math.max(1, deadline - Date.now())))
  }
  await Promise.all(running)
}

// ---------------------------------------------------------------- one exec

function gatewayViewOf (plan: Plan, execId: string | undefined): string {
  const e = execId !== undefined ? g.gw.execs.get(execId) : g.gw.execs.list({ sandboxId: plan.sandbox }).find((x) => x.spec.command[2] === plan.script)
  if (e === undefined) return 'the gateway has no record of it'
  const j = e.toJSON()
  return `gateway record ${j.id}: status=${j.status} exitCode=${j.exitCode} error=${j.error === null ? 'null' : j.error.code} startedAt=${rel(j.startedAt === null ? undefined : Date.parse(j.startedAt))} endedAt=${rel(j.endedAt === null ? undefined : Date.parse(j.endedAt))} stdoutBytes=${j.stdoutBytes}/${plan.stdoutBytes} stderrBytes=${j.stderrBytes}/${plan.stderrBytes}; sandbox session ${sessionOf(plan.sandbox) === undefined ? 'absent' : 'present'}`
}

// What the stream of events says, checked against the plan.
function checkEvents (obs: Observation, events: any[]): { final: any, stdout: string, stderr: string } {
  const out: Record<'stdout' | 'stderr', string[]> = { stdout: [], stderr: [] }
  const bytes = { stdout: 0, stderr: 0 }
  let final: any
  for (const ev of events) {
    if (final !== undefined) { obs.problems.push(`event after the final event: ${JSON.stringify(ev).slice(0, 100)}`); break }
    if (ev.type === 'stdout' || ev.type === 'stderr') {
      const s = ev.type as 'stdout' | 'stderr'
      if (ev.offset !== bytes[s]) obs.problems.push(`${s} event at offset ${ev.offset}, expected ${bytes[s]}`)
      out[s].push(ev.data)
      bytes[s] += Buffer.byteLength(ev.data)
    } else if (ev.type === 'gap') {
      obs.problems.push(`gap event seen by an attached reader: ${JSON.stringify(ev)}`)
    } else if (ev.type === 'exit' || ev.type === 'error') {
      final = ev
    } else if (ev.type !== 'heartbeat') {
      obs.problems.push(`unexpected event ${JSON.stringify(ev).slice(0, 100)}`)
    }
  }
  return { final, stdout: out.stdout.join(''), stderr: out.stderr.join('') }
}

function judgeExit (obs: Observation, plan: Plan, r: { exitCode: unknown, signal: unknown, timedOut: unknown, stdout: string, stderr: string }): void {
  obs.outcome = 'exit'
  obs.exitCode = typeof r.exitCode === 'number' ? r.exitCode : null
  if (r.exitCode !== plan.exitCode) obs.problems.push(`exit code ${String(r.exitCode)} (signal ${String(r.signal)}), the script exits ${plan.exitCode}`)
  if (r.signal !== null) obs.problems.push(`signal ${String(r.signal)} on a command that exits normally`)
  if (r.timedOut !== false) obs.problems.push(`timedOut ${String(r.timedOut)} without timeoutSeconds`)
  if (r.stdout !== plan.stdout) obs.problems.push(`stdout: ${firstDiff(r.stdout, plan.stdout)}`)
  if (r.stderr !== plan.stderr) obs.problems.push(`stderr: ${firstDiff(r.stderr, plan.stderr)}`)
}

function judgeError (obs: Observation, plan: Plan, e: { code: unknown, status: unknown, detail: unknown }, stdout: string | undefined, stderr: string | undefined): void {
  obs.outcome = 'error'
  obs.code = String(e.code)
  obs.detail = String(e.detail ?? '')
  const want = codeStatus(obs.code)
  if (want === undefined) obs.problems.push(`error ${obs.code} (status ${String(e.status)}) is not an honest liveness outcome: ${obs.detail}`)
  else if (e.status !== want) obs.problems.push(`error ${obs.code} carries status ${String(e.status)}, the contract says ${want}`)
  if (stdout !== undefined && !isPrefixOf(stdout, plan.stdout)) obs.problems.push(`stdout of a failed exec is not a prefix of the expected: ${firstDiff(stdout, plan.stdout)}`)
  if (stderr !== undefined && !isPrefixOf(stderr, plan.stderr)) obs.problems.push(`stderr of a failed exec is not a prefix of the expected: ${firstDiff(stderr, plan.stderr)}`)
}

// A later GET must say the same, field for field (CONTRACT §3).
async function checkRecord (obs: Observation, plan: Plan): Promise<void> {
  if (obs.execId === undefined) return
  const r = await httpCall('GET', `/v1/execs/${obs.execId}`, undefined, 5000)
  if (!r.ok || r.status !== 200) { obs.problems.push(`GET /v1/execs/${obs.execId}: ${r.ok ? `HTTP ${r.status}` : r.error}`); return }
  const j = r.json
  if (j.startedAt !== null) obs.startedAt = Date.parse(j.startedAt)
  if (obs.outcome === 'exit') {
    if (j.status !== 'exited' || j.exitCode !== obs.exitCode || j.signal !== null) obs.problems.push(`GET says status=${j.status} exitCode=${j.exitCode} signal=${j.signal}, the answer said exit ${String(obs.exitCode)}`)
    if (j.stdoutBytes !== plan.stdoutBytes || j.stderrBytes !== plan.stderrBytes) obs.problems.push(`GET says ${j.stdoutBytes}/${j.stderrBytes} output bytes, the script prints ${plan.stdoutBytes}/${plan.stderrBytes}`)
  } else if (obs.outcome === 'error') {
    if (j.status !== 'failed' || j.exitCode !== null || j.error?.code !== obs.code) obs.problems.push(`GET says status=${j.status} exitCode=${j.exitCode} error=${j.error?.code}, the answer said error ${obs.code}`)
    if (j.stdoutBytes > plan.stdoutBytes || j.stderrBytes > plan.stderrBytes) obs.problems.push(`GET says ${j.stdoutBytes}/${j.stderrBytes} output bytes, more than the script prints (${plan.stdoutBytes}/${plan.stderrBytes})`)
  }
}

function markHung (obs: Observation, plan: Plan, what: string): void {
  obs.outcome = 'hung'
  obs.problems.push(`${what}: no answer within its bound of ${plan.boundMs} ms (planned ${plan.plannedMs} ms)`)
  obs.gatewayView = gatewayViewOf(plan, obs.execId)
}

async function runExec (plan: Plan): Promise<Observation> {
  const t0 = Date.now()
  const obs: Observation = {
    key: plan.key, sandbox: plan.sandbox, mode: plan.mode, script: plan.script, wantExit: plan.exitCode,
    sleepMs: plan.sleepMs, boundMs: plan.boundMs, t0, tEnd: t0, outcome: 'broken', problems: [], notes: []
  }
  const left = (): number => t0 + plan.boundMs - Date.now()
  const body = { command: ['sh', '-c', plan.script], env: { SOAK_RUN: RUN_ID } }
  try {
    if (plan.mode === 'wait') {
      const r = await httpCall('POST', `/v1/sandboxes/${plan.sandbox}/execs?wait=true`, body, left())
      obs.tEnd = Date.now()
      if (!r.ok) {
        if (r.timedOut) markHung(obs, plan, 'POST ?wait=true')
        else obs.problems.push(`POST ?wait=true ended without an answer: ${r.error}`)
        return obs
      }
      obs.httpStatus = r.status
      const b = r.json
      if (r.status === 200 && typeof b === 'object' && b !== null) {
        obs.execId = b.id
        judgeExit(obs, plan, b)
        if (b.stdoutTruncated !== false || b.stderrTruncated !== false) obs.problems.push('output marked truncated below the retention limit')
      } else if (typeof b === 'object' && b !== null && typeof b.code === 'string') {
        obs.execId = typeof b.execId === 'string' ? b.execId : undefined
        if (b.status !== r.status) obs.problems.push(`problem status ${b.status} on an HTTP ${r.status}`)
        let stdout: string | undefined
        let stderr: string | undefined
        if (obs.execId !== undefined) {
          // What a failed exec carries: its replayed output and the same final error.
          const replay = await readNdjson(obs.execId, 5000)
          const seen = checkEvents(obs, replay.events)
          if (replay.error !== undefined || replay.timedOut) obs.problems.push(`replay of the failed exec: ${replay.error ?? 'timed out'}`)
          else if (seen.final?.type !== 'error' || seen.final.code !== b.code) obs.problems.push(`replay ends with ${JSON.stringify(seen.final)}, the answer was ${b.code}`)
          stdout = seen.stdout
          stderr = seen.stderr
        } else if (b.code !== 'too_many_requests') {
          obs.problems.push(`problem ${b.code} without an execId`)
        }
        judgeError(obs, plan, b, stdout, stderr)
      } else {
        obs.problems.push(`unexpected HTTP ${r.status}: ${r.text.slice(0, 300)}`)
        return obs
      }
    } else {
      const r = await httpCall('POST', `/v1/sandboxes/${plan.sandbox}/execs`, body, Math.min(left(), 10_000))
      if (!r.ok) {
        obs.tEnd = Date.now()
        if (r.timedOut) markHung(obs, plan, 'POST (no wait)')
        else obs.problems.push(`POST ended without an answer: ${r.error}`)
        return obs
      }
      obs.httpStatus = r.status
      if (r.status !== 201) {
        obs.tEnd = Date.now()
        if (typeof r.json?.code === 'string') judgeError(obs, plan, r.json, undefined, undefined)
        else obs.problems.push(`POST → unexpected HTTP ${r.status}: ${r.text.slice(0, 300)}`)
        return obs
      }
      obs.execId = r.json.id
      const s = plan.mode === 'ws' ? await readWs(obs.execId!, left()) : await readNdjson(obs.execId!, left())
      obs.tEnd = Date.now()
      if (s.timedOut) { markHung(obs, plan, `${plan.mode} reader`); return obs }
      if (s.error !== undefined) obs.problems.push(`${plan.mode} reader: ${s.error}`)
      const seen = checkEvents(obs, s.events)
      if (seen.final === undefined) {
        obs.problems.push(`${plan.mode} stream ended without a final event (${s.events.length} events${s.closeCode === undefined ? '' : `, close code ${s.closeCode}`})`)
        return obs
      }
      if (seen.final.type === 'exit') {
        judgeExit(obs, plan, { ...seen.final, stdout: seen.stdout, stderr: seen.stderr })
        if (plan.mode === 'ws' && s.closeCode !== 1000) obs.problems.push(`WebSocket closed with ${s.closeCode} after exit, want 1000`)
      } else {
        judgeError(obs, plan, { code: seen.final.code, status: seen.final.status, detail: seen.final.message }, seen.stdout, seen.stderr)
        if (plan.mode === 'ws' && s.closeCode !== 1011) obs.problems.push(`WebSocket closed with ${s.closeCode} after error, want 1011`)
      }
    }
    await checkRecord(obs, plan)
  } catch (err) {
    obs.tEnd = Date.now()
    obs.problems.push(`soak client threw: ${String(err)}`)
  }
  return obs
}

async function agentLoop (agent: number): Promise<void> {
  const r = rng(`${SEED}/agent/${agent}`)
  const sandbox = sandboxes[agent % sandboxes.length]!.id
  await sleep(r() * 3000)
  for (let seq = 0; seq < MAX_EXECS_PER_AGENT && Date.now() < deadline && !aborted; seq++) {
    const obs = await runExec(makePlan(agent, seq, sandbox))
    // Keep a flat copy of the start only: a slice would be a V8 sliced string that keeps the
    // whole script (up to 25 KB) alive and inflate the leak check with the driver's own records.
    if (obs.script.length > 200) obs.script = [...obs.script.slice(0, 200)].join('')
    observations.push(obs)
    if (obs.outcome === 'hung' || obs.problems.length > 0) {
      log(`[soak ${rel(obs.tEnd)}] ${obs.outcome === 'hung' ? 'HUNG' : 'PROBLEM'} ${obs.key} ${obs.sandbox} ${obs.mode}: ${obs.problems.join('; ').slice(0, 400)}`)
    }
    await sleep(r() * 400)
  }
}

// ---------------------------------------------------------------- verdicts and the report

type Category = 'true' | '503' | 'honest' | 'hung' | 'wrong'
interface Verdict {
  obs: Observation
  category: Category
  kind: FaultKind | 'none'
  faults: Fault[]
  reasons: string[]
  survived: Fault | undefined
  detectMs: number | undefined
}

function faultsOf (obs: Observation): Fault[] {
  return faults.filter((f) => f.sandbox === obs.sandbox && f.start <= obs.tEnd && (f.recovered ?? Date.now()) + 1000 >= obs.t0)
}

function judge (obs: Observation): Verdict {
  const fs = faultsOf(obs)
  // The fault closest to the outcome: the latest one that began before the answer (faults are
  // in start order, and every overlapping fault began before the answer).
  const primary = fs[fs.length - 1]
  const v: Verdict = { obs, category: 'true', kind: primary?.kind ?? 'none', faults: fs, reasons: [...obs.problems], survived: undefined, detectMs: undefined }
  if (obs.outcome === 'hung') { v.category = 'hung'; return v }
  // The command cannot have ended before t0 + its sleeps; an exit status that needed a relay
  // that was killed or reset before then could not have been delivered.
  const minEnd = obs.t0 + obs.sleepMs
  const ranThrough = (f: Fault): boolean => obs.startedAt !== undefined && obs.startedAt < f.start - 100 && minEnd > f.start + 300
  if (obs.outcome === 'exit') {
    for (const f of fs) {
      if (!ranThrough(f)) continue
      if (f.kind === 'kill' || f.kind === 'reset') {
        v.reasons.push(`exit ${String(obs.exitCode)} reported although the relay was ${f.kind === 'kill' ? 'SIGKILLed' : 'reset'} at ${rel(f.start)} while the command was still sleeping (started ${rel(obs.startedAt)}, cannot end before ${rel(minEnd)})`)
      } else if (f.durationMs >= MUST_DETECT_MS[f.kind]) {
        v.survived = f
      }
    }
  }
  if (obs.outcome === 'error' && primary !== undefined && obs.startedAt !== undefined && obs.startedAt < primary.start) {
    v.detectMs = obs.tEnd - primary.start
  }
  if (v.reasons.length > 0 || obs.outcome === 'broken') v.category = 'wrong'
  else if (obs.outcome === 'exit') v.category = 'true'
  else v.category = HONEST_503.has(obs.code ?? '') ? '503' : 'honest'
  return v
}

function percentile (xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.floor(p * s.length))]!
}

function codeVersion (): string {
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

function describeVerdict (v: Verdict): string {
  const o = v.obs
  const fs = v.faults.map((f) => `${f.kind}#${f.n}@${rel(f.start)}${f.durationMs > 0 ? `/${f.durationMs}ms` : ''}`).join(',') || 'none'
  const script = JSON.stringify(o.script) + (o.script.length >= 200 ? '…' : '')
  return [
    `  ${o.key} ${o.sandbox} ${o.mode} execId=${o.execId ?? '?'} t0=${rel(o.t0)} end=${rel(o.tEnd)} started=${rel(o.startedAt)} bound=${o.boundMs}ms faults=${fs}`,
    `    answer: ${o.outcome}${o.httpStatus === undefined ? '' : ` HTTP ${o.httpStatus}`}${o.outcome === 'exit' ? ` exitCode=${String(o.exitCode)} (want ${o.wantExit})` : ''}${o.code === undefined ? '' : ` ${o.code}: ${o.detail}`}`,
    ...v.reasons.map((r) => `    why: ${r}`),
    ...(o.gatewayView === undefined ? [] : [`    ${o.gatewayView}`]),
    `    script: ${script}`
  ].join('\n')
}

// Heap in use after a full collection (gc is exposed at run time; without it, the plain number).
function heapAfterGcMb (): number {
  try {
    v8.setFlagsFromString('--expose-gc')
    const gc = vm.runInNewContext('gc') as () => void
    gc()
    gc()
  } catch { /* no gc: the number below includes garbage */ }
  return process.memoryUsage().heapUsed / 2 ** 20
}

function procRssMb (pid: number): string {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
    return m === null ? '?' : (Number(m[1]) / 1024).toFixed(0)
  } catch { return 'gone' }
}

// ---------------------------------------------------------------- the run

describe('soak', () => {
  afterAll(async () => { await cleanupAll() }, 120_000)

  it(`${AGENTS} agents × ${SANDBOXES} sandboxes for ${DURATION_S} s under chaos: true exit or honest error, never a hang`, async ({ task }) => {
    try {
      g = await startGateway(KNOBS)
      cleanups.push(async () => { await g.close() })
      publicUrl = g.publicUrl
      if (OPENSSH_SANDBOXES > 0) {
        sshd = await startOpenSshd({ authorizedKeys: [g.gw.identity.publicKey], logLevel: 'ERROR' })
        cleanups.push(async () => { await sshd!.close() })
      }
      for (let i = 0; i < SANDBOXES; i++) {
        const kind = i >= SANDBOXES - OPENSSH_SANDBOXES ? 'openssh' : 'embedded'
        const id = `soak-${kind === 'openssh' ? 'o' : 'e'}${i}`
        const supervisorUrl = new URL(g.supervisorUrl)
        const proxy = await startTcpProxy({ targetHost: supervisorUrl.hostname, targetPort: Number(supervisorUrl.port) })
        cleanups.push(async () => { await proxy.close() })
        let sshdProxy: TcpProxy | undefined
        if (kind === 'openssh') {
          const p = await startTcpProxy({ targetHost: sshd!.host, targetPort: sshd!.port })
          cleanups.push(async () => { await p.close() })
          sshdProxy = p
        }
        const partial = { id, kind, proxy, sshdProxy } as const
        sandboxes.push({ ...partial, sup: startSupervisor(partial), busy: false })
      }
      // Every supervisor ever started (restarts too) is stopped at the end, first of all.
      cleanups.push(async () => { await Promise.all(allSupervisors.map(async (s) => { await s.stop() })) })
      for (const sb of sandboxes) await g.waitConnected(sb.id, 30_000)

      log(`[soak] code ${codeVersion()}`)
      log(`[soak] seed=${SEED} run=${RUN_ID} duration=${DURATION_S}s agents=${AGENTS} sandboxes=${SANDBOXES} (openssh ${OPENSSH_SANDBOXES}) faults=${FAULT_KINDS.join(',') || 'none'} chaos every ${CHAOS_MIN_MS}-${CHAOS_MAX_MS} ms`)
      log(`[soak] bounds: keepalive ${KEEPALIVE_BOUND_MS} ms, ping ${PING_BOUND_MS} ms, session wait ${KNOBS.sessionWaitMs} ms, relay open ${KNOBS.relayOpenTimeoutMs} ms, ssh ready ${KNOBS.sshReadyTimeoutMs} ms → exec bound = planned + ${DETECTION_BOUND_MS} + close wait ${KNOBS.closeWaitMs} + slack ${SLACK_MS} ms`)

      runStart = Date.now()
      deadline = runStart + DURATION_S * 1000
      const warnings = new Map<string, number>()
      const onWarning = (w: Error): void => { const k = `${w.name}: ${w.message.slice(0, 120)}`; warnings.set(k, (warnings.get(k) ?? 0) + 1) }
      process.on('warning', onWarning)
      cleanups.push(async () => { process.off('warning', onWarning) })
      const rssStart = process.memoryUsage.rss()
      const heapStart = heapAfterGcMb()
      let rssPeak = rssStart
      const sampler = setInterval(() => { rssPeak = Math.max(rssPeak, process.memoryUsage.rss()) }, 1000)
      const progress = setInterval(() => {
        const n = observations.length
        const bad = observations.filter((o) => o.outcome === 'hung' || o.problems.length > 0).length
        log(`[soak ${rel(Date.now())}] execs done=${n} flagged=${bad} gw.running=${g.gw.execs.running} pendingRelays=${g.gw.registry.pendingCount()} faults=${faults.length} rss=${(process.memoryUsage.rss() / 2 ** 20).toFixed(0)}MB`)
      }, 10_000)
      try {
        await Promise.all([chaosLoop(), ...Array.from({ length: AGENTS }, async (_, i) => { await agentLoop(i) })])
      } finally {
        clearInterval(sampler)
        clearInterval(progress)
      }
      const tDrained = Date.now()

      // The gateway must be back to no running exec, no pending relay.
      for (let i = 0; i < 300 && (g.gw.execs.running > 0 || g.gw.registry.pendingCount() > 0); i++) await sleep(50)
      const leftRunning = g.gw.execs.running
      const leftPending = g.gw.registry.pendingCount()
      const leftActive = g.gw.registry.list().filter((s) => s.activeExecs !== 0).map((s) => `${s.id}:${s.activeExecs}`)
      const leftExecs = g.gw.execs.list({ status: 'running' }).concat(g.gw.execs.list({ status: 'pending' }))
      const rssEnd = process.memoryUsage.rss()
      const retainedAtEnd = g.gw.execs.size

      // Verdicts, per fault kind.
      const verdicts = observations.map(judge)
      const kinds: Array<FaultKind | 'none'> = ['none', ...ALL_FAULT_KINDS]
      const count = (vs: Verdict[], c: Category): number => vs.filter((v) => v.category === c).length
      const rowFor = (label: string, vs: Verdict[]): Array<string | number> => {
        const det = vs.map((v) => v.detectMs).filter((x): x is number => x !== undefined)
        return [label, vs.length, count(vs, 'true'), count(vs, '503'), count(vs, 'honest'), count(vs, 'hung'), count(vs, 'wrong'),
          vs.filter((v) => v.survived !== undefined).length, det.length === 0 ? '-' : `${percentile(det, 0.5)}/${Math.max(...det)}`]
      }
      const header = ['fault', 'execs', 'true exit', '503', '502/504/429', 'hung', 'wrong', 'survived', 'detect ms p50/max']
      const rows = kinds.map((k) => rowFor(k, verdicts.filter((v) => v.kind === k))).filter((r) => r[1] !== 0 || r[0] === 'none')
      rows.push(rowFor('TOTAL', verdicts))

      const faultRows = ALL_FAULT_KINDS.map((k) => {
        const fs = faults.filter((f) => f.kind === k)
        const rec = fs.filter((f) => f.recovered !== undefined && f.endAction !== undefined).map((f) => f.recovered! - f.endAction!)
        return [k, fs.length, fs.length === 0 ? '-' : Math.round(fs.reduce((a, f) => a + f.durationMs, 0) / fs.length), rec.length === 0 ? '-' : Math.max(...rec),
          fs.filter((f) => f.reconnected === true).length, fs.filter((f) => f.recoveryTimedOut === true).length]
      }).filter((r) => r[1] !== 0)

      const modeRows = (['wait', 'ws', 'ndjson'] as const).map((m) => rowFor(m, verdicts.filter((v) => v.obs.mode === m)).slice(0, 7))
      const codes = new Map<string, number>()
      for (const v of verdicts) if (v.obs.outcome === 'error') { const k = `${v.kind}:${v.obs.code}`; codes.set(k, (codes.get(k) ?? 0) + 1) }

      // Leak check: forget every finished exec (as the TTL sweeper would), collect, and compare the
      // heap with the one before the load. What remains is what the gateway (and the driver's
      // small per-exec records) kept.
      g.gw.execs.sweep(Date.now() + KNOBS.execTtlS * 1000 + 1000)
      const heapEnd = heapAfterGcMb()
      if (HEAP_SNAPSHOT_PATH !== '') v8.writeHeapSnapshot(HEAP_SNAPSHOT_PATH)
      const hung = count(verdicts, 'hung')
      const wrong = count(verdicts, 'wrong')
      const trueExits = count(verdicts, 'true')
      const passed = trueExits + count(verdicts, '503') + count(verdicts, 'honest')
      const unfaultedErrors = verdicts.filter((v) => v.kind === 'none' && (v.category === '503' || v.category === 'honest'))
      const failed = hung + wrong + leftRunning

      const out: string[] = []
      out.push('', `==================== soak summary (seed ${SEED}, ${DURATION_S} s, ${AGENTS} agents, ${SANDBOXES} sandboxes) ====================`)
      out.push(table(header, rows))
      out.push('', 'by reader:', table(['mode', 'execs', 'true exit', '503', '502/504/429', 'hung', 'wrong'], modeRows))
      out.push('', 'faults injected:', faultRows.length === 0 ? '  none' : table(['kind', 'count', 'mean dur ms', 'max recovery ms', 'reconnected', 'not recovered'], faultRows))
      out.push('', `error codes (fault:code=count): ${[...codes.entries()].sort().map(([k, n]) => `${k}=${n}`).join(' ') || 'none'}`)
      out.push(`in flight at the deadline drained in ${((tDrained - deadline) / 1000).toFixed(1)} s; output checked: ${(observations.length)} execs`)
      out.push(`gateway (in-process, with the soak driver) RSS: start ${(rssStart / 2 ** 20).toFixed(0)} MB, peak ${(rssPeak / 2 ** 20).toFixed(0)} MB, end ${(rssEnd / 2 ** 20).toFixed(0)} MB; execs retained ${retainedAtEnd} (TTL ${KNOBS.execTtlS} s)`)
      out.push(`heap after GC: before the load ${heapStart.toFixed(1)} MB, after the load with every finished exec swept ${heapEnd.toFixed(1)} MB (driver records: ${observations.length} execs); execs left after the sweep ${g.gw.execs.size}`)
      out.push(`supervisor RSS (MB): ${sandboxes.map((s) => `${s.id}=${procRssMb(s.sup.pid)}`).join(' ')}`)
      out.push(`process warnings in the gateway's process: ${warnings.size === 0 ? 'none' : [...warnings.entries()].map(([k, n]) => `${n}× ${k}`).join(' | ')}`)
      out.push(`gw.execs.running=${leftRunning} pendingRelays=${leftPending} sandboxes with activeExecs≠0: ${leftActive.join(' ') || 'none'}`)
      const show = (title: string, vs: Verdict[]): void => {
        if (vs.length === 0) return
        out.push('', `${title} (${vs.length}${vs.length > 25 ? ', first 25' : ''}):`)
        for (const v of vs.slice(0, 25)) out.push(describeVerdict(v))
      }
      show('HUNG', verdicts.filter((v) => v.category === 'hung'))
      show('WRONG', verdicts.filter((v) => v.category === 'wrong'))
      show('note: honest errors on a sandbox with no fault in the exec\'s lifetime', unfaultedErrors)
      show('note: exits through a fault longer than its detection bound (the gateway did not cut the relay)', verdicts.filter((v) => v.survived !== undefined))
      if (leftExecs.length > 0) {
        out.push('', 'execs the gateway still runs after the drain:')
        for (const e of leftExecs.slice(0, 25)) out.push(`  ${e.id} ${e.sandboxId} status=${e.status} created=${rel(e.createdAt.getTime())} started=${rel(e.startedAt?.getTime())} ${String(e.spec.command[2]).split('\n')[0]}`)
      }

      if (DUMP_PATH !== '') {
        writeFileSync(DUMP_PATH, JSON.stringify({
          seed: SEED, runStart, deadline, knobs: KNOBS, faults,
          execs: verdicts.map((v) => ({ ...v.obs, category: v.category, kind: v.kind, faults: v.faults.map((f) => f.n), reasons: v.reasons, detectMs: v.detectMs, survived: v.survived?.n }))
        }, null, 1))
        out.push(`every exec and fault written to ${DUMP_PATH}`)
      }
      const failures: string[] = []
      if (hung > 0) failures.push(`${hung} hung`)
      if (wrong > 0) failures.push(`${wrong} wrong`)
      if (trueExits < MIN_TRUE_EXITS) failures.push(`only ${trueExits} execs ended with their true exit (need ≥ ${MIN_TRUE_EXITS}: a soak that did nothing proves nothing)`)
      if (leftRunning !== 0) failures.push(`gw.execs.running is ${leftRunning} after the drain, not 0`)
      if (leftPending !== 0) failures.push(`${leftPending} relays still pending after the drain`)
      if (leftActive.length > 0) failures.push(`activeExecs not back to 0: ${leftActive.join(' ')}`)
      const line = `soak: ${passed} passed, ${failed} failed${failures.length === 0 ? '' : ` (${failures.join('; ')})`}`
      out.push('', line)
      log(out.join('\n'))
      task.meta.soakLine = line
      expect(failures).toEqual([])
    } finally {
      await cleanupAll()
    }
  }, (DURATION_S + 300) * 1000)
})
