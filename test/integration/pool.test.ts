import { describe, it, expect, afterEach } from 'vitest'
import { startGateway, type TestGateway } from '../helpers/gateway.js'
import { startSupervisorProcess } from '../helpers/supervisor-process.js'
import { startOpenSshd, sandboxAccount } from '../helpers/openssh.js'
import { startTcpProxy } from '../helpers/tcp-proxy.js'
import { execStart, execWait } from '../helpers/api.js'
import { sleep, waitFor } from '../helpers/wait.js'
import type { GatewayConfig } from '../../src/config.js'

// Warm SSH connections: execs run as channels on pooled connections to each sandbox, without
// giving up a single liveness rule.

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!().catch(() => {})
})

async function opensshSandbox (overrides: Partial<GatewayConfig>, sshdConfig: string[] = [], viaProxy = false): Promise<{ g: TestGateway, id: string, proxy?: Awaited<ReturnType<typeof startTcpProxy>> }> {
  const g = await startGateway(overrides)
  cleanups.push(async () => { await g.close() })
  const sshd = await startOpenSshd({ authorizedKeys: [g.gw.identity.publicKey], extraConfig: sshdConfig })
  cleanups.push(async () => { await sshd.close() })
  let target = `${sshd.host}:${sshd.port}`
  let proxy: Awaited<ReturnType<typeof startTcpProxy>> | undefined
  if (viaProxy) {
    proxy = await startTcpProxy({ targetHost: sshd.host, targetPort: sshd.port })
    const p = proxy
    cleanups.push(async () => { await p.close() })
    target = `${proxy.host}:${proxy.port}`
  }
  const id = 'pooled'
  const sup = startSupervisorProcess({ gatewayUrl: g.supervisorUrl, sandboxId: id, token: g.token(id), sshTarget: target, sshUser: sandboxAccount() })
  cleanups.push(async () => { await sup.stop() })
  await g.waitConnected(id)
  return { g, id, ...(proxy === undefined ? {} : { proxy }) }
}

function peakConnections (g: TestGateway, id: string): { stop: () => number } {
  let peak = 0
  const t = setInterval(() => { peak = Math.max(peak, g.gw.pool.stats(id).connections) }, 5)
  return { stop: () => { clearInterval(t); return Math.max(peak, g.gw.pool.stats(id).connections) } }
}

describe('SSH connection pool', () => {
  it('sequential execs reuse one warm connection', async () => {
    const { g, id } = await opensshSandbox({ sshPool: true })
    const peak = peakConnections(g, id)
    for (let i = 0; i < 20; i++) {
      const r = await execWait(g.publicUrl, id, { command: ['echo', String(i)] })
      expect(r.body).toMatchObject({ exitCode: 0, stdout: `${i}\n` })
    }
    expect(peak.stop()).toBe(1)
  })

  it('concurrent execs share connections, at most --ssh-channels-per-connection each', async () => {
    const { g, id } = await opensshSandbox({ sshPool: true, sshChannelsPerConnection: 4 })
    const peak = peakConnections(g, id)
    const results = await Promise.all(Array.from({ length: 12 }, (_, i) => execWait(g.publicUrl, id, { command: ['sh', '-c', `sleep 0.5; echo ${i}; exit ${i}`] })))
    results.forEach((r, i) => expect(r.body).toMatchObject({ status: 'exited', exitCode: i, stdout: `${i}\n` }))
    const n = peak.stop()
    expect(n).toBeGreaterThanOrEqual(3)
    expect(n).toBeLessThanOrEqual(4)
  })

  it('fast execs on warm connections never lose their exit status (reply, output, exit and close in one read)', async () => {
    const { g, id } = await opensshSandbox({ sshPool: true })
    const failures: string[] = []
    await Promise.all(Array.from({ length: 20 }, async (_, w) => {
      for (let i = 0; i < 15; i++) {
        const r = await execWait(g.publicUrl, id, { command: ['sh', '-c', `echo ${w}-${i}; exit ${i}`] })
        if (r.status !== 200 || r.body.exitCode !== i || r.body.stdout !== `${w}-${i}\n`) failures.push(`${w}-${i}: ${r.status} ${JSON.stringify(r.body).slice(0, 160)}`)
      }
    }))
    expect(failures).toEqual([])
  })

  it('idle connections close after --ssh-idle-close-ms', async () => {
    const { g, id } = await opensshSandbox({ sshPool: true, sshIdleCloseMs: 300 })
    await execWait(g.publicUrl, id, { command: ['true'] })
    expect(g.gw.pool.stats(id).connections).toBe(1)
    await waitFor(() => g.gw.pool.stats(id).connections === 0, { timeoutMs: 2000, intervalMs: 20 })
  })

  it('a channel the sshd refuses (MaxSessions) is retried on a fresh connection, never run twice', async () => {
    const { g, id } = await opensshSandbox({ sshPool: true, sshChannelsPerConnection: 6 }, ['MaxSessions 2'])
    const results = await Promise.all(Array.from({ length: 6 }, (_, i) => execWait(g.publicUrl, id, { command: ['sh', '-c', `sleep 0.3; echo run-${i}`] })))
    results.forEach((r, i) => expect(r.body).toMatchObject({ exitCode: 0, stdout: `run-${i}\n` }))
  })

  it('a pooled connection that dies ends every exec on it with 503, and the next exec gets a fresh connection', async () => {
    const { g, id, proxy } = await opensshSandbox({ sshPool: true, sshKeepaliveIntervalMs: 300, sshKeepaliveCountMax: 2 }, [], true)
    const ids = await Promise.all([0, 1, 2].map(() => execStart(g.publicUrl, id, { command: ['sh', '-c', 'echo up; sleep 20'] })))
    await waitFor(() => ids.every((x) => (g.gw.execs.get(x)?.stdout.total ?? 0) > 0), { timeoutMs: 5000, intervalMs: 20 })
    expect(g.gw.pool.stats(id).connections).toBe(1)
    proxy!.resetAll()
    await waitFor(() => ids.every((x) => g.gw.execs.get(x)!.finished), { timeoutMs: 3000, intervalMs: 20 })
    for (const x of ids) expect(g.gw.execs.get(x)!.toJSON()).toMatchObject({ status: 'failed', error: { code: 'relay_unavailable' }, stdoutBytes: 3 })
    const r = await execWait(g.publicUrl, id, { command: ['echo', 'fresh'] })
    expect(r.body).toMatchObject({ exitCode: 0, stdout: 'fresh\n' })
  })

  it('with --ssh-pool false every exec has its own connection, closed when it ends', async () => {
    const { g, id } = await opensshSandbox({ sshPool: false })
    const peak = peakConnections(g, id)
    const results = await Promise.all(Array.from({ length: 5 }, () => execWait(g.publicUrl, id, { command: ['sleep', '0.3'] })))
    results.forEach((r) => expect(r.body.exitCode).toBe(0))
    expect(peak.stop()).toBe(5)
    await sleep(50)
    expect(g.gw.pool.stats(id).connections).toBe(0)
  })
})
