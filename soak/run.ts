// The soak's three phases before the verdicts: set the world up, run the agents under chaos while
// measuring the gateway's process, and wait for the gateway to drain back to nothing running.
import { readFileSync } from 'node:fs'
import { startGateway, type TestGateway } from '../test/helpers/gateway.js'
import { startTcpProxy, type TcpProxy } from '../test/helpers/tcp-proxy.js'
import { startOpenSshd, type OpenSshd } from '../test/helpers/openssh.js'
import { sleep } from '../test/helpers/wait.js'
import { setBaseUrl } from './clients.js'
import { agentLoop, observations } from './execs.js'
import {
  AGENTS, CHAOS_MAX_MS, CHAOS_MIN_MS, DETECTION_BOUND_MS, DURATION_S, FAULT_KINDS, KEEPALIVE_BOUND_MS, KNOBS,
  OPENSSH_SANDBOXES, PING_BOUND_MS, RUN_ID, SANDBOXES, SEED, SHAPES_PCT, SLACK_MS
} from './knobs.js'
import { codeVersion, heapAfterGcMb } from './report.js'
import { chaosLoop, log, rel, startSupervisor, world } from './world.js'

// The gateway, one OpenSSH daemon when some sandboxes use it, and every sandbox's supervisor
// behind its own TCP fault proxy, all connected.
export async function setUpWorld (): Promise<TestGateway> {
  const { cleanups, sandboxes } = world
  const g = world.g = await startGateway(KNOBS)
  cleanups.push(async () => { await g.close() })
  setBaseUrl(g.publicUrl)
  let sshd: OpenSshd | undefined
  if (OPENSSH_SANDBOXES > 0) {
    const d = sshd = await startOpenSshd({ authorizedKeys: [g.gw.identity.publicKey], logLevel: 'ERROR' })
    cleanups.push(async () => { await d.close() })
  }
  const supervisorUrl = new URL(g.supervisorUrl)
  for (let i = 0; i < SANDBOXES; i++) {
    const kind = i >= SANDBOXES - OPENSSH_SANDBOXES ? 'openssh' : 'embedded'
    const id = `soak-${kind === 'openssh' ? 'o' : 'e'}${i}`
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
  cleanups.push(async () => { await Promise.all(world.allSupervisors.map(async (s) => { await s.stop() })) })
  for (const sb of sandboxes) await g.waitConnected(sb.id, 30_000)

  log(`[soak] code ${codeVersion()}`)
  log(`[soak] seed=${SEED} run=${RUN_ID} duration=${DURATION_S}s agents=${AGENTS} sandboxes=${SANDBOXES} (openssh ${OPENSSH_SANDBOXES}) faults=${FAULT_KINDS.join(',') || 'none'} chaos every ${CHAOS_MIN_MS}-${CHAOS_MAX_MS} ms; large shapes ${SHAPES_PCT}% of execs`)
  log(`[soak] bounds: keepalive ${KEEPALIVE_BOUND_MS} ms, ping ${PING_BOUND_MS} ms, session wait ${KNOBS.sessionWaitMs} ms, relay open ${KNOBS.relayOpenTimeoutMs} ms, ssh ready ${KNOBS.sshReadyTimeoutMs} ms → exec bound = planned + ${DETECTION_BOUND_MS} + close wait ${KNOBS.closeWaitMs} + slack ${SLACK_MS} ms`)
  return g
}

// What the gateway's process (which is also the driver's) did during the load.
export interface LoadMeasure {
  rssStart: number
  rssPeak: number
  heapStartMb: number
  // When the last agent returned: the drain after the deadline ends here.
  drainedAt: number
  loadS: number
  cpuPctOfCore: number
  // Busy share of the whole machine, or undefined where /proc/stat says nothing.
  machineBusyPct: number | undefined
  warnings: Map<string, number>
}

// The agents and the chaos loop until the deadline, and until every exec in flight has ended.
export async function runUnderChaos (g: TestGateway): Promise<LoadMeasure> {
  world.runStart = Date.now()
  world.deadline = world.runStart + DURATION_S * 1000
  const warnings = new Map<string, number>()
  const onWarning = (w: Error): void => { const k = `${w.name}: ${w.message.slice(0, 120)}`; warnings.set(k, (warnings.get(k) ?? 0) + 1) }
  process.on('warning', onWarning)
  world.cleanups.push(async () => { process.off('warning', onWarning) })
  const rssStart = process.memoryUsage.rss()
  const heapStartMb = heapAfterGcMb()
  const cpuStart = process.cpuUsage()
  const machineStart = machineCpu()
  let rssPeak = rssStart
  const sampler = setInterval(() => { rssPeak = Math.max(rssPeak, process.memoryUsage.rss()) }, 1000)
  const progress = setInterval(() => {
    const n = observations.length
    const bad = observations.filter((o) => o.outcome === 'hung' || o.problems.length > 0).length
    log(`[soak ${rel(Date.now())}] execs done=${n} flagged=${bad} gw.running=${g.gw.execs.running} pendingRelays=${g.gw.registry.pendingCount()} faults=${world.faults.length} rss=${(process.memoryUsage.rss() / 2 ** 20).toFixed(0)}MB`)
  }, 10_000)
  try {
    await Promise.all([chaosLoop(), ...Array.from({ length: AGENTS }, async (_, i) => { await agentLoop(i) })])
  } finally {
    clearInterval(sampler)
    clearInterval(progress)
  }
  const drainedAt = Date.now()
  const cpu = process.cpuUsage(cpuStart)
  const machineEnd = machineCpu()
  const loadS = (drainedAt - world.runStart) / 1000
  return {
    rssStart,
    rssPeak,
    heapStartMb,
    drainedAt,
    loadS,
    cpuPctOfCore: ((cpu.user + cpu.system) / 1e6) / loadS * 100,
    machineBusyPct: machineEnd.total > machineStart.total ? ((machineEnd.busy - machineStart.busy) / (machineEnd.total - machineStart.total)) * 100 : undefined,
    warnings
  }
}

// What the gateway still holds once the agents are done: it must be back to no running exec,
// no pending relay and no active exec counted on any sandbox.
export interface Leftovers {
  running: number
  pending: number
  active: string[]
  execs: ReturnType<TestGateway['gw']['execs']['list']>
  rssEnd: number
  retained: number
}

export async function awaitDrain (g: TestGateway): Promise<Leftovers> {
  for (let i = 0; i < 300 && (g.gw.execs.running > 0 || g.gw.registry.pendingCount() > 0); i++) await sleep(50)
  return {
    running: g.gw.execs.running,
    pending: g.gw.registry.pendingCount(),
    active: g.gw.registry.list().map((s) => s.id).filter((id) => g.gw.execs.activeIn(id) !== 0).map((id) => `${id}:${g.gw.execs.activeIn(id)}`),
    execs: g.gw.execs.list({ status: 'running' }).concat(g.gw.execs.list({ status: 'pending' })),
    rssEnd: process.memoryUsage.rss(),
    retained: g.gw.execs.size
  }
}

// Busy and total jiffies of the whole machine, from /proc/stat.
function machineCpu (): { busy: number, total: number } {
  try {
    const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number)
    const idle = (f[3] ?? 0) + (f[4] ?? 0)
    const total = f.reduce((a, b) => a + b, 0)
    return { busy: total - idle, total }
  } catch { return { busy: 0, total: 0 } }
}
