// The world the soak runs in: the gateway process, the sandboxes (a supervisor behind a TCP fault
// proxy each), the faults injected and the execs observed, the cleanup, and the chaos loop.
import { readdirSync, readFileSync } from 'node:fs'
import { startSupervisorProcess, type SupervisorProcess } from '../test/helpers/supervisor-process.js'
import type { TcpProxy } from '../test/helpers/tcp-proxy.js'
import { sandboxAccount } from '../test/helpers/openssh.js'
import { sleep } from '../test/helpers/wait.js'
import { httpCall } from './clients.js'
import type { SoakCluster } from './cluster.js'
import type { SoakGateway } from './gateway.js'
import { CHAOS_MAX_MS, CHAOS_MIN_MS, FAULT_KINDS, PING_BOUND_MS, RESTART_ALLOWANCE_MS, RESTART_EVERY_S, RUN_ID, SEED, isWholeFault, pick, rng, type FaultKind } from './knobs.js'

// The single gateway process, or the cluster (SOAK_REPLICAS > 1) that stands in for it.
export type Gateway = SoakGateway | SoakCluster

export interface Sandbox {
  id: string
  kind: 'embedded' | 'openssh'
  proxy: TcpProxy
  sshdProxy: TcpProxy | undefined
  sup: SupervisorProcess
  busy: boolean
}

export interface Fault {
  n: number
  kind: FaultKind
  // '*' for a gateway restart, which hits every sandbox.
  sandbox: string
  start: number
  durationMs: number
  endAction?: number
  recovered?: number
  reconnected?: boolean
  recoveryTimedOut?: boolean
  // Replica faults: the replica, and the sandboxes it held when the fault began.
  replica?: string
  sandboxes?: string[]
}

export const world = {
  gw: undefined as unknown as Gateway,
  sandboxes: [] as Sandbox[],
  allSupervisors: [] as SupervisorProcess[],
  faults: [] as Fault[],
  cleanups: [] as Array<() => Promise<void>>,
  runStart: Date.now(),
  deadline: Date.now(),
  aborted: false
}

// What a client is owed on top of an exec's bound: each gateway restart since t0 (its down time
// and the reconnect, report and reattach that follow it).
export function restartAllowance (t0: number): number {
  let ms = 0
  for (const r of world.gw.restarts) if (r.killAt >= t0 - 1000) ms += ((r.upAt ?? Date.now()) - r.killAt) + RESTART_ALLOWANCE_MS
  return ms
}

// A gateway restart that began since `since` (a connection that dropped then may be resumed).
export const restartedSince = (since: number): boolean => world.gw.restarts.some((r) => r.killAt >= since - 100)

export const rel = (t: number | undefined): string => t === undefined ? '?' : `+${((t - world.runStart) / 1000).toFixed(1)}s`
export const log = (line: string): void => { process.stdout.write(`${line}\n`) }

async function bounded<T> (p: Promise<T>, ms: number, what: string): Promise<T | undefined> {
  let t: NodeJS.Timeout | undefined
  const r = await Promise.race([p, new Promise<undefined>((resolve) => { t = setTimeout(() => { log(`[soak] cleanup: ${what} did not finish within ${ms} ms`); resolve(undefined) }, ms) })])
  clearTimeout(t)
  return r
}

export function startSupervisor (sb: Omit<Sandbox, 'sup' | 'busy'>): SupervisorProcess {
  const sup = startSupervisorProcess({
    gatewayUrl: `http://${sb.proxy.host}:${sb.proxy.port}`,
    sandboxId: sb.id,
    token: world.gw.token(sb.id),
    ...(sb.sshdProxy === undefined ? {} : { sshTarget: `${sb.sshdProxy.host}:${sb.sshdProxy.port}`, sshUser: sandboxAccount() })
  })
  world.allSupervisors.push(sup)
  return sup
}

export interface SandboxView { status: string, connectedAt: string | null, activeExecs: number }

// The gateway's sandboxes as a client sees them (GET /v1/sandboxes); undefined while it is down.
export async function sandboxView (timeoutMs = 2000): Promise<Map<string, SandboxView> | undefined> {
  const r = await httpCall('GET', '/v1/sandboxes', undefined, timeoutMs)
  if (!r.ok || r.status !== 200 || !Array.isArray(r.json?.sandboxes)) return undefined
  return new Map((r.json.sandboxes as Array<SandboxView & { id: string }>).map((s) => [s.id, s]))
}
const connectedAt = (v: Map<string, SandboxView> | undefined, id: string): string | undefined => {
  const s = v?.get(id)
  return s?.status === 'connected' && s.connectedAt !== null ? s.connectedAt : undefined
}

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

export async function cleanupAll (): Promise<void> {
  world.aborted = true
  while (world.cleanups.length > 0) {
    const c = world.cleanups.pop()!
    await bounded(c().catch((err: unknown) => log(`[soak] cleanup step failed: ${String(err)}`)), 15_000, 'a cleanup step')
  }
  for (let i = 0; i < 3; i++) {
    if (killTaggedProcesses() === 0) break
    await sleep(200)
  }
}

// ---------------------------------------------------------------- chaos

async function awaitRecovery (all: Sandbox[], f: Fault, before: Map<string, SandboxView> | undefined): Promise<void> {
  const t = f.endAction!
  if (f.kind === 'wedge') { f.recovered = t; f.reconnected = false; return }
  // A replica fault has recovered once haproxy has the replica UP again and every sandbox it
  // held has a session that connected since (on whichever replica).
  const replica = f.replica
  const sbs = f.sandboxes === undefined ? all : all.filter((sb) => f.sandboxes!.includes(sb.id))
  const reconnected = (v: Map<string, SandboxView> | undefined, id: string): boolean => {
    const at = connectedAt(v, id)
    return at !== undefined && Date.parse(at) >= f.start
  }
  for (let i = 0; i < 400 && Date.now() - t < 20_000; i++) {
    const v = await sandboxView()
    if (sbs.every((sb) => reconnected(v, sb.id)) && (replica === undefined || await (world.gw as SoakCluster).serverUp(replica))) { f.recovered = Date.now(); f.reconnected = true; return }
    // The connection outlived the fault (it was shorter than the gateway's ping bound).
    const sb = sbs[0]!
    if (replica === undefined && sbs.length === 1 && connectedAt(v, sb.id) !== undefined && connectedAt(v, sb.id) === connectedAt(before, sb.id) && Date.now() - t > PING_BOUND_MS + 2000) {
      f.recovered = t
      f.reconnected = false
      return
    }
    await sleep(100)
  }
  f.recovered = Date.now()
  f.recoveryTimedOut = true
}

// Which execs the gateway had started on their sandboxes, by exec key: one the embedded daemon
// had started must come back after a restart; one it had not may honestly be lost.
async function startedExecs (): Promise<Map<string, number | null>> {
  const r = await httpCall('GET', '/v1/execs', undefined, 5000)
  const m = new Map<string, number | null>()
  if (!r.ok || r.status !== 200) return m
  for (const e of r.json.execs as Array<{ command: string[], startedAt: string | null }>) {
    const key = /^: soak (\S+)/.exec(e.command[2] ?? '')?.[1]
    if (key !== undefined) m.set(key, e.startedAt === null ? null : Date.parse(e.startedAt))
  }
  return m
}

const replicaRng = rng(`${SEED}/replica`)

// Replica faults: one replica that holds sandboxes (any, when none does), SIGKILLed or drained.
async function faultReplica (f: Fault, kind: 'replica-kill' | 'replica-restart', downMs: number): Promise<void> {
  const c = world.gw as SoakCluster
  const owners = await c.owners()
  const holding = c.replicas.filter((r) => [...owners.values()].includes(r.id))
  const id = pick(replicaRng, holding.length > 0 ? holding : c.replicas).id
  f.replica = id
  f.sandboxes = [...owners].filter(([, r]) => r === id).map(([s]) => s).sort()
  if (world.aborted) return
  const started = await startedExecs()
  // The fault begins with the signal, not with the lookups before it.
  f.start = Date.now()
  await c.faultReplica(kind, id, downMs, started, f.sandboxes)
}

function describeFault (f: Fault, durationMs: number): string {
  const held = `holding [${f.sandboxes?.join(',') ?? ''}]`
  switch (f.kind) {
    case 'kill': return `restarted after ${durationMs} ms`
    case 'reset': return 'connections reset'
    case 'gateway-restart': return `SIGKILLed, successor up after ${durationMs} ms down + ${f.endAction! - f.start - durationMs} ms start`
    case 'replica-kill': return `SIGKILLed ${held}, up again after ${durationMs} ms down + start`
    case 'replica-restart': {
      const drain = world.gw.restarts.find((r) => r.replica !== undefined && r.killAt >= f.start)?.drainMs
      return `SIGTERM ${held}: drained and exited in ${drain ?? '?'} ms, up again after ${durationMs} ms down + start`
    }
    default: return `for ${durationMs} ms`
  }
}

async function runFault (sbs: Sandbox[], kind: FaultKind, durationMs: number): Promise<void> {
  for (const sb of sbs) sb.busy = true
  const sb = sbs[0]!
  const before = await sandboxView()
  const f: Fault = { n: world.faults.length + 1, kind, sandbox: isWholeFault(kind) ? '*' : sb.id, start: Date.now(), durationMs }
  world.faults.push(f)
  try {
    switch (kind) {
      case 'kill':
        sb.sup.signal('SIGKILL')
        await sleep(durationMs)
        if (!world.aborted) sb.sup = startSupervisor(sb)
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
      case 'gateway-restart':
        if (!world.aborted) {
          const started = await startedExecs()
          // The fault begins with the kill, not with the lookups before it (they can take a
          // while on a loaded host, and an exec that ends meanwhile was not cut by it).
          f.start = Date.now()
          await (world.gw as SoakGateway).restart(durationMs, started)
        }
        break
      case 'replica-kill':
      case 'replica-restart':
        await faultReplica(f, kind, durationMs)
        break
    }
    f.endAction = Date.now()
    await awaitRecovery(sbs, f, before)
    const what = describeFault(f, durationMs)
    const target = kind === 'gateway-restart' ? 'gateway' : f.replica ?? sb.id
    log(`[chaos ${rel(f.start)}] #${f.n} ${kind} ${target} ${what}; ${f.recoveryTimedOut === true ? 'NOT reconnected within 20 s' : f.reconnected === true ? `${f.replica !== undefined ? 'its sandboxes ' : sbs.length > 1 ? 'all ' : ''}reconnected ${rel(f.recovered)}` : 'connection survived'}`)
  } finally {
    for (const s of sbs) s.busy = false
  }
}

export async function chaosLoop (): Promise<void> {
  if (FAULT_KINDS.length === 0) return
  const r = rng(`${SEED}/chaos`)
  const running: Array<Promise<void>> = []
  let lastRestart = -Infinity
  let restartWanted = false
  const wholeKinds = FAULT_KINDS.filter(isWholeFault)
  let wholeCount = 0
  await sleep(Math.min(3000, Math.max(0, world.deadline - Date.now())))
  for (let i = 0; i < 100_000 && Date.now() < world.deadline && !world.aborted; i++) {
    const free = world.sandboxes.filter((s) => !s.busy)
    // A gateway restart hits every exec in flight, and the ones after it need time to show that
    // they go on: one every RESTART_EVERY_S at most, none too close to the deadline. Once drawn,
    // no new fault starts until every sandbox is free, so that it is the only fault in progress.
    if (!restartWanted && wholeKinds.length > 0 && Date.now() - lastRestart >= RESTART_EVERY_S * 1000 &&
      world.deadline - Date.now() > RESTART_ALLOWANCE_MS && r() < 0.3) restartWanted = true
    if (restartWanted) {
      if (free.length === world.sandboxes.length) {
        restartWanted = false
        lastRestart = Date.now()
        // In turn (replica-kill, replica-restart, ...), so that a short run has both; no draw, so
        // the single gateway's sequence of draws stays as it was.
        const kind = wholeKinds[wholeCount++ % wholeKinds.length]!
        running.push(runFault(world.sandboxes, kind, 200 + Math.floor(r() * 1800)))
      }
    } else if (free.length > 0) {
      const sb = pick(r, free)
      const kinds = FAULT_KINDS.filter((k) => !isWholeFault(k) && (k !== 'wedge' || sb.sshdProxy !== undefined))
      if (kinds.length > 0) {
        // Only OpenSSH sandboxes can be wedged, and the keepalive bound is only exercised by a
        // wedge: give it a fair share there.
        const kind = kinds.includes('wedge') && r() < 0.4 ? 'wedge' : pick(r, kinds)
        const durationMs = kind === 'kill' ? 500 + Math.floor(r() * 2500) : kind === 'reset' ? 0 : 1000 + Math.floor(r() * 5000)
        running.push(runFault([sb], kind, durationMs))
      }
    }
    await sleep(Math.min(CHAOS_MIN_MS + r() * (CHAOS_MAX_MS - CHAOS_MIN_MS), Math.max(1, world.deadline - Date.now())))
  }
  await Promise.all(running)
}
