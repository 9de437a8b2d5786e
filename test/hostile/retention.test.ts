import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { expectHonestUnharmed, HONEST, startHostileWorld, type HostileWorld } from './harness.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { waitFor } from '../helpers/wait.js'
import { H2_CONNECTION_WINDOW } from '../../src/relay/protocol.js'

// Issue 17: sandboxes that print as much as they can cannot make the gateway hold more than the
// retention budgets (64 MiB per sandbox, 96 MiB in total here), nor take the output another
// sandbox holds. Without the budgets the flood below (40 + 12 execs of 8 MiB per stream, each
// exec keeping all of it) leaves 832 MiB retained and the gateway near 1.1 GiB of RSS.

const MiB = 1024 * 1024
const PER_SANDBOX = 64 * MiB
const TOTAL = 96 * MiB
const HOG = 'hog'
// A second flooder, so that the total is exceeded too: the two hogs are the biggest holders.
const HOG2 = 'hog-2'
const FLOOD = ['sh', '-c', 'head -c 8388608 /dev/zero; head -c 8388608 /dev/zero >&2']
// The bound on the gateway's RSS: what it had before the flood, plus all it may retain, plus
// what may be in flight from the two hogs (each supervisor connection's HTTP/2 window), plus
// 64 MiB for garbage not yet collected. Without the budgets the same flood peaks near 1.1 GiB.
const rssBound = (baseline: number): number => baseline + TOTAL + 2 * H2_CONNECTION_WINDOW + 64 * MiB

// The honest load runs about 30 execs a second for half a minute: over the default per-token
// rate limit, which is not what this test is about.
const LOAD_ARGS = ['--exec-rate-limit-per-minute', '0']

const pattern = (word: string, n: number): string => `${word}\n`.repeat(Math.ceil(n / (word.length + 1))).slice(0, n)

async function post (url: string, sandboxId: string, body: unknown): Promise<{ status: number, body: any }> {
  const res = await fetch(`${url}/v1/sandboxes/${sandboxId}/execs?wait=true`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(60_000)
  })
  return { status: res.status, body: await res.json() }
}

// A flood exec runs in the background and is polled: a ?wait=true result would carry its 16 MiB
// of NUL bytes as JSON, and measure that instead of what the gateway retains.
async function flood (url: string, sandboxId: string, signal: AbortSignal): Promise<string | undefined> {
  const res = await fetch(`${url}/v1/sandboxes/${sandboxId}/execs`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ command: FLOOD, timeoutSeconds: 60 }),
    signal: AbortSignal.any([signal, AbortSignal.timeout(10_000)])
  })
  const created = await res.json() as any
  if (res.status !== 201) return `${sandboxId}: ${res.status} ${JSON.stringify(created).slice(0, 200)}`
  let exec: any
  await waitFor(async () => {
    if (signal.aborted) return true
    exec = await (await fetch(`${url}/v1/execs/${created.id as string}`, { signal: AbortSignal.any([signal, AbortSignal.timeout(10_000)]) })).json()
    return exec.status !== 'pending' && exec.status !== 'running'
  }, { timeoutMs: 60_000, intervalMs: 50, description: `flood exec ${created.id as string} to end` })
  if (signal.aborted) return `${sandboxId}: ${created.id as string} had not ended when the window closed`
  if (exec.exitCode === 0 && exec.stdoutBytes === 8 * MiB && exec.stderrBytes === 8 * MiB) return undefined
  return `${sandboxId}: ${JSON.stringify(exec).slice(0, 300)}`
}

async function retainedMetric (url: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`, { signal: AbortSignal.timeout(10_000) })).text()
  return Number(/^exec_gateway_retained_bytes (\d+)$/m.exec(text)?.[1])
}

describe('hostile: a sandbox floods the gateway with output', () => {
  let world: HostileWorld
  const hogs: SupervisorProcess[] = []

  beforeAll(async () => {
    world = await startHostileWorld({ extraArgs: ['--retention-bytes-per-sandbox', String(PER_SANDBOX), '--retention-bytes-total', String(TOTAL), ...LOAD_ARGS] })
    for (const id of [HOG, HOG2]) hogs.push(startSupervisorProcess({ gatewayUrl: world.supervisorUrl, sandboxId: id, token: world.token(id) }))
    for (const id of [HOG, HOG2]) {
      await waitFor(async () => (await post(world.publicUrl, id, { command: ['true'] })).status === 200, { timeoutMs: 15_000, intervalMs: 100, description: `sandbox ${id} to run an exec` })
    }
  })
  afterAll(async () => {
    for (const h of hogs) await h.stop()
    await world?.stop()
  })

  it('RSS stays within the budgets, the honest sandbox\'s finished output stays whole, its execs keep working', async () => {
    const keep = await post(world.publicUrl, HONEST, { command: ['sh', '-c', `yes keep | head -c ${4 * MiB}; yes kerr | head -c ${4 * MiB} >&2`] })
    expect(keep.status).toBe(200)
    expect(keep.body.stdout).toBe(pattern('keep', 4 * MiB))

    let flooded = 0
    const failures: string[] = []
    const report = await world.underAttack('retention flood: 40 + 12 execs × 8 MiB per stream', async (signal) => {
      // 8 at a time per hog: the running-exec path of the budget, not only the finished one.
      const hog = async (sandboxId: string, execs: number): Promise<void> => {
        let next = 0
        await Promise.all(Array.from({ length: 8 }, async () => {
          while (next < execs && !signal.aborted) {
            next++
            const failure = await flood(world.publicUrl, sandboxId, signal)
            if (failure === undefined) flooded++
            else failures.push(failure)
          }
        }))
      }
      await Promise.all([hog(HOG, 40), hog(HOG2, 12)])
    }, { durationMs: 25_000, quietMs: 3000 })

    const label = `peak RSS ${(report.peakRssBytes / MiB).toFixed(0)} MiB (baseline ${(report.baselineRssBytes / MiB).toFixed(0)} MiB), honest p99 ${report.quiet.p99Ms.toFixed(1)} → ${report.underAttack.p99Ms.toFixed(1)} ms`
    console.log(`retention flood: ${label}, ${report.cpuSeconds} s CPU in ${report.wallSeconds} s; honest ${report.underAttack.ok}/${report.underAttack.total} ok`, report.underAttack.failures.slice(0, 5))
    expect(failures, label).toEqual([])
    expect(flooded, label).toBe(52)
    const bound = rssBound(report.baselineRssBytes)
    expect(report.peakRssBytes, `${label}, bound ${(bound / MiB).toFixed(0)} MiB`).toBeLessThanOrEqual(bound)
    expect(await retainedMetric(world.publicUrl)).toBeLessThanOrEqual(TOTAL)
    // The honest sandbox's execs all ran, exactly; the flood may slow them (it takes the CPU of
    // a 2-core machine) but not by seconds.
    expectHonestUnharmed(report, { maxRssBytes: bound, p99SlackMs: 1000, p99Factor: 10 })

    // The honest exec that finished before the flood replays whole: no gap, every byte.
    const res = await fetch(`${world.publicUrl}/v1/execs/${keep.body.id as string}/events`, { headers: { accept: 'application/x-ndjson' }, signal: AbortSignal.timeout(30_000) })
    const events = (await res.text()).split('\n').filter((l) => l !== '').map((l) => JSON.parse(l))
    expect(events.filter((e) => e.type === 'gap')).toEqual([])
    expect(events.filter((e) => e.type === 'stdout').map((e) => e.data).join('')).toBe(pattern('keep', 4 * MiB))
    expect(events.filter((e) => e.type === 'stderr').map((e) => e.data).join('')).toBe(pattern('kerr', 4 * MiB))
    expect(events.at(-1)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
  })
})
