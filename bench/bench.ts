// The benchmark behind `npm run bench` (vitest.bench.config.ts). Everything is measured in one
// run, side by side with a peer on the same machine and the same OpenSSH sshd:
//
//   1. exec round trip (`true`, ?wait=true) through gateway + supervisor processes to OpenSSH,
//      interleaved with a fresh OpenSSH client running `true`; also the embedded daemon, the
//      in-process `local` sandbox, and --ssh-pool false;
//   2. execs per second with 50 concurrent clients (embedded, OpenSSH, and fresh ssh clients);
//   3. stdout throughput of a 256 MiB random file to a WebSocket client (binary subprotocol and
//      base64 JSON), sha256-checked, against `ssh … cat file > /dev/null`;
//   4. gateway RSS per held silent exec and its CPU while 500 / 1,000 of them idle.
//
// It prints a markdown table and writes bench/RESULTS.md (machine, date, exact commands). Goals
// missed are reported, not failed: the run fails only when something is wrong (a bad exit code,
// a checksum mismatch, an exec that did not start). Knobs and how to read it: bench/README.md.
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { execFileSync, spawn, spawnSync } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { chmodSync, closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync, writeSync } from 'node:fs'
import http from 'node:http'
import os from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import WebSocket from 'ws'
import { startGatewayProcess, type GatewayProcess } from '../test/helpers/gateway-process.js'
import { startSupervisorProcess, type SupervisorProcess } from '../test/helpers/supervisor-process.js'
import { startOpenSshd, type OpenSshd } from '../test/helpers/openssh.js'
import { loadDataDir } from '../src/data-dir.js'
import { intEnv } from '../test/helpers/env.js'
import { requestJson, type JsonResponse } from '../test/helpers/http.js'

// ---------------------------------------------------------------- knobs


const PHASES = ['roundtrip', 'rate', 'throughput', 'hold'] as const
type Phase = typeof PHASES[number]
const ONLY: Set<Phase> = (() => {
  const raw = process.env.BENCH_ONLY
  if (raw === undefined || raw === '') return new Set(PHASES)
  const picked = raw.split(',').map((s) => s.trim()).filter((s) => s !== '')
  for (const p of picked) if (!(PHASES as readonly string[]).includes(p)) throw new Error(`BENCH_ONLY: unknown phase ${p} (use ${PHASES.join(',')})`)
  return new Set(picked as Phase[])
})()
const FULL_RUN = ONLY.size === PHASES.length

const RTT_N = intEnv('BENCH_RTT_N', 100, 5, 10_000)
const RTT_WARMUP = intEnv('BENCH_RTT_WARMUP', 10, 0, 1000)
const FILE_MIB = intEnv('BENCH_FILE_MIB', 256, 1, 4096)
const TPUT_REPS = intEnv('BENCH_TPUT_REPS', 3, 1, 20)
const HOLD_STEPS = (process.env.BENCH_HOLD ?? '500,1000').split(',').map((s) => Number(s.trim())).filter((n) => Number.isInteger(n) && n > 0).sort((a, b) => a - b)
const CPU_WINDOW_S = intEnv('BENCH_CPU_WINDOW_S', 10, 1, 600)
const RATE_S = intEnv('BENCH_RATE_S', 10, 1, 600)
const RATE_CLIENTS = intEnv('BENCH_RATE_CLIENTS', 50, 1, 1000)
// Passed to every gateway process (not supervisors) as NODE_OPTIONS. Node 20 refuses --cpu-prof
// there; use BENCH_PROFILE_DIR for profiles.
const GATEWAY_NODE_OPTIONS = process.env.BENCH_GATEWAY_NODE_OPTIONS ?? ''
// When set, gateways run with the inspector on a loopback port and each phase writes a CPU
// profile of the gateway under test (<phase>.cpuprofile, open it in Chrome DevTools) plus a
// summary (<phase>.top.txt); the held-execs phase also writes heap snapshots at 0, 500 and 1,000.
const PROFILE_DIR = process.env.BENCH_PROFILE_DIR ?? ''
// More `serve` flags for every gateway, e.g. "--log-level warn".
const GATEWAY_EXTRA_ARGS = (process.env.BENCH_GATEWAY_ARGS ?? '').split(' ').filter((s) => s !== '')
const RESULTS_PATH = process.env.BENCH_RESULTS ?? (FULL_RUN ? fileURLToPath(new URL('./RESULTS.md', import.meta.url)) : '')

const GOALS = {
  rttRatio: 0.10,
  embeddedMedianMs: 15,
  binaryThroughputRatio: 0.80,
  heldKiBPerExec: 64
}

const SSH = '/usr/bin/ssh'
const CURVE_KEX = 'curve25519-sha256'
const BINARY_SUBPROTOCOL = 'exec-gateway.v1.binary'
const HOLD_COMMAND = ['sleep', '600']
const EXEC_ID_ENV = 'EXEC_GATEWAY_EXEC_ID'

// ---------------------------------------------------------------- small utilities

const log = (msg: string): void => { process.stdout.write(`[bench] ${msg}\n`) }
const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))

function quantile (values: number[], q: number): number {
  if (values.length === 0) return NaN
  const s = [...values].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!
}
const median = (v: number[]): number => quantile(v, 0.5)
const ms = (v: number): string => v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)
const fixed = (v: number, d = 2): string => Number.isFinite(v) ? v.toFixed(d) : 'n/a'

// Runs fn(i) for i in 0..count-1 with at most `limit` in flight.
async function inParallel<T> (count: number, limit: number, fn: (i: number) => Promise<T>): Promise<T[]> {
  const out = new Array<T>(count)
  let next = 0
  const worker = async (): Promise<void> => {
    while (next < count) {
      const i = next++
      out[i] = await fn(i)
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, count) }, worker))
  return out
}

// Polls until pred() is true; throws after timeoutMs.
async function waitUntil (what: string, timeoutMs: number, pred: () => Promise<boolean> | boolean, intervalMs = 200): Promise<void> {
  const deadline = Date.now() + timeoutMs
  let lastErr: unknown
  while (Date.now() < deadline) {
    try { if (await pred()) return; lastErr = undefined } catch (err) { lastErr = err }
    await sleep(intervalMs)
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastErr === undefined ? '' : `: ${String(lastErr)}`}`)
}

// ---------------------------------------------------------------- /proc

const LOADAVG_AT_START = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')

// Interference check. Every ~2 s during a phase the bench reads every process's CPU
// (utime + stime + cutime + cstime, so short-lived children reaped by a long-lived parent count)
// and adds up what processes that are not its own used: its own are its descendants and its
// ancestors (vitest, npx), plus sshd session processes that their monitor left to init when the
// bench's ssh connections ended. PID 1 is left out too (it reaps those orphans).
interface ProcSample { ticks: number, comm: string, cmd: string }
class ForeignMeter {
  readonly #last = new Map<string, number>()
  readonly #used = new Map<string, { ticks: number, cmd: string }>()
  readonly #startWall = performance.now()
  readonly #startBootTicks = Number(readFileSync('/proc/uptime', 'utf8').split(' ')[0]) * CLK_TCK
  readonly #timer: NodeJS.Timeout
  #first = true

  constructor () {
    this.#sample()
    this.#first = false
    this.#timer = setInterval(() => this.#sample(), 2000)
    this.#timer.unref()
  }

  stop (): { cpuS: number, wallS: number, pct: number, top: string[] } {
    clearInterval(this.#timer)
    this.#sample()
    const wallS = (performance.now() - this.#startWall) / 1000
    let ticks = 0
    for (const u of this.#used.values()) ticks += u.ticks
    const byCmd = new Map<string, number>()
    for (const u of this.#used.values()) byCmd.set(u.cmd, (byCmd.get(u.cmd) ?? 0) + u.ticks)
    const top = [...byCmd.entries()].sort((a, b) => b[1] - a[1]).slice(0, 3).filter(([, t]) => t > 0).map(([c, t]) => `${(t / CLK_TCK).toFixed(1)} s ${c}`)
    return { cpuS: ticks / CLK_TCK, wallS, pct: ticks / CLK_TCK / (wallS * os.availableParallelism()) * 100, top }
  }

  #sample (): void {
    const procs = new Map<number, ProcSample & { ppid: number, start: number }>()
    for (const name of readdirSync('/proc')) {
      if (!/^\d+$/.test(name)) continue
      try {
        const stat = readFileSync(`/proc/${name}/stat`, 'utf8')
        const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
        procs.set(Number(name), {
          ticks: Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]),
          comm: stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')),
          cmd: '',
          ppid: Number(f[1]),
          start: Number(f[19])
        })
      } catch { /* gone */ }
    }
    const ours = new Set<number>([1, process.pid])
    for (let p = process.ppid; p > 1 && !ours.has(p); p = procs.get(p)?.ppid ?? 1) ours.add(p)
    const children = new Map<number, number[]>()
    for (const [pid, pr] of procs) { const l = children.get(pr.ppid) ?? []; l.push(pid); children.set(pr.ppid, l) }
    const walk = (p: number): void => { for (const c of children.get(p) ?? []) { ours.add(c); walk(c) } }
    walk(process.pid)
    for (const [pid, pr] of procs) {
      if (ours.has(pid) || (pr.ppid === 1 && pr.comm === 'sshd')) continue
      const key = `${pid}:${pr.start}`
      const last = this.#last.get(key) ?? (this.#first || pr.start < this.#startBootTicks ? undefined : 0)
      this.#last.set(key, pr.ticks)
      if (last === undefined) continue
      const prev = this.#used.get(key)
      let cmd = prev?.cmd
      if (cmd === undefined) {
        try { cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ').trim().slice(0, 80) } catch { cmd = '' }
        if (cmd === '') cmd = `[${pr.comm}]`
      }
      this.#used.set(key, { ticks: (prev?.ticks ?? 0) + Math.max(0, pr.ticks - last), cmd })
    }
  }
}

const interference = { cpuS: 0, capacityS: 0 }

const CLK_TCK = (() => { try { return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100 } catch { return 100 } })()

function rssKiB (pid: number): number {
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  if (m === null) throw new Error(`no VmRSS for pid ${pid}`)
  return Number(m[1])
}

// utime + stime in clock ticks.
function cpuTicks (pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  // fields[0] is field 3 (state); utime is field 14, stime field 15.
  return Number(fields[11]) + Number(fields[12])
}

// utime + stime + cutime + cstime (children already reaped) in clock ticks; 0 when gone.
function cpuTicksWithChildren (pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])
  } catch {
    return 0
  }
}

// Every live descendant of pid.
function descendants (pid: number): number[] {
  const parent = new Map<number, number>()
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    try {
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8')
      parent.set(Number(name), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]))
    } catch { /* gone */ }
  }
  const out: number[] = []
  const walk = (p: number): void => { for (const [c, pp] of parent) if (pp === p) { out.push(c); walk(c) } }
  walk(pid)
  return out
}

function cmdline (pid: number): string {
  try {
    const args = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((a) => a !== '')
    // Supervisor tokens are secrets of this run's gateways; they are not part of the recipe.
    return args.map((a, i) => args[i - 1] === '--token' ? '<token>' : /[^A-Za-z0-9_./:=,@%+-]/.test(a) ? `'${a.replaceAll("'", "'\\''")}'` : a).join(' ')
  } catch {
    return `(pid ${pid} gone)`
  }
}

// Processes that carry one of our exec ids in their environment (the gateway tags every exec).
function taggedProcesses (ids: Set<string>): number[] {
  const found: number[] = []
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    let env: string
    try { env = readFileSync(`/proc/${name}/environ`, 'latin1') } catch { continue }
    const at = env.indexOf(`${EXEC_ID_ENV}=`)
    if (at === -1) continue
    const end = env.indexOf('\0', at)
    const id = env.slice(at + EXEC_ID_ENV.length + 1, end === -1 ? undefined : end)
    if (ids.has(id)) found.push(Number(name))
  }
  return found
}

// The sshd listening on this port: its pid and config (for the recipe in RESULTS.md).
function findSshdConfig (port: number): { pid: number, command: string, config: string } | undefined {
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    // sshd rewrites its title: "sshd: /usr/sbin/sshd -D -e -f <config> [listener] 0 of 10-100 startups".
    let title: string
    try { title = readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0').join(' ') } catch { continue }
    if (!title.includes('sshd')) continue
    const path = / -f (\S+)/.exec(title)?.[1]
    if (path === undefined) continue
    let config: string
    try { config = readFileSync(path, 'utf8') } catch { continue }
    if (config.includes(`ListenAddress 127.0.0.1:${port}\n`)) return { pid: Number(name), command: `${title.replace(/^sshd: /, '').replace(/ \[listener\].*$/, '')}`, config }
  }
  return undefined
}

// ---------------------------------------------------------------- HTTP and WebSocket clients

const agent = new http.Agent({ keepAlive: true, maxSockets: 1024 })

async function httpJson (base: string, method: string, path: string, body?: unknown, timeoutMs = 120_000): Promise<JsonResponse> {
  return await requestJson(base + path, { method, body, agent, timeoutMs })
}

// One `true` through the gateway, ?wait=true; returns the round trip in ms.
async function gatewayTrue (base: string, sandboxId: string): Promise<number> {
  const t0 = performance.now()
  const r = await httpJson(base, 'POST', `/v1/sandboxes/${sandboxId}/execs?wait=true`, { command: ['true'] })
  const elapsed = performance.now() - t0
  if (r.status !== 200 || r.body?.exitCode !== 0) throw new Error(`exec true on ${sandboxId}: ${r.status} ${JSON.stringify(r.body).slice(0, 300)}`)
  return elapsed
}

async function waitConnected (base: string, sandboxId: string): Promise<void> {
  await waitUntil(`sandbox ${sandboxId} to connect`, 20_000, async () => {
    const r = await httpJson(base, 'GET', `/v1/sandboxes/${sandboxId}`)
    return r.status === 200 && r.body.status === 'connected'
  })
}

async function activeExecs (base: string): Promise<number> {
  const r = await httpJson(base, 'GET', '/metrics')
  const m = /^exec_gateway_active_execs (\d+)/m.exec(String(r.body))
  if (m === null) throw new Error('no exec_gateway_active_execs in /metrics')
  return Number(m[1])
}

// ms: start to end; streamMs: first output byte to end.
interface StreamRun { ms: number, streamMs: number, bytes: number, sha256: string, frames: number }

// Starts `cat file` as an interactive exec that waits for one stdin line, attaches a WebSocket,
// then lets it go: every byte is read by the attached reader (no retention, no gap). Times the
// whole thing from the POST to the close, as `ssh … cat` is timed from spawn to exit.
async function websocketCat (base: string, sandboxId: string, file: string, mode: 'binary' | 'base64'): Promise<StreamRun> {
  const t0 = performance.now()
  const created = await httpJson(base, 'POST', `/v1/sandboxes/${sandboxId}/execs`, {
    command: ['sh', '-c', 'read _ && exec cat "$1"', 'sh', file],
    interactive: true
  })
  if (created.status !== 201) throw new Error(`start cat: ${created.status} ${JSON.stringify(created.body)}`)
  const id = created.body.id as string
  return await new Promise<StreamRun>((resolve, reject) => {
    const url = `${base.replace(/^http/, 'ws')}/v1/execs/${id}/stream${mode === 'base64' ? '?encoding=base64' : ''}`
    const ws = new WebSocket(url, mode === 'binary' ? [BINARY_SUBPROTOCOL] : [])
    const hash = createHash('sha256')
    let bytes = 0
    let frames = 0
    let firstByte: number | undefined
    let exit: any
    const problems: string[] = []
    const timer = setTimeout(() => { ws.terminate(); reject(new Error(`${mode} stream of ${file} did not end within 300 s`)) }, 300_000)
    ws.on('open', () => {
      if (mode === 'binary' && ws.protocol !== BINARY_SUBPROTOCOL) problems.push(`server selected subprotocol ${JSON.stringify(ws.protocol)}`)
      ws.send(JSON.stringify({ type: 'stdin', data: 'go\n' }))
      ws.send(JSON.stringify({ type: 'eof' }))
    })
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      frames++
      firstByte ??= performance.now()
      if (isBinary) {
        if (data[0] === 1) { hash.update(data.subarray(1)); bytes += data.length - 1 } else problems.push(`binary frame on channel ${data[0]}`)
        return
      }
      const ev = JSON.parse(data.toString('utf8'))
      if (ev.type === 'stdout') {
        if (ev.offset !== bytes) problems.push(`stdout offset ${ev.offset}, expected ${bytes}`)
        const b = Buffer.from(ev.data, 'base64')
        hash.update(b)
        bytes += b.length
      } else if (ev.type === 'exit') {
        exit = ev
      } else if (ev.type !== 'heartbeat') {
        problems.push(JSON.stringify(ev).slice(0, 300))
      }
    })
    ws.on('unexpected-response', (_req, res) => { clearTimeout(timer); reject(new Error(`websocket refused: ${res.statusCode}`)) })
    ws.on('error', (err) => { clearTimeout(timer); reject(err) })
    ws.on('close', (code) => {
      clearTimeout(timer)
      const elapsed = performance.now() - t0
      if (code !== 1000) problems.push(`close code ${code}`)
      if (exit?.exitCode !== 0) problems.push(`exit ${JSON.stringify(exit)}`)
      if (problems.length > 0) { reject(new Error(`${mode} stream: ${problems.slice(0, 5).join('; ')}`)); return }
      resolve({ ms: elapsed, streamMs: performance.now() - (firstByte ?? t0), bytes, sha256: hash.digest('hex'), frames })
    })
  })
}

// ---------------------------------------------------------------- OpenSSH client

interface SshRun { ms: number, code: number | null, stderr: string }

async function runSsh (args: string[], stdoutFd: number | 'ignore' = 'ignore', timeoutMs = 300_000): Promise<SshRun> {
  const t0 = performance.now()
  const child = spawn(SSH, args, { stdio: ['ignore', stdoutFd, 'pipe'] })
  let stderr = ''
  child.stderr!.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-4000) })
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
  return await new Promise((resolve, reject) => {
    child.once('error', (err) => { clearTimeout(timer); reject(err) })
    child.once('exit', (code) => { clearTimeout(timer); resolve({ ms: performance.now() - t0, code, stderr }) })
  })
}

// `ssh … cat file` into this process, hashed like the WebSocket client does.
async function sshCatPiped (args: string[]): Promise<StreamRun> {
  const t0 = performance.now()
  const child = spawn(SSH, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  const hash = createHash('sha256')
  let bytes = 0
  let frames = 0
  let firstByte: number | undefined
  let stderr = ''
  child.stdout!.on('data', (c: Buffer) => { firstByte ??= performance.now(); frames++; bytes += c.length; hash.update(c) })
  child.stderr!.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-4000) })
  const timer = setTimeout(() => child.kill('SIGKILL'), 300_000)
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject)
    child.once('close', (c) => resolve(c))
  }).finally(() => clearTimeout(timer))
  const end = performance.now()
  if (code !== 0) throw new Error(`ssh cat exited ${code}: ${stderr}`)
  return { ms: end - t0, streamMs: end - (firstByte ?? t0), bytes, sha256: hash.digest('hex'), frames }
}

// ---------------------------------------------------------------- profiling (BENCH_PROFILE_DIR)

// A Chrome DevTools Protocol client on a gateway started with --inspect=127.0.0.1:0.
class Inspector {
  readonly #ws: WebSocket
  #nextId = 1
  readonly #pending = new Map<number, { resolve: (v: any) => void, reject: (e: Error) => void }>()
  readonly #listeners = new Map<string, (params: any) => void>()

  private constructor (ws: WebSocket) {
    this.#ws = ws
    ws.on('message', (data: Buffer) => {
      const msg = JSON.parse(data.toString('utf8'))
      if (typeof msg.id === 'number') {
        const p = this.#pending.get(msg.id)
        this.#pending.delete(msg.id)
        if (msg.error !== undefined) p?.reject(new Error(`${JSON.stringify(msg.error)}`))
        else p?.resolve(msg.result)
      } else if (typeof msg.method === 'string') {
        this.#listeners.get(msg.method)?.(msg.params)
      }
    })
  }

  static async attach (gw: GatewayProcess): Promise<Inspector> {
    let url: string | undefined
    await waitUntil('the gateway inspector URL', 10_000, () => {
      url = /Debugger listening on (ws:\/\/127\.0\.0\.1:\d+\/[0-9a-f-]+)/.exec(gw.output())?.[1]
      return url !== undefined
    }, 50)
    const ws = new WebSocket(url!)
    await new Promise<void>((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject) })
    ws.on('error', () => {})
    return new Inspector(ws)
  }

  async send (method: string, params: Record<string, unknown> = {}): Promise<any> {
    const id = this.#nextId++
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => { this.#pending.delete(id); reject(new Error(`inspector ${method} timed out`)) }, 120_000)
      this.#pending.set(id, { resolve: (v) => { clearTimeout(timer); resolve(v) }, reject: (e) => { clearTimeout(timer); reject(e) } })
      this.#ws.send(JSON.stringify({ id, method, params }))
    })
  }

  async cpuProfile<T> (name: string, fn: () => Promise<T>): Promise<T> {
    await this.send('Profiler.enable')
    await this.send('Profiler.setSamplingInterval', { interval: 200 })
    await this.send('Profiler.start')
    try {
      return await fn()
    } finally {
      const { profile } = await this.send('Profiler.stop')
      writeFileSync(join(PROFILE_DIR, `${name}.cpuprofile`), JSON.stringify(profile))
      const summary = summarizeProfile(profile)
      writeFileSync(join(PROFILE_DIR, `${name}.top.txt`), summary)
      log(`profile ${name}: ${join(PROFILE_DIR, `${name}.cpuprofile`)}\n${summary.split('\n').slice(0, 30).join('\n')}`)
    }
  }

  async heapSnapshot (name: string): Promise<void> {
    const chunks: string[] = []
    this.#listeners.set('HeapProfiler.addHeapSnapshotChunk', (p: { chunk: string }) => chunks.push(p.chunk))
    await this.send('HeapProfiler.enable')
    await this.send('HeapProfiler.takeHeapSnapshot', { reportProgress: false })
    this.#listeners.delete('HeapProfiler.addHeapSnapshotChunk')
    const path = join(PROFILE_DIR, `${name}.heapsnapshot`)
    writeFileSync(path, chunks.join(''))
    log(`heap snapshot ${name}: ${path}`)
  }

  close (): void { this.#ws.close() }
}

interface ProfileNode { id: number, callFrame: { functionName: string, url: string, lineNumber: number }, children?: number[] }

// Self time by function and by module, from a .cpuprofile.
function summarizeProfile (profile: { nodes: ProfileNode[], samples: number[], timeDeltas: number[] }): string {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]))
  const selfUs = new Map<number, number>()
  profile.samples.forEach((id, i) => selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0)))
  const byFn = new Map<string, number>()
  const byModule = new Map<string, number>()
  let total = 0
  let idle = 0
  for (const [id, us] of selfUs) {
    const f = byId.get(id)!.callFrame
    if (f.functionName === '(idle)') { idle += us; continue }
    total += us
    const where = f.url.replace(/^file:\/\//, '').replace(/^.*\/node_modules\//, 'node_modules/').replace(/^.*\/dist\//, 'dist/')
    const fn = `${f.functionName || '(anonymous)'} ${where}:${f.lineNumber + 1}`
    byFn.set(fn, (byFn.get(fn) ?? 0) + us)
    const mod = where === '' ? f.functionName : where.startsWith('node_modules/') ? where.split('/').slice(0, where.startsWith('node_modules/@') ? 3 : 2).join('/') : where.startsWith('node:') ? where : where.startsWith('dist/') ? where : where
    byModule.set(mod, (byModule.get(mod) ?? 0) + us)
  }
  const top = (m: Map<string, number>, n: number): string[] => [...m.entries()].sort((a, b) => b[1] - a[1]).slice(0, n).map(([k, us]) => `  ${(us / 1000).toFixed(0).padStart(7)} ms ${(us / total * 100).toFixed(1).padStart(5)} %  ${k}`)
  return [
    `busy ${(total / 1000).toFixed(0)} ms, idle ${(idle / 1000).toFixed(0)} ms`,
    'self time by module:', ...top(byModule, 25),
    'self time by function:', ...top(byFn, 40), ''
  ].join('\n')
}

const inspectors = new Map<GatewayProcess, Inspector>()

// Runs fn under a CPU profile of gw when BENCH_PROFILE_DIR is set.
async function profiled<T> (gw: GatewayProcess, name: string, fn: () => Promise<T>): Promise<T> {
  if (PROFILE_DIR === '') return await fn()
  let insp = inspectors.get(gw)
  if (insp === undefined) { insp = await Inspector.attach(gw); inspectors.set(gw, insp) }
  return await insp.cpuProfile(name, fn)
}

// ---------------------------------------------------------------- results

interface Row { what: string, gateway: string, peer: string, ratio: string, goal: string, met?: boolean | undefined }

const rows: Row[] = []
const notes: string[] = []
const commands: string[] = []
const failures: string[] = []
let sshdConfigText = ''

function verdict (met: boolean | undefined): string {
  return met === undefined ? '' : met ? '✅ met' : '❌ missed'
}

function table (): string {
  const lines = [
    '| measurement | gateway | peer | ratio / value | goal | |',
    '|---|---|---|---|---|---|',
    ...rows.map((r) => `| ${r.what} | ${r.gateway} | ${r.peer} | ${r.ratio} | ${r.goal} | ${verdict(r.met)} |`)
  ]
  return lines.join('\n')
}

function machine (): string[] {
  const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8')
  const model = /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1] ?? 'unknown'
  const memKiB = Number(/^MemTotal:\s+(\d+)/m.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0)
  const sshV = spawnSync(SSH, ['-V'], { encoding: 'utf8' })
  const sshdPkg = spawnSync('dpkg-query', ['-W', '-f', '${Version}', 'openssh-server'], { encoding: 'utf8' })
  const nproc = (() => { try { return execFileSync('nproc', { encoding: 'utf8' }).trim() } catch { return String(os.availableParallelism()) } })()
  return [
    `- nproc: ${nproc}`,
    `- memory: ${(memKiB / 1024 / 1024).toFixed(1)} GiB (MemTotal ${memKiB} kB)`,
    `- CPU: ${model}`,
    `- kernel: ${os.release()}`,
    `- node: ${process.version}`,
    `- OpenSSH client: ${(sshV.stderr || sshV.stdout).trim()} (${SSH})`,
    `- OpenSSH server: ${sshdPkg.status === 0 ? `openssh-server ${sshdPkg.stdout.trim()}` : 'sshd (version unknown)'}`,
    `- load average (1/5/15 min) when the run started: ${LOADAVG_AT_START} (trailing averages, so they include the \`npm run build\` just before; anything else using the CPU during the run skews every figure)`
  ]
}

// ---------------------------------------------------------------- the run

interface Env {
  tmp: string
  clientKey: string
  sshd: OpenSshd
  // Gateway A: default flags (pool on), the in-process `local` sandbox, a supervisor to OpenSSH
  // ("ossh") and one with the embedded daemon ("emb").
  gwA: GatewayProcess
  // Gateway B: --ssh-pool false, the same two kinds of supervisor.
  gwB: GatewayProcess
  supervisors: SupervisorProcess[]
  sshdPid: number | undefined
  file: string
  fileSha256: string
  fileBytes: number
}

const ALL_EXEC_IDS = new Set<string>()
const startedGateways: GatewayProcess[] = []
const startedSupervisors: SupervisorProcess[] = []
let env: Env | undefined
let sshdStarted: OpenSshd | undefined
let tmpDir: string | undefined

function gatewayEnv (inspect: boolean): Record<string, string> {
  const opts = [process.env.NODE_OPTIONS ?? '', GATEWAY_NODE_OPTIONS, PROFILE_DIR === '' && !inspect ? '' : '--inspect=127.0.0.1:0'].filter((o) => o !== '').join(' ')
  return opts === '' ? {} : { NODE_OPTIONS: opts }
}

async function gateway (extraArgs: string[], localSandbox: boolean, inspect = false): Promise<GatewayProcess> {
  // The bench measures throughput (hundreds of execs/s, 1,000 held at once): exec rate limit off.
  const gw = await startGatewayProcess({ localSandbox, extraArgs: ['--exec-rate-limit-per-minute', '0', ...extraArgs, ...GATEWAY_EXTRA_ARGS], env: gatewayEnv(inspect), shutdownGraceMs: 2000 })
  startedGateways.push(gw)
  return gw
}

function supervisor (gw: GatewayProcess, sandboxId: string, sshd?: OpenSshd): SupervisorProcess {
  const sup = startSupervisorProcess({
    gatewayUrl: gw.supervisorUrl,
    sandboxId,
    token: gw.token(sandboxId),
    ...(sshd === undefined ? {} : { sshTarget: `${sshd.host}:${sshd.port}`, sshUser: sshd.user })
  })
  startedSupervisors.push(sup)
  return sup
}

function sshArgs (e: Env, remote: string[], options: string[] = []): string[] {
  return ['-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', ...options, '-i', e.clientKey, '-p', String(e.sshd.port), `${e.sshd.user}@127.0.0.1`, ...remote]
}

function sshCommandLine (e: Env, remote: string, options = ''): string {
  return `${SSH} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null ${options === '' ? '' : `${options} `}-i ${e.clientKey} -p ${e.sshd.port} ${e.sshd.user}@127.0.0.1 ${remote}`
}

async function makeRandomFile (path: string, mib: number): Promise<{ sha256: string, bytes: number }> {
  const fd = openSync(path, 'w', 0o644)
  const hash = createHash('sha256')
  try {
    for (let i = 0; i < mib; i += 16) {
      const chunk = randomBytes(Math.min(16, mib - i) * 1024 * 1024)
      hash.update(chunk)
      writeSync(fd, chunk)
    }
  } finally {
    closeSync(fd)
  }
  chmodSync(path, 0o644)
  return { sha256: hash.digest('hex'), bytes: mib * 1024 * 1024 }
}

describe('exec-gateway benchmark', () => {
  beforeAll(async () => {
    try {
      await setup()
    } catch (err) {
      failures.push(`setup: ${String(err).slice(0, 2000)}`)
      throw err
    }
  })

  async function setup (): Promise<void> {
    const started = Date.now()
    tmpDir = mkdtempSync(join(os.tmpdir(), 'egw-bench-'))
    // The sandbox account (not root) reads the random file.
    chmodSync(tmpDir, 0o755)
    const tmp = tmpDir
    const clientKey = join(tmp, 'client_ed25519')
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'exec-gateway-bench', '-f', clientKey])

    const needOpenSsh = ONLY.has('roundtrip') || ONLY.has('rate') || ONLY.has('throughput')
    const gwA = await gateway([], true)
    const gwB = await gateway(['--ssh-pool=false'], false)
    const keys = [readFileSync(`${clientKey}.pub`, 'utf8').trim(), loadDataDir(gwA.dataDir).publicKey, loadDataDir(gwB.dataDir).publicKey]
    const sshd = await startOpenSshd({ authorizedKeys: keys, logLevel: 'ERROR' })
    sshdStarted = sshd
    const supervisors = needOpenSsh
      ? [supervisor(gwA, 'ossh', sshd), supervisor(gwA, 'emb'), supervisor(gwB, 'ossh', sshd), supervisor(gwB, 'emb')]
      : []
    let file = ''
    let fileSha256 = ''
    let fileBytes = 0
    if (ONLY.has('throughput')) {
      file = join(tmp, `random-${FILE_MIB}MiB.bin`)
      const made = await makeRandomFile(file, FILE_MIB)
      fileSha256 = made.sha256
      fileBytes = made.bytes
    }
    if (needOpenSsh) {
      await Promise.all([waitConnected(gwA.publicUrl, 'ossh'), waitConnected(gwA.publicUrl, 'emb'), waitConnected(gwB.publicUrl, 'ossh'), waitConnected(gwB.publicUrl, 'emb')])
    }
    const sshdInfo = findSshdConfig(sshd.port)
    env = { tmp, clientKey, sshd, gwA, gwB, supervisors, sshdPid: sshdInfo?.pid, file, fileSha256, fileBytes }

    commands.push(
      `- gateway A (default flags, pool on): \`${cmdline(gwA.pid)}\``,
      `- gateway B (one SSH connection per exec): \`${cmdline(gwB.pid)}\``,
      ...supervisors.map((s) => `- supervisor: \`${cmdline(s.pid)}\``),
      `- sshd (test/helpers/openssh.ts, logging in as \`${sshd.user}\`): \`${sshdInfo?.command ?? `sshd on 127.0.0.1:${sshd.port}`}\``,
      `- OpenSSH client baseline: \`${sshCommandLine(env, 'true')}\``,
      `- OpenSSH client baseline with the gateway's key exchange: \`${sshCommandLine(env, 'true', `-o KexAlgorithms=${CURVE_KEX}`)}\``,
      `- throughput baseline: \`${sshCommandLine(env, file === '' ? '<file>' : `cat ${file}`)} > /dev/null\``
    )
    if (sshdInfo !== undefined) sshdConfigText = sshdInfo.config.trim()
    if (GATEWAY_NODE_OPTIONS !== '') notes.push(`gateways ran with NODE_OPTIONS=${GATEWAY_NODE_OPTIONS}`)
    if (PROFILE_DIR !== '') {
      mkdirSync(PROFILE_DIR, { recursive: true })
      notes.push(`**profiled run** (BENCH_PROFILE_DIR=${PROFILE_DIR}): gateways ran with the inspector and a sampling profiler during each phase; the figures are slower than an unprofiled run`)
    }
    if (GATEWAY_EXTRA_ARGS.length > 0) notes.push(`gateways ran with extra flags: ${GATEWAY_EXTRA_ARGS.join(' ')}`)
    log(`setup done in ${((Date.now() - started) / 1000).toFixed(1)} s (sshd port ${sshd.port}, user ${sshd.user})`)
  }

  // Per phase: CPU used outside the bench while it ran (see ForeignMeter).
  let meter: ForeignMeter | undefined
  beforeEach(() => { meter = new ForeignMeter() })
  afterEach((ctx) => {
    if (meter === undefined) return
    const f = meter.stop()
    meter = undefined
    interference.cpuS += f.cpuS
    interference.capacityS += f.wallS * os.availableParallelism()
    const line = `CPU used outside the bench during "${ctx.task.name}": ${f.cpuS.toFixed(1)} CPU-s (${f.pct.toFixed(1)} % of the machine)${f.pct > 5 ? ` — **WARNING: these figures are skewed**; top: ${f.top.join('; ')}` : ''}`
    log(line)
    notes.push(line)
  })

  afterAll(async () => {
    for (const insp of inspectors.values()) insp.close()
    // Stop in order: the gateways (which close their SSH connections), then supervisors, sshd.
    await Promise.allSettled(startedGateways.map(async (g) => await g.stop()))
    await Promise.allSettled(startedSupervisors.map(async (s) => await s.stop()))
    await sshdStarted?.close()
    agent.destroy()
    // The embedded daemon leaves a command running when its client goes away (as sshd does):
    // anything of ours still alive is killed by pid.
    const left = taggedProcesses(ALL_EXEC_IDS)
    for (const pid of left) { try { process.kill(pid, 'SIGKILL') } catch { /* gone */ } }
    if (left.length > 0) log(`killed ${left.length} exec processes that outlived the run`)
    if (tmpDir !== undefined) rmSync(tmpDir, { recursive: true, force: true })

    const pct = interference.capacityS === 0 ? 0 : interference.cpuS / interference.capacityS * 100
    const interferenceLine = `CPU used by processes outside the bench during the measurements: ${interference.cpuS.toFixed(1)} CPU-s of ${interference.capacityS.toFixed(0)} available (${pct.toFixed(1)} %; per phase in the notes)`
    const out = table()
    process.stdout.write(`\n${out}\n\n${pct > 5 ? 'WARNING: ' : ''}${interferenceLine}\n\n`)
    if (failures.length > 0) process.stdout.write(`failures:\n${failures.map((f) => `- ${f}`).join('\n')}\n\n`)
    if (RESULTS_PATH !== '') {
      const doc = [
        '# exec-gateway benchmark results',
        '',
        'Generated by `npm run bench` (bench/bench.ts); do not edit by hand. How to read it: bench/README.md.',
        '',
        `Date: ${new Date().toISOString()}`,
        '',
        '## Machine',
        '',
        ...machine(),
        `- ${pct > 5 ? '**warning: something else was using the CPU** — ' : ''}${interferenceLine}`,
        '',
        '## Results',
        '',
        out,
        '',
        ...(failures.length > 0 ? ['## Failures', '', ...failures.map((f) => `- ${f}`), ''] : []),
        '## Commands',
        '',
        ...commands,
        '',
        '## Notes',
        '',
        ...notes.map((n) => `- ${n}`),
        '',
        ...(sshdConfigText === '' ? [] : ['## sshd_config of the run', '', '```', sshdConfigText, '```', ''])
      ].join('\n')
      writeFileSync(RESULTS_PATH, doc)
      log(`wrote ${RESULTS_PATH}`)
    }
  })

  it.runIf(ONLY.has('roundtrip'))('exec round trip: gateway vs a fresh OpenSSH client, interleaved', async () => {
    const e = env!
    type Kind = 'gwOssh' | 'ssh' | 'gwOsshNoPool' | 'sshCurve' | 'gwEmb' | 'gwEmbNoPool' | 'gwLocal'
    const runners: Record<Kind, () => Promise<number>> = {
      gwOssh: async () => await gatewayTrue(e.gwA.publicUrl, 'ossh'),
      ssh: async () => {
        const r = await runSsh(sshArgs(e, ['true']), 'ignore', 30_000)
        if (r.code !== 0) throw new Error(`ssh true exited ${r.code}: ${r.stderr}`)
        return r.ms
      },
      gwOsshNoPool: async () => await gatewayTrue(e.gwB.publicUrl, 'ossh'),
      // The same client with the key exchange the gateway's ssh2 uses: OpenSSH 9's default
      // sntrup761x25519 alone costs the client and sshd ~90 ms of CPU here.
      sshCurve: async () => {
        const r = await runSsh(sshArgs(e, ['true'], ['-o', `KexAlgorithms=${CURVE_KEX}`]), 'ignore', 30_000)
        if (r.code !== 0) throw new Error(`ssh (curve25519) true exited ${r.code}: ${r.stderr}`)
        return r.ms
      },
      gwEmb: async () => await gatewayTrue(e.gwA.publicUrl, 'emb'),
      gwEmbNoPool: async () => await gatewayTrue(e.gwB.publicUrl, 'emb'),
      gwLocal: async () => await gatewayTrue(e.gwA.publicUrl, 'local')
    }
    const kinds = Object.keys(runners) as Kind[]
    const samples = Object.fromEntries(kinds.map((k) => [k, [] as number[]])) as Record<Kind, number[]>
    // A failed exec is counted and reported, not timed; the run goes on so the table is whole.
    const failed = Object.fromEntries(kinds.map((k) => [k, [] as string[]])) as Record<Kind, string[]>
    const attempt = async (k: Kind, into?: number[]): Promise<void> => {
      try {
        const t = await runners[k]()
        into?.push(t)
      } catch (err) {
        failed[k].push(String(err).slice(0, 300))
      }
    }
    for (let i = 0; i < RTT_WARMUP; i++) for (const k of kinds) await attempt(k)
    const t0 = Date.now()
    await profiled(e.gwA, 'roundtrip', async () => {
      for (let i = 0; i < RTT_N; i++) {
        // One of each per round, gateway and ssh alternating, so drift hits all of them alike.
        for (const k of kinds) await attempt(k, samples[k])
      }
    })
    log(`round trips: ${RTT_N} × ${kinds.length} in ${((Date.now() - t0) / 1000).toFixed(1)} s`)
    const med = (k: Kind): number => median(samples[k])
    const p90 = (k: Kind): number => quantile(samples[k], 0.9)
    const desc = (k: Kind): string => `median ${ms(med(k))} ms, p90 ${ms(p90(k))} ms${failed[k].length > 0 ? `, **${failed[k].length} of ${RTT_N + RTT_WARMUP} failed**` : ''}`
    const sshDesc = `fresh \`ssh … true\`: ${desc('ssh')}`
    const ratio = med('gwOssh') / med('ssh')
    rows.push({
      what: `exec round trip \`true\` (?wait=true, n=${RTT_N}), gateway → supervisor → OpenSSH, pooled (default)`,
      gateway: desc('gwOssh'),
      peer: sshDesc,
      ratio: `${fixed(ratio, 3)} (p90 ${fixed(p90('gwOssh') / p90('ssh'), 3)})`,
      goal: `≤ ${GOALS.rttRatio.toFixed(2)}`,
      met: ratio <= GOALS.rttRatio
    })
    const curveDesc = `fresh \`ssh -o KexAlgorithms=${CURVE_KEX} … true\`: ${desc('sshCurve')}`
    rows.push({
      what: `the same, against an OpenSSH client with the gateway's key exchange (${CURVE_KEX})`,
      gateway: desc('gwOssh'),
      peer: curveDesc,
      ratio: `${fixed(med('gwOssh') / med('sshCurve'), 3)} (p90 ${fixed(p90('gwOssh') / p90('sshCurve'), 3)})`,
      goal: '—'
    })
    rows.push({
      what: 'the same with `--ssh-pool false` (one SSH connection per exec)',
      gateway: desc('gwOsshNoPool'),
      peer: `${sshDesc}; ${curveDesc}`,
      ratio: `${fixed(med('gwOsshNoPool') / med('ssh'), 3)}; ${fixed(med('gwOsshNoPool') / med('sshCurve'), 3)}`,
      goal: '—'
    })
    rows.push({
      what: 'exec round trip, embedded daemon via a supervisor process, pooled',
      gateway: desc('gwEmb'),
      peer: '—',
      ratio: `${ms(med('gwEmb'))} ms`,
      goal: `≤ ${GOALS.embeddedMedianMs} ms`,
      met: med('gwEmb') <= GOALS.embeddedMedianMs
    })
    rows.push({ what: 'exec round trip, embedded `local` sandbox (in the gateway process), pooled', gateway: desc('gwLocal'), peer: '—', ratio: `${ms(med('gwLocal'))} ms`, goal: '—' })
    rows.push({ what: 'exec round trip, embedded daemon via a supervisor process, `--ssh-pool false`', gateway: desc('gwEmbNoPool'), peer: '—', ratio: `${ms(med('gwEmbNoPool'))} ms`, goal: '—' })
    for (const k of kinds) {
      if (failed[k].length > 0) failures.push(`round trip ${k}: ${failed[k].length} of ${RTT_N + RTT_WARMUP} failed, e.g. ${failed[k][0]}`)
    }
    expect(kinds.filter((k) => failed[k].length > 0), 'kinds of round trip with failed execs').toEqual([])
  })

  it.runIf(ONLY.has('rate'))(`execs per second, \`true\`, ${RATE_CLIENTS} concurrent clients for ${RATE_S} s`, async () => {
    const e = env!
    // CPU of each process during the run, as % of one core: where a rate limit comes from.
    const sum = (pids: number[]): number => pids.reduce((a, p) => a + cpuTicksWithChildren(p), 0)
    const sshdTree = (): number[] => e.sshdPid === undefined ? [] : [e.sshdPid, ...descendants(e.sshdPid)]
    const run = async (label: string, one: () => Promise<void>, procs: Record<string, () => number[]> = {}): Promise<{ perS: number, ok: number, failed: number, p50: number, p99: number, errors: string[], cpu: string }> => {
      const lat: number[] = []
      const errors: string[] = []
      let failed = 0
      const pidsAtStart = Object.fromEntries(Object.entries(procs).map(([k, f]) => [k, f()]))
      const ticks0 = Object.fromEntries(Object.entries(pidsAtStart).map(([k, pids]) => [k, sum(pids)]))
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
        ...Object.entries(pidsAtStart).map(([k, pids]) => `${k} ${pct((sum(pids) - ticks0[k]!) / CLK_TCK)}`),
        `bench client ${pct((c1.user + c1.system) / 1e6)}`
      ].join(', ')
      const res = { perS: lat.length / elapsedS, ok: lat.length, failed, p50: median(lat), p99: quantile(lat, 0.99), errors, cpu }
      log(`${label}: ${res.ok} ok, ${failed} failed in ${elapsedS.toFixed(1)} s → ${res.perS.toFixed(0)}/s; CPU (% of one core): ${cpu}`)
      notes.push(`execs/s ${label}: CPU as % of one core during the run: ${cpu}${Object.keys(procs).some((k) => k.startsWith('sshd')) ? ' (sshd: the listener and the live session processes with their reaped children)' : ''}`)
      return res
    }
    const sshOne = async (): Promise<void> => {
      const r = await runSsh(sshArgs(e, ['true']), 'ignore', 60_000)
      if (r.code !== 0) throw new Error(`ssh true exited ${r.code}: ${r.stderr.trim()}`)
    }
    // A short warm-up fills the pools (ceil(50/8) connections per sandbox).
    await inParallel(RATE_CLIENTS * 2, RATE_CLIENTS, async () => {
      await gatewayTrue(e.gwA.publicUrl, 'emb').catch(() => 0)
      await gatewayTrue(e.gwA.publicUrl, 'ossh').catch(() => 0)
    })
    const gwPid = (): number[] => [e.gwA.pid]
    const emb = await profiled(e.gwA, 'rate-embedded', async () => await run('embedded', async () => { await gatewayTrue(e.gwA.publicUrl, 'emb') }, { gateway: gwPid, 'supervisor (embedded daemon, its children)': () => [e.supervisors[1]!.pid] }))
    const ossh = await profiled(e.gwA, 'rate-openssh', async () => await run('OpenSSH', async () => { await gatewayTrue(e.gwA.publicUrl, 'ossh') }, { gateway: gwPid, supervisor: () => [e.supervisors[0]!.pid], sshd: sshdTree }))
    const peer = await run('fresh ssh clients', sshOne, { sshd: sshdTree })
    const d = (r: typeof emb): string => `${r.perS.toFixed(0)}/s (p50 ${ms(r.p50)} ms, p99 ${ms(r.p99)} ms${r.failed > 0 ? `, **${r.failed} of ${r.ok + r.failed} failed**` : ''})`
    rows.push({ what: `execs/s, \`true\`, ${RATE_CLIENTS} concurrent clients, ${RATE_S} s, embedded daemon via supervisor`, gateway: d(emb), peer: '—', ratio: `${emb.perS.toFixed(0)}/s`, goal: '—' })
    rows.push({ what: `execs/s, \`true\`, ${RATE_CLIENTS} concurrent clients, ${RATE_S} s, OpenSSH via supervisor`, gateway: d(ossh), peer: `${RATE_CLIENTS} concurrent fresh \`ssh … true\`: ${d(peer)}`, ratio: `${fixed(ossh.perS / peer.perS, 1)}× the ssh rate`, goal: '—' })
    for (const [label, r] of [['embedded', emb], ['OpenSSH', ossh], ['ssh', peer]] as const) {
      if (r.failed > 0) failures.push(`execs/s ${label}: ${r.failed} failed, e.g. ${r.errors.join(' | ')}`)
    }
    expect(emb.failed + ossh.failed + peer.failed).toBe(0)
  })

  it.runIf(ONLY.has('throughput'))(`stdout throughput: ${FILE_MIB} MiB of random bytes, WebSocket vs ssh cat`, async () => {
    const e = env!
    const devNull = openSync('/dev/null', 'w')
    const mbps = (bytes: number, t: number): number => bytes / 1e6 / (t / 1000)
    const t = { ssh: [] as number[], binary: [] as number[], base64: [] as number[], sshPipedStream: [] as number[], binaryStream: [] as number[] }
    const check = (what: string, r: StreamRun): void => {
      expect(r.bytes, `${what}: bytes received`).toBe(e.fileBytes)
      expect(r.sha256, `${what}: sha256 of the bytes received`).toBe(e.fileSha256)
    }
    // Where the CPU goes during a gateway transfer: the gateway, the supervisor, the sshd side
    // (pooled session processes and their `cat`), and this process (the WebSocket client).
    type Cpu = { gateway: number, supervisor: number, sshd: number, client: number, wallS: number }
    const cpu: Record<'binary' | 'base64', Cpu[]> = { binary: [], base64: [] }
    const supA = e.supervisors[0]!
    const measured = async (mode: 'binary' | 'base64'): Promise<StreamRun> => {
      const sshdPids = e.sshdPid === undefined ? [] : [e.sshdPid, ...descendants(e.sshdPid)]
      const sum = (pids: number[]): number => pids.reduce((a, p) => a + cpuTicksWithChildren(p), 0)
      const b = { gateway: sum([e.gwA.pid]), supervisor: sum([supA.pid]), sshd: sum(sshdPids) }
      const c0 = process.cpuUsage()
      const r = await profiled(e.gwA, `throughput-${mode}`, async () => await websocketCat(e.gwA.publicUrl, 'ossh', e.file, mode))
      const c1 = process.cpuUsage(c0)
      cpu[mode].push({
        gateway: (sum([e.gwA.pid]) - b.gateway) / CLK_TCK,
        supervisor: (sum([supA.pid]) - b.supervisor) / CLK_TCK,
        sshd: (sum(sshdPids) - b.sshd) / CLK_TCK,
        client: (c1.user + c1.system) / 1e6,
        wallS: r.ms / 1000
      })
      return r
    }
    try {
      // Warm-up: page cache, pools, JIT.
      await runSsh(sshArgs(e, ['cat', e.file]), devNull)
      check('warm-up binary', await websocketCat(e.gwA.publicUrl, 'ossh', e.file, 'binary'))
      for (let rep = 0; rep < TPUT_REPS; rep++) {
        const s = await runSsh(sshArgs(e, ['cat', e.file]), devNull)
        if (s.code !== 0) throw new Error(`ssh cat exited ${s.code}: ${s.stderr}`)
        t.ssh.push(s.ms)
        const bin = await measured('binary')
        check('binary', bin)
        t.binary.push(bin.ms)
        t.binaryStream.push(bin.streamMs)
        const piped = await sshCatPiped(sshArgs(e, ['cat', e.file]))
        check('ssh piped', piped)
        t.sshPipedStream.push(piped.streamMs)
        const b64 = await measured('base64')
        check('base64', b64)
        t.base64.push(b64.ms)
        const f = (x: number): string => mbps(e.fileBytes, x).toFixed(0)
        log(`throughput rep ${rep + 1}: ssh>/dev/null ${f(s.ms)}, binary ${f(bin.ms)} (stream ${f(bin.streamMs)}, ${bin.frames} frames), ssh|sha256 stream ${f(piped.streamMs)}, base64 ${f(b64.ms)} (${b64.frames} frames) MB/s`)
      }
    } finally {
      closeSync(devNull)
    }
    for (const mode of ['binary', 'base64'] as const) {
      const avg = (k: keyof Cpu): number => cpu[mode].reduce((a, c) => a + c[k], 0) / cpu[mode].length
      const line = `CPU seconds during one ${mode} transfer of ${FILE_MIB} MiB (mean of ${cpu[mode].length}, wall ${avg('wallS').toFixed(2)} s, ${os.availableParallelism()} cores): gateway ${avg('gateway').toFixed(2)}, supervisor ${avg('supervisor').toFixed(2)}, sshd + cat ${avg('sshd').toFixed(2)}, WebSocket client (bench process) ${avg('client').toFixed(2)}; total ${(avg('gateway') + avg('supervisor') + avg('sshd') + avg('client')).toFixed(2)} of ${(avg('wallS') * os.availableParallelism()).toFixed(2)} available`
      log(line)
      notes.push(line)
    }
    const ssh = mbps(e.fileBytes, median(t.ssh))
    const bin = mbps(e.fileBytes, median(t.binary))
    const b64 = mbps(e.fileBytes, median(t.base64))
    const binStream = mbps(e.fileBytes, median(t.binaryStream))
    const sshStream = mbps(e.fileBytes, median(t.sshPipedStream))
    const peer = `\`ssh … cat\` > /dev/null: ${ssh.toFixed(0)} MB/s`
    rows.push({
      what: `stdout throughput, ${FILE_MIB} MiB random, gateway → WebSocket \`${BINARY_SUBPROTOCOL}\` (OpenSSH via supervisor; end to end, median of ${TPUT_REPS}, sha256 checked)`,
      gateway: `${bin.toFixed(0)} MB/s`,
      peer,
      ratio: fixed(bin / ssh, 2),
      goal: `≥ ${GOALS.binaryThroughputRatio.toFixed(2)}`,
      met: bin / ssh >= GOALS.binaryThroughputRatio
    })
    rows.push({
      what: 'stdout throughput, the same as JSON text events `?encoding=base64` (end to end, sha256 checked)',
      gateway: `${b64.toFixed(0)} MB/s`,
      peer,
      ratio: fixed(b64 / ssh, 2),
      goal: '—'
    })
    rows.push({
      what: 'stdout streaming rate only (first byte → end, no connection setup), binary WebSocket vs `ssh … cat` piped into the bench process; both sha256 checked',
      gateway: `${binStream.toFixed(0)} MB/s`,
      peer: `\`ssh … cat\` piped into a sha256 in the bench process: ${sshStream.toFixed(0)} MB/s`,
      ratio: fixed(binStream / sshStream, 2),
      goal: '—'
    })
    notes.push(`throughput: MB = 10^6 bytes. End to end = gateway: POST to WebSocket close; ssh: spawn to exit (so it includes ssh's connection setup, see the round trip rows). Streaming rate = first output byte to the end. ${TPUT_REPS} interleaved repetitions after one warm-up`)
  })

  it.runIf(ONLY.has('hold') && HOLD_STEPS.length > 0)(`held silent execs: ${HOLD_STEPS.join(' and ')} through one gateway`, async () => {
    // A fresh gateway: its idle RSS must not carry the throughput test's buffers. No `local`
    // sandbox, so the embedded daemon's children and state stay in the supervisor process.
    const maxHeld = HOLD_STEPS[HOLD_STEPS.length - 1]!
    // With the inspector (loopback, random port): the bench forces a full GC before each RSS
    // reading, so that the figures compare live memory, not the garbage of the last burst, and
    // reads V8's heap usage.
    const gw = await gateway(['--max-pending-relays-per-sandbox', String(Math.max(32, maxHeld * 2))], false, true)
    const sup = supervisor(gw, 'hold')
    commands.push(`- gateway C (held execs), with NODE_OPTIONS=--inspect=127.0.0.1:0: \`${cmdline(gw.pid)}\``, `- supervisor (held execs, embedded daemon): \`${cmdline(sup.pid)}\``)
    await waitConnected(gw.publicUrl, 'hold')
    let insp = inspectors.get(gw)
    if (insp === undefined) { insp = await Inspector.attach(gw); inspectors.set(gw, insp) }
    const inspector = insp
    await inspector.send('HeapProfiler.enable')
    const ids: string[] = []
    try {
      // Warm-up: code paths loaded and JIT-compiled, one pooled connection open.
      await inParallel(64, 8, async () => { await gatewayTrue(gw.publicUrl, 'hold') })
      await sleep(3000)
      // A window with no tick at all is below the clock's resolution, not zero.
      const cpuText = (pct: number): string => pct === 0 ? `< ${(100 / CLK_TCK / CPU_WINDOW_S).toFixed(2)} %` : `${fixed(pct)} %`
      const measure = async (label: string): Promise<{ rssKiB: number, cpuPct: number, supRssKiB: number, heapKiB: number }> => {
        await inspector.send('HeapProfiler.collectGarbage')
        await inspector.send('HeapProfiler.collectGarbage')
        const heapKiB = (await inspector.send('Runtime.getHeapUsage')).usedSize / 1024
        await sleep(1000)
        const samples: number[] = []
        const c0 = cpuTicks(gw.pid)
        const t0 = performance.now()
        for (let s = 0; s < CPU_WINDOW_S; s++) { samples.push(rssKiB(gw.pid)); await sleep(1000) }
        samples.push(rssKiB(gw.pid))
        const cpuPct = (cpuTicks(gw.pid) - c0) / CLK_TCK / ((performance.now() - t0) / 1000) * 100
        const rss = median(samples)
        const supRssKiB = rssKiB(sup.pid)
        log(`${label}: gateway RSS ${(rss / 1024).toFixed(1)} MiB (min ${(Math.min(...samples) / 1024).toFixed(1)}, max ${(Math.max(...samples) / 1024).toFixed(1)}), V8 heap used ${(heapKiB / 1024).toFixed(1)} MiB, CPU ${cpuText(cpuPct)} over ${CPU_WINDOW_S} s; supervisor RSS ${(supRssKiB / 1024).toFixed(1)} MiB`)
        return { rssKiB: rss, cpuPct, supRssKiB, heapKiB }
      }
      const idle = await measure('idle')
      if (PROFILE_DIR !== '') { await profiled(gw, 'hold-0-idle', async () => await sleep(100)); await inspectors.get(gw)!.heapSnapshot('hold-0') }
      rows.push({ what: 'gateway idle (supervisor connected, warm, 0 execs)', gateway: `RSS ${(idle.rssKiB / 1024).toFixed(1)} MiB (V8 heap used ${(idle.heapKiB / 1024).toFixed(1)} MiB), CPU ${cpuText(idle.cpuPct)} of one core over ${CPU_WINDOW_S} s`, peer: `supervisor process RSS ${(idle.supRssKiB / 1024).toFixed(1)} MiB`, ratio: '—', goal: '—' })
      for (const target of HOLD_STEPS) {
        const t0 = performance.now()
        const from = ids.length
        const started = await inParallel(target - from, 32, async () => {
          const r = await httpJson(gw.publicUrl, 'POST', '/v1/sandboxes/hold/execs', { command: HOLD_COMMAND })
          if (r.status !== 201) throw new Error(`start ${HOLD_COMMAND.join(' ')}: ${r.status} ${JSON.stringify(r.body).slice(0, 300)}`)
          ALL_EXEC_IDS.add(r.body.id)
          return r.body.id as string
        })
        ids.push(...started)
        let endedEarly: string | undefined
        await waitUntil(`${target} execs running`, 120_000, async () => {
          const r = await httpJson(gw.publicUrl, 'GET', '/v1/execs?sandboxId=hold')
          const mine = new Set(ids)
          const list = (r.body.execs as Array<{ status: string, id: string, error: unknown }>).filter((x) => mine.has(x.id))
          const failed = list.filter((x) => x.status === 'failed' || x.status === 'exited')
          if (failed.length > 0) { endedEarly = `${failed.length} held execs ended early, e.g. ${JSON.stringify(failed[0])}`; return true }
          return list.filter((x) => x.status === 'running').length === target
        }, 500)
        if (endedEarly !== undefined) throw new Error(endedEarly)
        log(`${target} execs running after ${((performance.now() - t0) / 1000).toFixed(1)} s`)
        await sleep(3000)
        const m = await profiled(gw, `hold-${target}-idle`, async () => await measure(`${target} held`))
        if (PROFILE_DIR !== '') await inspectors.get(gw)!.heapSnapshot(`hold-${target}`)
        const perExec = (m.rssKiB - idle.rssKiB) / target
        const isGoalRow = target === maxHeld
        rows.push({
          what: `${target.toLocaleString('en-US')} held silent execs (\`${HOLD_COMMAND.join(' ')}\`, embedded daemon via supervisor process): gateway RSS per exec, CPU while idle`,
          gateway: `RSS ${(m.rssKiB / 1024).toFixed(1)} MiB (+${((m.rssKiB - idle.rssKiB) / 1024).toFixed(1)} MiB); V8 heap used +${((m.heapKiB - idle.heapKiB) / 1024).toFixed(1)} MiB = ${((m.heapKiB - idle.heapKiB) / target).toFixed(1)} KiB/exec; CPU ${cpuText(m.cpuPct)} of one core over ${CPU_WINDOW_S} s`,
          peer: `supervisor process RSS ${(m.supRssKiB / 1024).toFixed(1)} MiB`,
          ratio: `${perExec.toFixed(1)} KiB/exec`,
          goal: isGoalRow && maxHeld >= 1000 ? `≤ ${GOALS.heldKiBPerExec} KiB/exec` : '—',
          met: isGoalRow && maxHeld >= 1000 ? perExec <= GOALS.heldKiBPerExec : undefined
        })
      }
      // Kill them the way a client would: DELETE each.
      const t0 = performance.now()
      await inParallel(ids.length, 16, async (i) => {
        const r = await httpJson(gw.publicUrl, 'DELETE', `/v1/execs/${ids[i]}`)
        if (r.status !== 204) throw new Error(`DELETE ${ids[i]}: ${r.status} ${JSON.stringify(r.body)}`)
      })
      await waitUntil('every held exec to end', 180_000, async () => await activeExecs(gw.publicUrl) === 0, 500)
      const delS = (performance.now() - t0) / 1000
      log(`DELETE of ${ids.length} held execs: all ended after ${delS.toFixed(1)} s`)
      notes.push(`held execs: DELETE of all ${ids.length} (16 at a time) took ${delS.toFixed(1)} s until the gateway reported 0 active execs (each DELETE runs the kill script, a /proc scan, on a side channel)`)
      notes.push(`held execs: before each reading the bench forces two full GCs in the gateway (inspector HeapProfiler.collectGarbage) and waits 1 s; RSS is then the median of ${CPU_WINDOW_S + 1} VmRSS samples taken 1 s apart during the CPU window; per exec = (RSS held − RSS idle) / N; V8 heap = Runtime.getHeapUsage usedSize after the GC; CPU = Δ(utime+stime) of the gateway process / wall time`)
      await waitUntil('no held exec process left', 30_000, () => taggedProcesses(new Set(ids)).length === 0, 500)
    } finally {
      await gw.stop()
      await sup.stop()
    }
  })
})
