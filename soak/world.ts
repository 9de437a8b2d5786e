// The world the soak runs in: the gateway, the sandboxes (a supervisor behind a TCP fault proxy
// each), the faults injected and the execs observed, the cleanup, and the chaos loop.
import { readdirSync, readFileSync } from 'node:fs'
import type { TestGateway } from '../test/helpers/gateway.js'
import { startSupervisorProcess, type SupervisorProcess } from '../test/helpers/supervisor-process.js'
import type { TcpProxy } from '../test/helpers/tcp-proxy.js'
import { sandboxAccount } from '../test/helpers/openssh.js'
import { sleep } from '../test/helpers/wait.js'
import { CHAOS_MAX_MS, CHAOS_MIN_MS, FAULT_KINDS, PING_BOUND_MS, RUN_ID, SEED, pick, rng, type FaultKind } from './knobs.js'

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
  sandbox: string
  start: number
  durationMs: number
  endAction?: number
  recovered?: number
  reconnected?: boolean
  recoveryTimedOut?: boolean
}

export const world = {
  g: undefined as unknown as TestGateway,
  sandboxes: [] as Sandbox[],
  allSupervisors: [] as SupervisorProcess[],
  faults: [] as Fault[],
  cleanups: [] as Array<() => Promise<void>>,
  runStart: Date.now(),
  deadline: Date.now(),
  aborted: false
}

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
    token: world.g.token(sb.id),
    ...(sb.sshdProxy === undefined ? {} : { sshTarget: `${sb.sshdProxy.host}:${sb.sshdProxy.port}`, sshUser: sandboxAccount() })
  })
  world.allSupervisors.push(sup)
  return sup
}

export const sessionOf = (id: string): { connectedAt: Date } | undefined => world.g.gw.registry.get(id)?.session

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
  const f: Fault = { n: world.faults.length + 1, kind, sandbox: sb.id, start: Date.now(), durationMs }
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
    }
    f.endAction = Date.now()
    await awaitRecovery(sb, f, before)
    const what = kind === 'kill' ? `restarted after ${durationMs} ms` : kind === 'reset' ? 'connections reset' : `for ${durationMs} ms`
    log(`[chaos ${rel(f.start)}] #${f.n} ${kind} ${sb.id} ${what}; ${f.recoveryTimedOut === true ? 'NOT reconnected within 20 s' : f.reconnected === true ? `reconnected ${rel(f.recovered)}` : 'connection survived'}`)
  } finally {
    sb.busy = false
  }
}

export async function chaosLoop (): Promise<void> {
  if (FAULT_KINDS.length === 0) return
  const r = rng(`${SEED}/chaos`)
  const running: Array<Promise<void>> = []
  await sleep(Math.min(3000, Math.max(0, world.deadline - Date.now())))
  for (let i = 0; i < 100_000 && Date.now() < world.deadline && !world.aborted; i++) {
    const free = world.sandboxes.filter((s) => !s.busy)
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
    await sleep(Math.min(CHAOS_MIN_MS + r() * (CHAOS_MAX_MS - CHAOS_MIN_MS), Math.max(1, world.deadline - Date.now())))
  }
  await Promise.all(running)
}
