import { afterEach, describe, expect, it } from 'vitest'
import { api, execStart, execWait } from '../helpers/api.js'
import { createFaultKit, FAST } from '../helpers/fault-kit.js'
import { waitFor, sleep, timed } from '../helpers/wait.js'

// A deleted exec gives its slot back within a bound, whether its command is alive (the kill ends
// it) or its exit report will never come (a daemon that lost it); and a timed-out exec leaves no
// timer behind.

const kit = createFaultKit(FAST)
const { gateway, supervisor, scripted } = kit
afterEach(async () => { await kit.cleanup() })

const activeExecs = async (url: string, id: string): Promise<number> => (await api(url, 'GET', `/v1/sandboxes/${id}`)).body.activeExecs

describe('exec slots', () => {
  it('deleting running execs frees their slots: with --max-running-execs-per-sandbox 2, two deleted execs let the next ones run (embedded daemon)', async () => {
    const g = await gateway({ maxRunningExecsPerSandbox: 2 })
    supervisor(g, 'slots')
    await g.waitConnected('slots')
    const ids = [await execStart(g.publicUrl, 'slots', { command: ['sleep', '30'] }), await execStart(g.publicUrl, 'slots', { command: ['sleep', '30'] })]
    await waitFor(async () => (await Promise.all(ids.map(async (id) => (await api(g.publicUrl, 'GET', `/v1/execs/${id}`)).body.status))).every((s) => s === 'running'), { timeoutMs: 10_000 })
    expect((await api(g.publicUrl, 'POST', '/v1/sandboxes/slots/execs', { command: ['true'] })).status).toBe(429)
    for (const id of ids) expect((await api(g.publicUrl, 'DELETE', `/v1/execs/${id}`)).status).toBe(204)
    await waitFor(async () => await activeExecs(g.publicUrl, 'slots') === 0, { timeoutMs: 5000 })
    const r = await execWait(g.publicUrl, 'slots', { command: ['sh', '-c', 'echo free; exit 4'] })
    expect(r.body).toMatchObject({ exitCode: 4, stdout: 'free\n' })
  })

  it('deleting execs whose exit report never comes frees their slots within closeWaitMs + 2 s after the kill (scripted sshd)', async () => {
    const g = await gateway({ maxRunningExecsPerSandbox: 3 })
    const s = await scripted(({ command, channel }) => {
      if (command.includes('hang-forever')) { channel.write('stuck\n'); return } // never EOF, exit or close
      // Every other request (the kill's side channel among them) ends at once: nothing carried the tag.
      channel.exit(1)
      channel.close()
    })
    supervisor(g, 'wedged', { sshTarget: `${s.host}:${s.port}` })
    await g.waitConnected('wedged')
    const ids: string[] = []
    for (let i = 0; i < 3; i++) ids.push(await execStart(g.publicUrl, 'wedged', { command: ['hang-forever'] }))
    await waitFor(() => g.gw.execs.list({ sandboxId: 'wedged' }).every((e) => e.stdout.total === 6), { timeoutMs: 10_000 })
    expect((await api(g.publicUrl, 'POST', '/v1/sandboxes/wedged/execs', { command: ['true'] })).status).toBe(429)
    for (const id of ids) expect((await api(g.publicUrl, 'DELETE', `/v1/execs/${id}`)).status).toBe(204)
    // Gone from the list at once; the slots follow within the kill bound.
    expect((await api(g.publicUrl, 'GET', '/v1/execs?sandboxId=wedged')).body.execs ?? []).toHaveLength(0)
    const { ms } = await timed(waitFor(async () => await activeExecs(g.publicUrl, 'wedged') === 0, { timeoutMs: 10_000, intervalMs: 50 }))
    expect(ms).toBeLessThan(FAST.closeWaitMs! + 2000 + 2000)
    expect(g.gw.execs.running).toBe(0)
    const again = await api(g.publicUrl, 'POST', '/v1/sandboxes/wedged/execs', { command: ['echo', 'next'] })
    expect(again.status).toBe(201)
  })

  it.each(['embedded', 'openssh'] as const)('a timed-out exec leaves no timer behind once it has ended (%s)', async (daemon) => {
    const g = await gateway()
    if (daemon === 'openssh') {
      const sshd = await kit.openssh(g)
      const { sandboxAccount } = await import('../helpers/openssh.js')
      supervisor(g, 'timers', { sshTarget: `${sshd.host}:${sshd.port}`, sshUser: sandboxAccount() })
    } else {
      supervisor(g, 'timers')
    }
    await g.waitConnected('timers')
    // Warm the connection (pool, keepalive) so the baseline holds the same long-lived timers.
    expect((await execWait(g.publicUrl, 'timers', { command: ['true'] })).body.exitCode).toBe(0)
    await sleep(200)
    const timeouts = (): number => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length
    const baseline = timeouts()
    for (let i = 0; i < 3; i++) {
      const r = await execWait(g.publicUrl, 'timers', { command: ['sleep', '30'], timeoutSeconds: 1 })
      expect(r.body).toMatchObject({ status: 'exited', exitCode: 124, timedOut: true })
    }
    // The kill's side channel may answer just after the exit report: give it time to land.
    await sleep(500)
    expect(timeouts()).toBeLessThanOrEqual(baseline)
    expect(g.gw.execs.running).toBe(0)
  })
})
