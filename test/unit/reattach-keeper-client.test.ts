import { afterEach, describe, expect, it } from 'vitest'
import { forgetKept, listKept, signalKept, statusKept } from '../../src/relay/keeper-client.js'
import { GatewayError } from '../../src/errors.js'
import { controlLine } from '../../src/schemas/keeper.js'
import { waitFor } from '../helpers/wait.js'
import { startRig, type Rig } from './reattach-rig.js'

// The keeper's control requests from the gateway side, over a real pool, relay and ssh2 client,
// against the rig's keeper daemon (honest) and its intercept (hostile or wedged).

const rigs: Rig[] = []
afterEach(async () => { for (const r of rigs.splice(0)) await r.close() })

async function rigWithExec (): Promise<{ r: Rig, id: string }> {
  const r = await startRig()
  rigs.push(r)
  const { entry } = r.start({ command: ['sleep', '100'] })
  await waitFor(() => r.kept.has(entry.id) && entry.startedAt !== undefined, { timeoutMs: 5000 })
  return { r, id: entry.id }
}

async function withConn<T> (r: Rig, use: (conn: Awaited<ReturnType<Rig['pool']['acquire']>>['conn']) => Promise<T>): Promise<T> {
  const lease = await r.pool.acquire('sb', AbortSignal.timeout(5000))
  try { return await use(lease.conn) } finally { lease.release() }
}

describe('keeper client', () => {
  it('lists the kept execs and reads one status', async () => {
    const { r, id } = await rigWithExec()
    const list = await listKept(r.pool, 'sb', AbortSignal.timeout(5000))
    expect(list.map((s) => s.meta.execId)).toEqual([id])
    const status = await withConn(r, async (c) => await statusKept(c, id, false))
    expect(status).toMatchObject({ state: 'running', stdinReceived: 0, attached: true, meta: { execId: id, command: ['sleep', '100'] } })
    expect(await withConn(r, async (c) => await statusKept(c, 'nope', false))).toBe('unknown')
  })

  it('status with detach cuts the attached channel off', async () => {
    const { r, id } = await rigWithExec()
    const status = await withConn(r, async (c) => await statusKept(c, id, true))
    expect(status).toMatchObject({ attached: false })
    expect(r.kept.get(id)!.channel).toBeUndefined()
  })

  it('signals through the keeper: true when running, false when unknown', async () => {
    const { r, id } = await rigWithExec()
    expect(await withConn(r, async (c) => await signalKept(c, id, 'USR1'))).toBe(true)
    expect(r.kept.get(id)!.signals).toEqual(['USR1'])
    expect(await withConn(r, async (c) => await signalKept(c, 'nope', 'USR1'))).toBe(false)
  })

  it('forgets an exec, and says when it did not know it', async () => {
    const { r, id } = await rigWithExec()
    expect(await forgetKept(r.pool, 'sb', id, AbortSignal.timeout(5000))).toBe(true)
    expect(r.kept.has(id)).toBe(false)
    expect(await forgetKept(r.pool, 'sb', id, AbortSignal.timeout(5000))).toBe(false)
  })

  it('refuses an answer that is not a status of that exec', async () => {
    const { r, id } = await rigWithExec()
    r.intercept = (command, channel) => {
      if (command !== controlLine({ op: 'status', execId: id, detach: false })) return false
      channel.write(JSON.stringify({ hello: 'world' }))
      channel.exit(0)
      channel.close()
      return true
    }
    await expect(withConn(r, async (c) => await statusKept(c, id, false))).rejects.toMatchObject({ code: 'ssh_failed' })
  })

  it('caps what a hostile daemon prints', async () => {
    const { r, id } = await rigWithExec()
    r.intercept = (command, channel) => {
      if (!command.startsWith('#exec-gateway status')) return false
      channel.write(Buffer.alloc(600 * 1024, 0x41))
      channel.exit(0)
      channel.close()
      return true
    }
    const err = await withConn(r, async (c) => await statusKept(c, id, false)).catch((e: unknown) => e)
    expect(GatewayError.is(err) && err.detail).toMatch(/exceeds/)
  })

  it('a daemon that never answers fails within the bound', async () => {
    const { r, id } = await rigWithExec()
    r.intercept = (command) => command.startsWith('#exec-gateway status')
    const t0 = performance.now()
    await expect(withConn(r, async (c) => await statusKept(c, id, false, 300))).rejects.toMatchObject({ code: 'relay_unavailable' })
    const took = performance.now() - t0
    expect(took).toBeGreaterThan(250)
    expect(took).toBeLessThan(2000)
  })

  it('the registry says which sandboxes keep execs and tells listeners of each registration', async () => {
    const { r } = await rigWithExec()
    expect(r.registry.keepsExecs('sb')).toBe(true)
    expect(r.registry.keepsExecs('other')).toBe(false)
    const seen: Array<[string, boolean]> = []
    const off = r.registry.onRegistered((id, info) => seen.push([id, info.keepsExecs]))
    r.connect()
    off()
    r.connect()
    expect(seen).toEqual([['sb', true]])
    r.disconnect()
    expect(r.registry.keepsExecs('sb')).toBe(false)
  })
})
