// The soak: many agents run long, mostly silent execs with bursts of output against one in-process
// gateway and real supervisor processes, while a chaos loop kills, stops, blackholes and resets
// them. A few percent of the execs take large shapes: megabyte bursts on both streams with nobody
// attached, readers that attach late or stop reading, stdin floods. Every exec must end within
// its bound with its true exit status (exact output, exact code) or an honest error (503
// relay_unavailable / sandbox_unavailable, or the other bounded errors of CONTRACT §5: 502
// ssh_failed, 504 relay_open_timeout, 429), never a hang, never a made-up exit.
// How to run it and read it: soak/README.md. The parts: knobs.ts (settings, seeded randomness),
// plans.ts (what each exec runs and must print), expected.ts (the byte-exact check), clients.ts
// (HTTP, NDJSON, WebSocket), world.ts (sandboxes, cleanup, chaos), execs.ts (one exec, start to
// verdict; the agents), report.ts (verdicts and tables).
import { describe, expect, it, afterAll } from 'vitest'
import { readFileSync, writeFileSync } from 'node:fs'
import v8 from 'node:v8'
import { startGateway } from '../test/helpers/gateway.js'
import { startTcpProxy, type TcpProxy } from '../test/helpers/tcp-proxy.js'
import { startOpenSshd, type OpenSshd } from '../test/helpers/openssh.js'
import { sleep } from '../test/helpers/wait.js'
import { setBaseUrl } from './clients.js'
import { agentLoop, observations } from './execs.js'
import {
  AGENTS, CHAOS_MAX_MS, CHAOS_MIN_MS, DETECTION_BOUND_MS, DUMP_PATH, DURATION_S, FAULT_KINDS, HEAP_SNAPSHOT_PATH, KEEPALIVE_BOUND_MS, KNOBS,
  MIN_TRUE_EXITS, OPENSSH_SANDBOXES, PING_BOUND_MS, RUN_ID, SANDBOXES, SEED, SHAPES_PCT, SLACK_MS
} from './knobs.js'
import { codeVersion, describeVerdict, faultTable, heapAfterGcMb, judge, procRssMb, verdictTables, type Verdict } from './report.js'
import { chaosLoop, cleanupAll, log, rel, startSupervisor, world } from './world.js'

declare module 'vitest' {
  interface TaskMeta { soakLine?: string }
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

describe('soak', () => {
  afterAll(async () => { await cleanupAll() }, 120_000)

  it(`${AGENTS} agents × ${SANDBOXES} sandboxes for ${DURATION_S} s under chaos: true exit or honest error, never a hang`, async ({ task }) => {
    const { cleanups, sandboxes } = world
    try {
      const g = world.g = await startGateway(KNOBS)
      cleanups.push(async () => { await g.close() })
      setBaseUrl(g.publicUrl)
      let sshd: OpenSshd | undefined
      if (OPENSSH_SANDBOXES > 0) {
        const d = sshd = await startOpenSshd({ authorizedKeys: [g.gw.identity.publicKey], logLevel: 'ERROR' })
        cleanups.push(async () => { await d.close() })
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
      cleanups.push(async () => { await Promise.all(world.allSupervisors.map(async (s) => { await s.stop() })) })
      for (const sb of sandboxes) await g.waitConnected(sb.id, 30_000)

      log(`[soak] code ${codeVersion()}`)
      log(`[soak] seed=${SEED} run=${RUN_ID} duration=${DURATION_S}s agents=${AGENTS} sandboxes=${SANDBOXES} (openssh ${OPENSSH_SANDBOXES}) faults=${FAULT_KINDS.join(',') || 'none'} chaos every ${CHAOS_MIN_MS}-${CHAOS_MAX_MS} ms; large shapes ${SHAPES_PCT}% of execs`)
      log(`[soak] bounds: keepalive ${KEEPALIVE_BOUND_MS} ms, ping ${PING_BOUND_MS} ms, session wait ${KNOBS.sessionWaitMs} ms, relay open ${KNOBS.relayOpenTimeoutMs} ms, ssh ready ${KNOBS.sshReadyTimeoutMs} ms → exec bound = planned + ${DETECTION_BOUND_MS} + close wait ${KNOBS.closeWaitMs} + slack ${SLACK_MS} ms`)

      world.runStart = Date.now()
      world.deadline = world.runStart + DURATION_S * 1000
      const warnings = new Map<string, number>()
      const onWarning = (w: Error): void => { const k = `${w.name}: ${w.message.slice(0, 120)}`; warnings.set(k, (warnings.get(k) ?? 0) + 1) }
      process.on('warning', onWarning)
      cleanups.push(async () => { process.off('warning', onWarning) })
      const rssStart = process.memoryUsage.rss()
      const heapStart = heapAfterGcMb()
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
      const tDrained = Date.now()
      const cpu = process.cpuUsage(cpuStart)
      const machineEnd = machineCpu()
      const loadS = (tDrained - world.runStart) / 1000

      // The gateway must be back to no running exec, no pending relay.
      for (let i = 0; i < 300 && (g.gw.execs.running > 0 || g.gw.registry.pendingCount() > 0); i++) await sleep(50)
      const leftRunning = g.gw.execs.running
      const leftPending = g.gw.registry.pendingCount()
      const leftActive = g.gw.registry.list().filter((s) => g.gw.execs.activeIn(s.id) !== 0).map((s) => `${s.id}:${g.gw.execs.activeIn(s.id)}`)
      const leftExecs = g.gw.execs.list({ status: 'running' }).concat(g.gw.execs.list({ status: 'pending' }))
      const rssEnd = process.memoryUsage.rss()
      const retainedAtEnd = g.gw.execs.size

      const verdicts = observations.map(judge)
      const codes = new Map<string, number>()
      for (const v of verdicts) if (v.obs.outcome === 'error') { const k = `${v.kind}:${v.obs.code}`; codes.set(k, (codes.get(k) ?? 0) + 1) }

      // Leak check: forget every finished exec (as the TTL sweeper would), collect, and compare the
      // heap with the one before the load. What remains is what the gateway (and the driver's
      // small per-exec records) kept.
      g.gw.execs.sweep(Date.now() + KNOBS.execTtlS * 1000 + 1000)
      const heapEnd = heapAfterGcMb()
      if (HEAP_SNAPSHOT_PATH !== '') v8.writeHeapSnapshot(HEAP_SNAPSHOT_PATH)
      const count = (c: Verdict['category']): number => verdicts.filter((v) => v.category === c).length
      const hung = count('hung')
      const wrong = count('wrong')
      const trueExits = count('true')
      const passed = trueExits + count('503') + count('honest')
      const unfaultedErrors = verdicts.filter((v) => v.kind === 'none' && (v.category === '503' || v.category === 'honest'))
      const failed = hung + wrong + leftRunning

      const out: string[] = []
      out.push('', `==================== soak summary (seed ${SEED}, ${DURATION_S} s, ${AGENTS} agents, ${SANDBOXES} sandboxes) ====================`)
      out.push(...verdictTables(verdicts))
      out.push('', 'faults injected:', faultTable())
      out.push('', `error codes (fault:code=count): ${[...codes.entries()].sort().map(([k, n]) => `${k}=${n}`).join(' ') || 'none'}`)
      out.push(`in flight at the deadline drained in ${((tDrained - world.deadline) / 1000).toFixed(1)} s; output checked: ${(observations.length)} execs`)
      out.push(`CPU during the load (${loadS.toFixed(0)} s): gateway + driver process ${(((cpu.user + cpu.system) / 1e6) / loadS * 100).toFixed(0)}% of a core; whole machine ${machineEnd.total > machineStart.total ? (((machineEnd.busy - machineStart.busy) / (machineEnd.total - machineStart.total)) * 100).toFixed(0) : '?'}% busy`)
      out.push(`gateway (in-process, with the soak driver) RSS: start ${(rssStart / 2 ** 20).toFixed(0)} MB, peak ${(rssPeak / 2 ** 20).toFixed(0)} MB, end ${(rssEnd / 2 ** 20).toFixed(0)} MB; execs retained ${retainedAtEnd} (TTL ${KNOBS.execTtlS} s; large ones are deleted once checked)`)
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
          seed: SEED,
          runStart: world.runStart,
          deadline: world.deadline,
          knobs: KNOBS,
          faults: world.faults,
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
