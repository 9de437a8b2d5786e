import { appendFileSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { expect } from 'vitest'
import { startGatewayProcess, type GatewayProcess } from '../helpers/gateway-process.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { sleep, waitFor } from '../helpers/wait.js'
import { percentile } from '../helpers/stats.js'

// The world every hostile-sandbox test runs in: one gateway as a real child process (so that a
// crash is a crash, and its RSS and CPU can be read from /proc), one honest sandbox whose
// supervisor runs the embedded daemon, and a steady stream of execs on it whose output and exit
// status are checked byte for byte. An attack runs while that stream goes on; the report says
// what the honest sandbox saw during a quiet run and under the attack.

export const HONEST = 'honest'

interface LoadReport {
  total: number
  ok: number
  // One line per failed exec (status, code, or the mismatch), at most 20.
  failures: string[]
  p50Ms: number
  p99Ms: number
}

export interface AttackReport {
  attack: string
  quiet: LoadReport
  underAttack: LoadReport
  baselineRssBytes: number
  peakRssBytes: number
  // Gateway CPU over the attack window, and that window's length.
  cpuSeconds: number
  wallSeconds: number
  // Gateway log output during the attack.
  logBytes: number
}

export interface HostileWorld {
  gateway: GatewayProcess
  honest: SupervisorProcess
  publicUrl: string
  supervisorUrl: string
  token: (sandboxId: string) => string
  rssBytes: () => number
  cpuSeconds: () => number
  // Bytes and lines the gateway has written to stdout and stderr since it started.
  logBytes: () => number
  logLines: () => number
  // Throws, with the gateway's last output, if the gateway process is gone.
  assertAlive: () => void
  // One exec on the honest sandbox, checked exactly; never throws, bounded by 30 s.
  honestExec: () => Promise<{ ok: boolean, ms: number, detail?: string }>
  load: (durationMs: number, concurrency?: number) => Promise<LoadReport>
  // Runs a quiet load, then the attack beside the same load; the attack gets an AbortSignal
  // that fires when the window is over and must stop by then. Every report is also appended to
  // HOSTILE_REPORT_FILE, for the table in the session note.
  underAttack: (name: string, attack: (signal: AbortSignal) => Promise<void>, opts?: { durationMs?: number, quietMs?: number, concurrency?: number }) => Promise<AttackReport>
  stop: () => Promise<void>
}

const HOSTILE_REPORT_FILE = process.env.HOSTILE_REPORT_FILE ?? join(tmpdir(), 'exec-gateway-hostile-report.ndjson')
const CLOCK_TICKS = 100
const EXEC_BOUND_MS = 30_000

export interface HostileWorldOptions {
  // More `serve` flags (budgets made small for a test, say).
  extraArgs?: string[]
  env?: Record<string, string>
}

export async function startHostileWorld (opts: HostileWorldOptions = {}): Promise<HostileWorld> {
  // No exec rate limit: the honest load alone runs past 1,200 execs a minute from one address,
  // and the limit has its own tests. A test may set it again (the last flag wins).
  const gateway = await startGatewayProcess({ localSandbox: false, extraArgs: ['--log-level', 'info', '--exec-rate-limit-per-minute', '0', ...(opts.extraArgs ?? [])], ...(opts.env === undefined ? {} : { env: opts.env }) })
  let bytes = 0
  let lines = 0
  const count = (c: Buffer): void => {
    bytes += c.length
    for (let i = c.indexOf(10); i !== -1; i = c.indexOf(10, i + 1)) lines++
  }
  gateway.proc.stdout!.on('data', count)
  gateway.proc.stderr!.on('data', count)
  const honest = startSupervisorProcess({ gatewayUrl: gateway.supervisorUrl, sandboxId: HONEST, token: gateway.token(HONEST) })
  const { publicUrl } = gateway

  const assertAlive = (): void => {
    if (gateway.proc.exitCode !== null || gateway.proc.signalCode !== null) {
      throw new Error(`the gateway process died (${gateway.proc.signalCode ?? `exit ${String(gateway.proc.exitCode)}`}); its last output:\n${gateway.output().slice(-4000)}`)
    }
  }

  const honestExec = async (): Promise<{ ok: boolean, ms: number, detail?: string }> => {
    const out = randomBytes(1 + (randomBytes(1)[0]! % 48)).toString('hex')
    const err = randomBytes(8).toString('hex')
    const code = randomBytes(1)[0]! % 4
    const start = performance.now()
    try {
      const res = await fetch(`${publicUrl}/v1/sandboxes/${HONEST}/execs?wait=true`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ command: ['sh', '-c', 'printf %s "$1"; printf %s "$2" >&2; exit "$3"', 'x', out, err, String(code)] }),
        signal: AbortSignal.timeout(EXEC_BOUND_MS)
      })
      const body = await res.json() as any
      const ms = performance.now() - start
      if (res.status !== 200) return { ok: false, ms, detail: `HTTP ${res.status} ${String(body?.code)}: ${String(body?.detail).slice(0, 200)}` }
      if (body.stdout !== out || body.stderr !== err || body.exitCode !== code) {
        return { ok: false, ms, detail: `wrong result: stdout ${JSON.stringify(String(body.stdout).slice(0, 60))}, stderr ${JSON.stringify(String(body.stderr).slice(0, 60))}, exit ${String(body.exitCode)} (wanted ${code})` }
      }
      return { ok: true, ms }
    } catch (e) {
      return { ok: false, ms: performance.now() - start, detail: `request failed: ${(e as Error).message}` }
    }
  }

  const load = async (durationMs: number, concurrency = 4): Promise<LoadReport> => {
    const until = performance.now() + durationMs
    const lat: number[] = []
    const failures: string[] = []
    let total = 0
    const worker = async (): Promise<void> => {
      while (performance.now() < until) {
        const r = await honestExec()
        total++
        if (r.ok) lat.push(r.ms)
        else if (failures.length < 20) failures.push(r.detail ?? 'failed')
      }
    }
    await Promise.all(Array.from({ length: concurrency }, worker))
    // 0 without a single ok exec: the report stays JSON, and the failures already fail the test.
    return { total, ok: lat.length, failures, p50Ms: lat.length === 0 ? 0 : percentile(lat, 0.5), p99Ms: lat.length === 0 ? 0 : percentile(lat, 0.99) }
  }

  const rssBytes = (): number => {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${gateway.pid}/status`, 'utf8'))
    return m === null ? 0 : Number(m[1]) * 1024
  }
  const cpuSeconds = (): number => {
    // Fields after the command name (which may hold spaces, so split after its ')').
    const stat = readFileSync(`/proc/${gateway.pid}/stat`, 'utf8')
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(f[11]) + Number(f[12])) / CLOCK_TICKS
  }

  const underAttack: HostileWorld['underAttack'] = async (name, attack, o = {}) => {
    const durationMs = o.durationMs ?? 6000
    const concurrency = o.concurrency ?? 4
    assertAlive()
    const quiet = await load(o.quietMs ?? 3000, concurrency)
    const baselineRssBytes = rssBytes()
    let peakRssBytes = baselineRssBytes
    const sampler = setInterval(() => { try { peakRssBytes = Math.max(peakRssBytes, rssBytes()) } catch { /* process gone: assertAlive says so */ } }, 50)
    const cpu0 = cpuSeconds()
    const log0 = bytes
    const t0 = performance.now()
    const window = new AbortController()
    const timer = setTimeout(() => window.abort(), durationMs)
    let attackError: unknown
    const attacking = attack(window.signal).catch((e: unknown) => { attackError = e })
    let underAttackLoad: LoadReport
    try {
      underAttackLoad = await load(durationMs, concurrency)
      window.abort()
      // The attack must stop with its window; a bound on it, so a stuck attack fails the test.
      await Promise.race([attacking, sleep(10_000).then(() => { throw new Error(`attack ${name} did not stop within 10 s of its window`) })])
    } finally {
      clearTimeout(timer)
      clearInterval(sampler)
    }
    const report: AttackReport = {
      attack: name,
      quiet,
      underAttack: underAttackLoad,
      baselineRssBytes,
      peakRssBytes,
      cpuSeconds: Math.round((cpuSeconds() - cpu0) * 100) / 100,
      wallSeconds: Math.round(performance.now() - t0) / 1000,
      logBytes: bytes - log0
    }
    try { appendFileSync(HOSTILE_REPORT_FILE, JSON.stringify(report) + '\n') } catch { /* a report file is a convenience */ }
    if (attackError !== undefined) throw attackError
    assertAlive()
    return report
  }

  const stop = async (): Promise<void> => {
    await honest.stop()
    await gateway.stop()
  }

  try {
    // The honest sandbox is up once an exec on it succeeds.
    await waitFor(async () => (await honestExec()).ok, { timeoutMs: 15_000, intervalMs: 100, description: 'the honest sandbox to run an exec' })
  } catch (err) {
    await stop()
    throw err
  }

  return {
    gateway,
    honest,
    publicUrl,
    supervisorUrl: gateway.supervisorUrl,
    token: (id) => gateway.token(id),
    rssBytes,
    cpuSeconds,
    logBytes: () => bytes,
    logLines: () => lines,
    assertAlive,
    honestExec,
    load,
    underAttack,
    stop
  }
}

export interface UnharmedBounds {
  // The honest p99 under attack may be this many times the quiet one (default 2) ...
  p99Factor?: number
  // ... or this many ms above it (default 100), whichever is larger: at quiet p99s of tens of ms, the scheduler
  // of a 2-core machine that runs the attacker too moves p99 by more than 2× on its own.
  p99SlackMs?: number
  // Gateway RSS during the attack.
  maxRssBytes?: number
  // At least this many honest execs under attack (a stalled gateway runs few).
  minExecs?: number
}

// The honest sandbox's execs all succeeded, exactly, and were not slowed beyond the bound.
export function expectHonestUnharmed (r: AttackReport, b: UnharmedBounds = {}): void {
  const factor = b.p99Factor ?? 2
  const slack = b.p99SlackMs ?? 100
  const label = `${r.attack}: quiet p99 ${r.quiet.p99Ms.toFixed(1)} ms, under attack p99 ${r.underAttack.p99Ms.toFixed(1)} ms, ${r.underAttack.ok}/${r.underAttack.total} ok, peak RSS ${(r.peakRssBytes / 2 ** 20).toFixed(0)} MiB`
  expect(r.underAttack.failures, label).toEqual([])
  expect(r.underAttack.ok, label).toBeGreaterThanOrEqual(b.minExecs ?? 5)
  expect(r.underAttack.p99Ms, label).toBeLessThanOrEqual(Math.max(factor * r.quiet.p99Ms, r.quiet.p99Ms + slack))
  if (b.maxRssBytes !== undefined) expect(r.peakRssBytes, label).toBeLessThanOrEqual(b.maxRssBytes)
}

// exec_gateway_sandbox_refusals_total by reason, from the gateway's /metrics.
export async function refusalCounts (publicUrl: string): Promise<Record<string, number>> {
  const text = await (await fetch(`${publicUrl}/metrics`, { signal: AbortSignal.timeout(5000) })).text()
  const out: Record<string, number> = {}
  for (const m of text.matchAll(/^exec_gateway_sandbox_refusals_total\{reason="([a-z_]+)"\} (\d+(?:\.\d+)?)$/gm)) out[m[1]!] = Number(m[2])
  return out
}

// The reasons whose count rose between two readings, by how much.
export function refusalDiff (after: Record<string, number>, before: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.entries(after).map(([k, v]) => [k, v - (before[k] ?? 0)] as const).filter(([, v]) => v > 0))
}
