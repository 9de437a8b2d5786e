import pino from 'pino'
import { afterEach, describe, expect, it, vi } from 'vitest'
import { GatewayEvents } from '../../src/diagnostics.js'
import { closeWithin } from '../../src/lifecycle/close-within.js'
import { Lifecycle, SHUTDOWN_PHASES, type ShutdownPhase, type ShutdownSteps } from '../../src/lifecycle/lifecycle.js'
import { Metrics } from '../../src/metrics.js'
import { Refusals } from '../../src/refusals.js'

const silent = pino({ level: 'silent' })

describe('closeWithin', () => {
  afterEach(() => { vi.useRealTimers() })

  it('resolves "polite" when the polite close settles in time, without forcing, and leaves no timer armed', async () => {
    vi.useFakeTimers()
    const force = vi.fn()
    const done = closeWithin(1000, async () => {}, force)
    await expect(done).resolves.toBe('polite')
    expect(force).not.toHaveBeenCalled()
    expect(vi.getTimerCount()).toBe(0)
  })

  it('forces at the bound when the polite close does not settle, and waits for the force', async () => {
    vi.useFakeTimers()
    const order: string[] = []
    const done = closeWithin(500, async () => await new Promise(() => {}), async () => {
      order.push('force')
      await Promise.resolve()
      order.push('forced')
    })
    await vi.advanceTimersByTimeAsync(499)
    expect(order).toEqual([])
    await vi.advanceTimersByTimeAsync(1)
    await expect(done).resolves.toBe('forced')
    expect(order).toEqual(['force', 'forced'])
    expect(vi.getTimerCount()).toBe(0)
  })

  it('forces at once, and clears its timer, when the polite close throws or rejects', async () => {
    vi.useFakeTimers()
    const force = vi.fn()
    await expect(closeWithin(1000, () => { throw new Error('sync') }, force)).resolves.toBe('forced')
    await expect(closeWithin(1000, async () => { throw new Error('async') }, force)).resolves.toBe('forced')
    expect(force).toHaveBeenCalledTimes(2)
    expect(vi.getTimerCount()).toBe(0)
  })
})

function recordingSteps (ran: string[], lifecycle: Lifecycle, over: Partial<ShutdownSteps> = {}): ShutdownSteps {
  const steps = {} as ShutdownSteps
  for (const phase of SHUTDOWN_PHASES) {
    steps[phase] = over[phase] ?? (() => { ran.push(`${phase}:${lifecycle.readiness}`) })
  }
  return steps
}

describe('Lifecycle', () => {
  it('is starting, then ready, then draining from the first phase of shutdown', async () => {
    const l = new Lifecycle()
    expect(l.readiness).toBe('starting')
    l.markReady()
    expect(l.readiness).toBe('ready')
    const ran: string[] = []
    await l.shutdown(recordingSteps(ran, l), silent)
    expect(ran[0]).toBe('draining:draining')
    expect(l.readiness).toBe('draining')
    expect(l.shuttingDown).toBe(true)
  })

  it('stays draining when listen() finishes after shutdown began', async () => {
    const l = new Lifecycle()
    const closing = l.shutdown(recordingSteps([], l), silent)
    l.markReady()
    expect(l.readiness).toBe('draining')
    await closing
    expect(l.readiness).toBe('draining')
  })

  it('runs every phase once, in order, each after the previous one has ended; a second call waits for the same run', async () => {
    const l = new Lifecycle()
    const ran: string[] = []
    let releaseExecs: () => void = () => {}
    const steps = recordingSteps(ran, l, {
      execs: async () => {
        ran.push('execs:start')
        await new Promise<void>((resolve) => { releaseExecs = resolve })
        ran.push('execs:end')
      }
    })
    const first = l.shutdown(steps, silent)
    const second = l.shutdown(steps, silent)
    await new Promise((resolve) => setImmediate(resolve))
    expect(ran).toEqual(['draining:draining', 'execs:start'])
    expect(l.reached('execs')).toBe(true)
    expect(l.reached('listeners')).toBe(false)
    releaseExecs()
    await Promise.all([first, second])
    const phases = ran.filter((r) => !r.startsWith('execs')).map((r) => r.split(':')[0])
    expect(phases).toEqual(SHUTDOWN_PHASES.filter((p) => p !== 'execs'))
    expect(ran.filter((r) => r.startsWith('execs'))).toEqual(['execs:start', 'execs:end'])
    expect(l.reached('observers')).toBe(true)
  })

  it('goes on past a phase that throws, and still resolves', async () => {
    const l = new Lifecycle()
    const ran: string[] = []
    const failing: ShutdownPhase = 'relays'
    await expect(l.shutdown(recordingSteps(ran, l, { [failing]: () => { throw new Error('boom') } }), silent)).resolves.toBeUndefined()
    expect(ran.map((r) => r.split(':')[0])).toEqual(SHUTDOWN_PHASES.filter((p) => p !== failing))
  })
})

describe('Metrics observe the lifecycle events of their own gateway', () => {
  async function value (m: Metrics, name: string): Promise<string> {
    return (await m.render()).split('\n').filter((l) => l.startsWith(name)).join('\n')
  }

  it('counts what its gateway publishes, not another gateway\'s, and stops at close()', async () => {
    const mine = new GatewayEvents()
    const other = new GatewayEvents()
    const gauges = { activeExecs: () => 0, sessions: () => 0, sandboxes: () => ({ connected: 0, disconnected: 0 }), retainedBytes: () => 0 }
    const m = new Metrics(gauges, mine)
    const refusals = new Refusals({ logger: silent, events: mine, linesPerMinute: 60 })
    try {
      mine.execCreated({ execId: 'ex_1', sandboxId: 'sb' })
      other.execCreated({ execId: 'ex_2', sandboxId: 'sb' })
      mine.execEnded({ execId: 'ex_1', sandboxId: 'sb', status: 'failed', code: 'ssh_failed' })
      mine.execBytes({ stream: 'stdout', bytes: 7 })
      mine.pingRtt({ seconds: 0.002 })
      refusals.refuse('bad_message', 'sb', 'refused')
      expect(await value(m, 'exec_gateway_execs_started_total')).toBe('exec_gateway_execs_started_total 1')
      expect(await value(m, 'exec_gateway_execs_ended_total')).toBe('exec_gateway_execs_ended_total{outcome="failed",code="ssh_failed"} 1')
      expect(await value(m, 'exec_gateway_exec_bytes_total')).toBe('exec_gateway_exec_bytes_total{stream="stdout"} 7')
      expect(await value(m, 'exec_gateway_h2_ping_rtt_seconds_count')).toBe('exec_gateway_h2_ping_rtt_seconds_count 1')
      expect(await value(m, 'exec_gateway_sandbox_refusals_total{reason="bad_message"}')).toBe('exec_gateway_sandbox_refusals_total{reason="bad_message"} 1')
      expect(refusals.count('bad_message')).toBe(1)
    } finally {
      m.close()
      refusals.close()
    }
    mine.execCreated({ execId: 'ex_3', sandboxId: 'sb' })
    expect(await value(m, 'exec_gateway_execs_started_total')).toBe('exec_gateway_execs_started_total 1')
  })
})
