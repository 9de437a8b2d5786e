import { afterEach, describe, expect, it } from 'vitest'
import { pino } from 'pino'
import { GatewayEvents } from '../../src/diagnostics.js'
import { ExecManager } from '../../src/execs/manager.js'
import { Refusals } from '../../src/refusals.js'
import { SessionRegistry, type SupervisorSession } from '../../src/relay/sessions.js'
import { SshPool } from '../../src/relay/ssh-pool.js'
import { KEEPER_PROTOCOL_VERSION, type KeptStatus } from '../../src/schemas/keeper.js'
import { waitFor } from '../helpers/wait.js'

// ExecManager's side of a gateway restart: the records it rebuilds from what a daemon keeps,
// and the lookup that waits for them. A real registry and pool; the keeper's list is injected,
// and no relay ever opens, so adopted runs stay attaching.

const silent = pino({ level: 'silent' })
const cleanups: Array<() => Promise<void> | void> = []
afterEach(async () => { for (const c of cleanups.splice(0)) await c() })

function rig (opts: { sessionWaitMs: number, list: (sandboxId: string) => Promise<KeptStatus[]>, forgotten?: string[] }): { registry: SessionRegistry, execs: ExecManager, connect: (id: string, keepsExecs: boolean) => SupervisorSession } {
  const events = new GatewayEvents()
  const registry = new SessionRegistry({ sessionWaitMs: 10_000, relayOpenTimeoutMs: 10_000, maxPendingRelaysPerSandbox: 8, logger: silent })
  const refusals = new Refusals({ logger: silent, events, linesPerMinute: 10 })
  const pool = new SshPool({
    registry,
    privateKey: '',
    keepaliveIntervalMs: 1000,
    keepaliveCountMax: 1,
    readyTimeoutMs: 1000,
    pooling: true,
    channelsPerConnection: 1,
    idleCloseMs: 1000,
    logger: silent,
    refusals,
    maxOpensPerSandbox: 8,
    maxRekeysPerMinute: 10,
    maxRefusedChannelOpens: 10,
    events
  })
  const execs = new ExecManager({
    registry,
    pool,
    logger: silent,
    events,
    retentionBytes: 1024,
    execTtlS: 60,
    closeWaitMs: 100,
    sessionWaitMs: opts.sessionWaitMs,
    reattachTimeoutMs: 10_000,
    listKept: async (sandboxId) => await opts.list(sandboxId),
    forgetKept: async (_sandboxId, execId) => { opts.forgotten?.push(execId); return true }
  })
  cleanups.push(async () => {
    await execs.close(0)
    pool.close()
    registry.close()
    refusals.close()
  })
  let n = 0
  const connect = (sandboxId: string, keepsExecs: boolean): SupervisorSession => {
    const session: SupervisorSession = { id: `s${++n}`, sandboxId, connectedAt: new Date(), send: () => true, close: () => {} }
    registry.register(session, { keepsExecs })
    return session
  }
  return { registry, execs, connect }
}

function kept (execId: string, over: Partial<KeptStatus> = {}): KeptStatus {
  return {
    meta: { v: KEEPER_PROTOCOL_VERSION, execId, command: ['sh', '-c', 'sleep 3; echo late'], tty: false, interactive: true, cols: 100, rows: 30, timeoutSeconds: 7, createdAt: '2026-01-02T03:04:05.000Z' },
    state: 'running',
    startedAt: '2026-01-02T03:04:06.000Z',
    timedOut: false,
    stdout: { base: 40, end: 100 },
    stderr: { base: 0, end: 3 },
    stdinReceived: 0,
    stdinEof: false,
    attached: false,
    ...over
  }
}

describe('adoption of kept execs', () => {
  it('rebuilds every exec it does not know from the list, counted in the sandbox\'s slots', async () => {
    const r = rig({ sessionWaitMs: 0, list: async () => [kept('ex_a'), kept('ex_b', { state: 'exited', exit: { code: 0 }, endedAt: '2026-01-02T03:05:00.000Z' })] })
    r.connect('sb', true)
    await waitFor(() => r.execs.get('ex_a') !== undefined, 5000)
    const a = r.execs.get('ex_a')!
    expect(a.toJSON()).toMatchObject({
      id: 'ex_a',
      sandboxId: 'sb',
      command: ['sh', '-c', 'sleep 3; echo late'],
      interactive: true,
      tty: false,
      status: 'running',
      createdAt: '2026-01-02T03:04:05.000Z',
      startedAt: '2026-01-02T03:04:06.000Z',
      endedAt: null,
      // Rebuilt journals start at what the daemon still keeps.
      stdoutBytes: 40,
      stderrBytes: 0
    })
    expect(a.spec).toMatchObject({ cols: 100, rows: 30, timeoutSeconds: 7 })
    // Finished ones run too, to collect the tail and the exit report the normal way; until
    // they have, they are not shown (a record saying `running` with no bytes would be false).
    expect(r.execs.get('ex_b')).toBeUndefined()
    expect(r.execs.activeIn('sb')).toBe(2)
    // A reader from 0 is told that the first 40 bytes are gone.
    const events: unknown[] = []
    const detach = a.attach({}, (ev) => events.push(ev))
    detach()
    expect(events).toEqual([{ type: 'gap', stream: 'stdout', from: 0, to: 40 }])
  })

  it('leaves known ids alone, and does not ask a sandbox whose daemon keeps nothing', async () => {
    const asked: string[] = []
    const r = rig({ sessionWaitMs: 0, list: async (sb) => { asked.push(sb); return [kept('ex_a')] } })
    r.connect('plain', false)
    const s = r.connect('sb', true)
    await waitFor(() => r.execs.get('ex_a') !== undefined, 5000)
    const first = r.execs.get('ex_a')
    // The supervisor reconnects: the same list again.
    r.registry.unregister(s)
    r.connect('sb', true)
    await waitFor(() => asked.length === 2, 5000)
    expect(asked).toEqual(['sb', 'sb'])
    expect(r.execs.get('ex_a')).toBe(first)
    expect(r.execs.activeIn('sb')).toBe(1)
  })

  it('retries a list that fails', async () => {
    let calls = 0
    const r = rig({ sessionWaitMs: 0, list: async () => { if (++calls === 1) throw new Error('no relay yet'); return [kept('ex_a')] } })
    r.connect('sb', true)
    await waitFor(() => r.execs.get('ex_a') !== undefined, 5000)
    expect(calls).toBe(2)
  })

  it('asks the daemon to forget a deleted exec', async () => {
    const forgotten: string[] = []
    const r = rig({ sessionWaitMs: 0, list: async () => [kept('ex_a')], forgotten })
    r.connect('sb', true)
    await waitFor(() => r.execs.get('ex_a') !== undefined, 5000)
    r.execs.remove(r.execs.get('ex_a')!)
    await waitFor(() => forgotten.length === 1, 5000)
    expect(forgotten).toEqual(['ex_a'])
    expect(r.execs.get('ex_a')).toBeUndefined()
  })
})

describe('lookup right after start', () => {
  it('waits for an id a supervisor reports within --session-wait-ms', async () => {
    const r = rig({ sessionWaitMs: 5000, list: async () => [kept('ex_late')] })
    const found = r.execs.lookup('ex_late')
    setTimeout(() => r.connect('sb', true), 300)
    const entry = await Promise.race([found, new Promise<'hung'>((resolve) => setTimeout(() => resolve('hung'), 4000))])
    expect(entry).not.toBe('hung')
    expect((entry as { id: string }).id).toBe('ex_late')
  })

  it('waits out the window for an id nobody reports, then finds nothing; after it, answers at once', async () => {
    const r = rig({ sessionWaitMs: 600, list: async () => [] })
    const t0 = Date.now()
    expect(await r.execs.lookup('ex_nobody')).toBeUndefined()
    const waited = Date.now() - t0
    expect(waited).toBeGreaterThanOrEqual(500)
    expect(waited).toBeLessThan(3000)
    const t1 = Date.now()
    expect(await r.execs.lookup('ex_nobody')).toBeUndefined()
    expect(Date.now() - t1).toBeLessThan(50)
  })
})
