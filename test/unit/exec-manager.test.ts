import { afterEach, describe, expect, it } from 'vitest'
import { pino } from 'pino'
import { GatewayEvents, subscribeGateway, type ExecCreatedMessage, type ExecEndedMessage } from '../../src/diagnostics.js'
import { ExecManager } from '../../src/execs/manager.js'
import { validateExecRequest } from '../../src/execs/validate.js'
import { Refusals } from '../../src/refusals.js'
import { SessionRegistry, type SupervisorSession } from '../../src/relay/sessions.js'
import { SshPool } from '../../src/relay/ssh-pool.js'
import { waitFor } from '../helpers/wait.js'

// The exec layer's accounting, with a real registry and pool but no supervisor that ever opens
// a relay: execs wait for a session or a relay, so admission, slots and events can be watched.

const silent = pino({ level: 'silent' })

interface Rig {
  registry: SessionRegistry
  pool: SshPool
  execs: ExecManager
  created: ExecCreatedMessage[]
  ended: ExecEndedMessage[]
  connect: (sandboxId: string) => SupervisorSession
}

const cleanups: Array<() => Promise<void> | void> = []
afterEach(async () => { for (const c of cleanups.splice(0)) await c() })

function rig (opts: { maxPendingRelaysPerSandbox?: number, maxRunningExecsPerSandbox?: number, sessionWaitMs?: number } = {}): Rig {
  const events = new GatewayEvents()
  const registry = new SessionRegistry({ sessionWaitMs: opts.sessionWaitMs ?? 10_000, relayOpenTimeoutMs: 10_000, maxPendingRelaysPerSandbox: opts.maxPendingRelaysPerSandbox ?? 8, logger: silent })
  const refusals = new Refusals({ logger: silent, events, linesPerMinute: 10 })
  const pool = new SshPool({
    registry,
    privateKey: '',
    keepaliveIntervalMs: 1000,
    keepaliveCountMax: 1,
    readyTimeoutMs: 1000,
    pooling: true,
    // Every exec needs a relay of its own.
    channelsPerConnection: 1,
    idleCloseMs: 1000,
    logger: silent,
    refusals,
    maxOpensPerSandbox: opts.maxPendingRelaysPerSandbox ?? 8,
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
    ...(opts.maxRunningExecsPerSandbox === undefined ? {} : { maxRunningExecsPerSandbox: opts.maxRunningExecsPerSandbox })
  })
  const created: ExecCreatedMessage[] = []
  const ended: ExecEndedMessage[] = []
  const unsubscribe = subscribeGateway(events.id, { execCreated: (m) => created.push(m), execEnded: (m) => ended.push(m) })
  cleanups.push(async () => {
    unsubscribe()
    await execs.close(0)
    pool.close()
    registry.close()
    refusals.close()
  })
  let n = 0
  const connect = (sandboxId: string): SupervisorSession => {
    const session: SupervisorSession = { id: `s${++n}`, sandboxId, connectedAt: new Date(), send: () => true, close: () => {} }
    registry.register(session)
    return session
  }
  return { registry, pool, execs, created, ended, connect }
}

const spec = validateExecRequest({ command: ['true'] })

describe('ExecManager accounting', () => {
  it('counts each sandbox\'s slots in the exec layer, and frees them when the runs end', async () => {
    const r = rig({ maxRunningExecsPerSandbox: 2 })
    r.registry.unregister(r.connect('a'))
    r.connect('b')
    const a1 = r.execs.create('a', spec)
    r.execs.create('a', spec)
    expect(r.execs.activeIn('a')).toBe(2)
    expect(() => r.execs.create('a', spec)).toThrow(/already has 2 execs running/)
    // Another sandbox has its own slots.
    r.execs.create('b', spec)
    expect(r.execs.activeIn('b')).toBe(1)
    r.execs.remove(a1)
    await waitFor(() => r.execs.activeIn('a') === 1, { timeoutMs: 2000 })
    expect(r.execs.get(a1.id)).toBeUndefined()
    expect(a1.toJSON()).toMatchObject({ status: 'failed', error: { code: 'exec_not_found' } })
  })

  it('refuses a sandbox it has never seen, and publishes nothing for it', () => {
    const r = rig()
    expect(() => r.execs.create('nobody', spec)).toThrow(/no sandbox nobody has ever connected/)
    expect(r.created).toEqual([])
  })

  it('publishes created and ended once per exec, with the error code of a failed one', async () => {
    const r = rig({ sessionWaitMs: 100 })
    r.registry.unregister(r.connect('gone'))
    const e = r.execs.create('gone', spec)
    expect(r.created).toEqual([expect.objectContaining({ execId: e.id, sandboxId: 'gone' })])
    await r.execs.waitForEnd(e)
    expect(e.error?.code).toBe('sandbox_unavailable')
    expect(r.execs.activeIn('gone')).toBe(0)
    expect(r.ended).toEqual([expect.objectContaining({ execId: e.id, sandboxId: 'gone', status: 'failed', code: 'sandbox_unavailable' })])
  })

  it('the pending-relay cap: execs beyond it are admitted and wait for a connection; the registry is never asked for more relays', async () => {
    const r = rig({ maxPendingRelaysPerSandbox: 1 })
    r.connect('capped')
    const x = r.execs.create('capped', spec)
    await waitFor(() => r.registry.pendingCount('capped') === 1, { timeoutMs: 2000 })
    const y = r.execs.create('capped', spec)
    await waitFor(() => r.pool.queued('capped') === 1, { timeoutMs: 2000 })
    expect(r.execs.list({ sandboxId: 'capped' })).toHaveLength(2)
    expect(r.registry.pendingCount('capped')).toBe(1)
    expect(x.finished || y.finished).toBe(false)
    // Admitted while the sandbox had no session: one open waits for it, the other exec behind it.
    r.registry.unregister(r.connect('late'))
    const [a, b] = [r.execs.create('late', spec), r.execs.create('late', spec)]
    r.connect('late')
    await waitFor(() => r.registry.pendingCount('late') === 1, { timeoutMs: 2000 })
    expect(r.pool.queued('late')).toBe(1)
    expect(a.finished || b.finished).toBe(false)
  })
})
