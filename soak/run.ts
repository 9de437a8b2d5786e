// The soak's three phases before the verdicts: set the world up, run the agents under chaos while
// measuring the gateway's process, and wait for the gateway to drain back to nothing running.
import { readFileSync } from 'node:fs'
import { startTcpProxy, type TcpProxy } from '../test/helpers/tcp-proxy.js'
import { startOpenSshd, type OpenSshd } from '../test/helpers/openssh.js'
import { sleep } from '../test/helpers/wait.js'
import { httpCall, setBaseUrl } from './clients.js'
import { agentLoop } from './execs.js'
import { observations } from './observation.js'
import { SoakCluster } from './cluster.js'
import { procStats, SoakGateway } from './gateway.js'
import {
  AGENTS, CHAOS_MAX_MS, CHAOS_MIN_MS, CLUSTER, DETECTION_BOUND_MS, DURATION_S, FAULT_KINDS, KEEPALIVE_BOUND_MS, KNOBS,
  OPENSSH_SANDBOXES, PING_BOUND_MS, RESTART_EVERY_S, RUN_ID, SANDBOXES, SEED, SHAPES_PCT, SHORT_FAULT_MS, SLACK_MS
} from './knobs.js'
import { codeVersion, heapAfterGcMb } from './report.js'
import { chaosLoop, log, rel, sandboxView, startSupervisor, world, type Gateway } from './world.js'

// The gateway, one OpenSSH daemon when some sandboxes use it, and every sandbox's supervisor
// behind its own TCP fault proxy, all connected.
export async function setUpWorld (): Promise<Gateway> {
  const { cleanups, sandboxes } = world
  const g = world.gw = CLUSTER ? new SoakCluster() : new SoakGateway()
  cleanups.push(async () => { await g.close() })
  await g.start()
  // A restart keeps the ports, so this stays the gateway's address (cluster: haproxy's).
  setBaseUrl(g.publicUrl)
  let sshd: OpenSshd | undefined
  if (OPENSSH_SANDBOXES > 0) {
    const d = sshd = await startOpenSshd({ authorizedKeys: [g.publicKey], logLevel: 'ERROR' })
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
  for (let i = 0; ; i++) {
    const v = await sandboxView()
    if (sandboxes.every((sb) => v?.get(sb.id)?.status === 'connected')) break
    if (i >= 300) throw new Error(`not every supervisor connected within 30 s: ${JSON.stringify([...(v ?? new Map()).entries()])}`)
    await sleep(100)
  }

  log(`[soak] code ${codeVersion()}`)
  if (g instanceof SoakCluster) log(`[soak] cluster: ${g.describe()}, one data dir ${g.dataDir}`)
  else log(`[soak] gateway: exec-gateway serve pid ${g.pid} at ${g.publicUrl} (supervisors ${g.supervisorUrl}), data dir ${g.dataDir}`)
  log(`[soak] seed=${SEED} run=${RUN_ID} duration=${DURATION_S}s agents=${AGENTS} sandboxes=${SANDBOXES} (openssh ${OPENSSH_SANDBOXES}) faults=${FAULT_KINDS.join(',') || 'none'} chaos every ${CHAOS_MIN_MS}-${CHAOS_MAX_MS} ms, a gateway restart at most every ${RESTART_EVERY_S} s; large shapes ${SHAPES_PCT}% of execs`)
  log(`[soak] bounds: keepalive ${KEEPALIVE_BOUND_MS} ms, ping ${PING_BOUND_MS} ms, reattach ${KNOBS.reattachTimeoutMs} ms (embedded stop/blackhole up to ${SHORT_FAULT_MS} ms must be bridged), session wait ${KNOBS.sessionWaitMs} ms, relay open ${KNOBS.relayOpenTimeoutMs} ms, ssh ready ${KNOBS.sshReadyTimeoutMs} ms → exec bound = planned + ${DETECTION_BOUND_MS} + close wait ${KNOBS.closeWaitMs} + slack ${SLACK_MS} ms (+ each gateway restart's outage + ${KNOBS.sessionWaitMs + KNOBS.reattachTimeoutMs} ms)`)
  return g
}

// A gauge of the gateway's /metrics (cluster: summed over the replicas), or undefined when it does not answer.
async function metric (name: string): Promise<number | undefined> {
  if (world.gw instanceof SoakCluster) return await world.gw.metricSum(name)
  const r = await httpCall('GET', '/metrics', undefined, 3000)
  if (!r.ok || r.status !== 200) return undefined
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(r.text)
  return m === null ? undefined : Number(m[1])
}

// What the gateway's processes (one per restart) and the driver did during the load.
export interface LoadMeasure {
  // The gateway process: RSS (bytes) at the start, the peak over all its processes, and the
  // V8 heap in use at the start as its /metrics report it (no forced GC: it is another process).
  rssStart: number
  rssPeak: number
  heapStartMb: number | undefined
  // When the last agent returned: the drain after the deadline ends here.
  drainedAt: number
  loadS: number
  gatewayCpuPctOfCore: number
  driverCpuPctOfCore: number
  driverHeapStartMb: number
  // Busy share of the whole machine, or undefined where /proc/stat says nothing.
  machineBusyPct: number | undefined
  warnings: Map<string, number>
}

// The agents and the chaos loop until the deadline, and until every exec in flight has ended.
export async function runUnderChaos (g: Gateway): Promise<LoadMeasure> {
  world.runStart = Date.now()
  world.deadline = world.runStart + DURATION_S * 1000
  const warnings = new Map<string, number>()
  const onWarning = (w: Error): void => { const k = `${w.name}: ${w.message.slice(0, 120)}`; warnings.set(k, (warnings.get(k) ?? 0) + 1) }
  process.on('warning', onWarning)
  world.cleanups.push(async () => { process.off('warning', onWarning) })
  // CPU seconds of each gateway process, as last read (a killed one keeps its last reading).
  const gwCpu = new Map<number, number>()
  // RSS summed over the processes running now (the replicas, in cluster mode).
  const sample = (): number => {
    let rss = 0
    for (const pid of g.livePids()) {
      const st = procStats(pid)
      if (st !== undefined) gwCpu.set(pid, st.cpuS)
      rss += st?.rss ?? 0
    }
    return rss
  }
  const rssStart = sample()
  const cpuAtStart = [...gwCpu.values()].reduce((a, b) => a + b, 0)
  const heapStartMb = await metric('nodejs_heap_size_used_bytes').then((b) => b === undefined ? undefined : b / 2 ** 20)
  const driverHeapStartMb = heapAfterGcMb()
  const cpuStart = process.cpuUsage()
  const machineStart = machineCpu()
  let rssPeak = rssStart
  const sampler = setInterval(() => { rssPeak = Math.max(rssPeak, sample()) }, 500)
  const progress = setInterval(() => {
    void metric('exec_gateway_active_execs').then((active) => {
      const n = observations.length
      const bad = observations.filter((o) => o.outcome === 'hung' || o.problems.length > 0).length
      log(`[soak ${rel(Date.now())}] execs done=${n} flagged=${bad} gw.active=${active ?? 'down'} gw.pid=${g.pid} faults=${world.faults.length} restarts=${g.restarts.length} gw.rss=${(sample() / 2 ** 20).toFixed(0)}MB`)
    })
  }, 10_000)
  try {
    await Promise.all([chaosLoop(), ...Array.from({ length: AGENTS }, async (_, i) => { await agentLoop(i) })])
  } finally {
    clearInterval(sampler)
    clearInterval(progress)
  }
  sample()
  const drainedAt = Date.now()
  const cpu = process.cpuUsage(cpuStart)
  const machineEnd = machineCpu()
  const loadS = (drainedAt - world.runStart) / 1000
  const gwCpuS = [...gwCpu.values()].reduce((a, b) => a + b, 0) - cpuAtStart
  return {
    rssStart,
    rssPeak,
    heapStartMb,
    drainedAt,
    loadS,
    gatewayCpuPctOfCore: gwCpuS / loadS * 100,
    driverCpuPctOfCore: ((cpu.user + cpu.system) / 1e6) / loadS * 100,
    driverHeapStartMb,
    machineBusyPct: machineEnd.total > machineStart.total ? ((machineEnd.busy - machineStart.busy) / (machineEnd.total - machineStart.total)) * 100 : undefined,
    warnings
  }
}

// What the gateway still holds once the agents are done: it must be back to no running exec and
// no active exec counted on any sandbox. What a client can see: its /metrics and its API.
export interface Leftovers {
  running: number
  active: string[]
  execs: Array<{ id: string, sandboxId: string, status: string, createdAt: string, startedAt: string | null, command: string[] }>
  rssEnd: number
  heapEndMb: number | undefined
  retained: number
  retainedBytes: number | undefined
}

export async function awaitDrain (g: Gateway): Promise<Leftovers> {
  let running = -1
  let active: string[] = []
  for (let i = 0; i < 150; i++) {
    running = await metric('exec_gateway_active_execs') ?? -1
    const v = await sandboxView()
    active = v === undefined ? ['(no answer)'] : [...v.entries()].filter(([, s]) => s.activeExecs !== 0).map(([id, s]) => `${id}:${s.activeExecs}`)
    if (running === 0 && active.length === 0) break
    await sleep(100)
  }
  const all = await httpCall('GET', '/v1/execs', undefined, 10_000)
  const execs: Leftovers['execs'] = all.ok && all.status === 200 ? all.json.execs : []
  return {
    running,
    active,
    execs: execs.filter((e) => e.status === 'running' || e.status === 'pending'),
    rssEnd: g.livePids().reduce((a, pid) => a + (procStats(pid)?.rss ?? 0), 0),
    heapEndMb: await metric('nodejs_heap_size_used_bytes').then((b) => b === undefined ? undefined : b / 2 ** 20),
    retained: execs.length,
    retainedBytes: await metric('exec_gateway_retained_bytes')
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
