import { describe, it, expect, afterEach } from 'vitest'
import { createServer, type Socket } from 'node:net'
import { generateEd25519KeyPair } from '../../src/ssh-keys.js'
import type { TestGateway } from '../helpers/gateway.js'
import { startOpenSshd, sandboxAccount } from '../helpers/openssh.js'
import { startTcpProxy, type TcpProxy } from '../helpers/tcp-proxy.js'
import { api, execStart, execWait } from '../helpers/api.js'
import { sleep, timed, waitFor } from '../helpers/wait.js'
import { createFaultKit, FAST } from '../helpers/fault-kit.js'

// The liveness backstops of docs/api.md §5, made to fire for real: stopped and killed supervisor
// processes, a blackholed TCP link, OpenSSH with a background child, and ssh2 servers scripted
// to misbehave. Intervals are a few hundred ms; the bounds are asserted with slack.

const KEEPALIVE_BOUND = 300 * (3 + 1)
const PING_BOUND = 400 + 400
const SLACK = 1500
const REATTACH_BOUND = FAST.reattachTimeoutMs!

const kit = createFaultKit(FAST)
const { gateway, supervisor, openssh, scripted } = kit
afterEach(async () => {
  await kit.cleanup()
})

async function waitRunning (g: TestGateway, id: string): Promise<void> {
  await waitFor(async () => (await api(g.publicUrl, 'GET', `/v1/execs/${id}`)).body.status === 'running', { timeoutMs: 5000, intervalMs: 20 })
}

async function waitEnded (g: TestGateway, id: string, timeoutMs: number): Promise<any> {
  let exec: any
  await waitFor(async () => {
    exec = (await api(g.publicUrl, 'GET', `/v1/execs/${id}`)).body
    return exec.status === 'exited' || exec.status === 'failed'
  }, { timeoutMs, intervalMs: 20 })
  return exec
}

describe('supervisor process faults', () => {
  it('SIGSTOP of the supervisor mid-exec → 503 relay_unavailable within the keepalive/ping bound plus the reattach bound; SIGCONT → it serves again', async () => {
    const g = await gateway()
    const sup = supervisor(g, 'stop-me')
    await g.waitConnected('stop-me')
    const id = await execStart(g.publicUrl, 'stop-me', { command: ['sh', '-c', 'echo started; sleep 8'] })
    await waitRunning(g, id)
    sup.signal('SIGSTOP')
    // The exec is kept by the embedded daemon: the gateway tries to reattach for
    // --reattach-timeout-ms before it gives up on a sandbox that does not answer.
    const bound = Math.max(KEEPALIVE_BOUND, PING_BOUND) + REATTACH_BOUND + SLACK
    const { value: exec, ms } = await timed(waitEnded(g, id, bound))
    expect(exec.status).toBe('failed')
    expect(exec.exitCode).toBeNull()
    expect(exec.error).toMatchObject({ code: 'relay_unavailable', status: 503 })
    expect(exec.error.detail).toMatch(/reattach/)
    expect(ms).toBeLessThan(bound)
    await g.waitDisconnected('stop-me', PING_BOUND + SLACK)
    expect((await api(g.publicUrl, 'GET', '/v1/sandboxes/stop-me')).body.status).toBe('disconnected')
    sup.signal('SIGCONT')
    await g.waitConnected('stop-me', 10_000)
    const r = await execWait(g.publicUrl, 'stop-me', { command: ['echo', 'back'] })
    expect(r.body).toMatchObject({ exitCode: 0, stdout: 'back\n' })
  })

  it('?wait=true caller gets 503 relay_unavailable when the supervisor is SIGKILLed mid-exec, within the reattach bound + 3 s', async () => {
    const g = await gateway()
    const sup = supervisor(g, 'kill-me')
    await g.waitConnected('kill-me')
    const pending = timed(execWait(g.publicUrl, 'kill-me', { command: ['sh', '-c', 'echo partial; sleep 5'] }))
    await waitFor(() => g.gw.execs.list({ sandboxId: 'kill-me', status: 'running' }).some((e) => e.stdout.total > 0), { timeoutMs: 5000, intervalMs: 10 })
    const killedAt = Date.now()
    sup.signal('SIGKILL')
    const { value: r } = await pending
    expect(Date.now() - killedAt).toBeLessThan(REATTACH_BOUND + 3000)
    expect(r.status).toBe(503)
    expect(r.body.detail).toMatch(/reattach/)
    expect(r.headers.get('content-type')).toContain('application/problem+json')
    expect(r.body).toMatchObject({ code: 'relay_unavailable', status: 503 })
    expect(r.body.execId).toMatch(/^ex_/)
    const rec = (await api(g.publicUrl, 'GET', `/v1/execs/${r.body.execId}`)).body
    expect(rec).toMatchObject({ status: 'failed', exitCode: null, signal: null, stdoutBytes: 8 })
  })

  it('no supervisor → 503 sandbox_unavailable after --session-wait-ms', async () => {
    const g = await gateway()
    const sup = supervisor(g, 'gone')
    await g.waitConnected('gone')
    await sup.stop()
    await g.waitDisconnected('gone')
    const { value: r, ms } = await timed(execWait(g.publicUrl, 'gone', { command: ['true'] }))
    expect(r.status).toBe(503)
    expect(r.body.code).toBe('sandbox_unavailable')
    expect(ms).toBeGreaterThanOrEqual(1500 - 50)
    expect(ms).toBeLessThan(1500 + SLACK)
  })

  it('a supervisor that comes back during the session wait serves the exec', async () => {
    const g = await gateway({ sessionWaitMs: 8000 })
    const first = supervisor(g, 'flappy')
    await g.waitConnected('flappy')
    await first.stop()
    await g.waitDisconnected('flappy')
    const pending = execWait(g.publicUrl, 'flappy', { command: ['sh', '-c', 'echo hello; exit 4'] })
    await sleep(500)
    supervisor(g, 'flappy')
    const r = await pending
    expect(r.status).toBe(200)
    expect(r.body).toMatchObject({ exitCode: 4, stdout: 'hello\n' })
  })

  it('an unknown sandbox is 404 at once', async () => {
    const g = await gateway()
    const { value: r, ms } = await timed(execWait(g.publicUrl, 'never-seen', { command: ['true'] }))
    expect(r.status).toBe(404)
    expect(r.body.code).toBe('sandbox_not_found')
    expect(ms).toBeLessThan(500)
  })

  it('a supervisor that cannot reach its SSH daemon → 503 relay_unavailable saying why', async () => {
    const g = await gateway()
    supervisor(g, 'no-sshd', { sshTarget: '127.0.0.1:1' })
    await g.waitConnected('no-sshd')
    const r = await execWait(g.publicUrl, 'no-sshd', { command: ['true'] })
    expect(r.status).toBe(503)
    expect(r.body.code).toBe('relay_unavailable')
    expect(r.body.detail).toContain('127.0.0.1:1')
  })
})

describe('relay and SSH faults', () => {
  it('a wedged relay (blackholed link to sshd, TCP healthy) → 503 within interval × (count-max + 1)', async () => {
    const g = await gateway()
    const sshd = await openssh(g)
    const proxy: TcpProxy = await startTcpProxy({ targetHost: sshd.host, targetPort: sshd.port })
    kit.defer(async () => { await proxy.close() })
    supervisor(g, 'wedge', { sshTarget: `${proxy.host}:${proxy.port}`, sshUser: sandboxAccount() })
    await g.waitConnected('wedge')
    const id = await execStart(g.publicUrl, 'wedge', { command: ['sleep', '30'] })
    await waitRunning(g, id)
    proxy.blackholeAll()
    const { value: exec, ms } = await timed(waitEnded(g, id, KEEPALIVE_BOUND + SLACK + 1000))
    expect(exec.status).toBe('failed')
    expect(exec.error.code).toBe('relay_unavailable')
    expect(exec.error.detail).toContain('keepalive')
    expect(ms).toBeLessThan(KEEPALIVE_BOUND + SLACK)
  })

  it('a command silent for 10× the keepalive interval ends with its real exit code (embedded and OpenSSH)', async () => {
    const g = await gateway({ sshKeepaliveIntervalMs: 200, sshKeepaliveCountMax: 2 })
    const sshd = await openssh(g)
    supervisor(g, 'quiet-embedded')
    supervisor(g, 'quiet-openssh', { sshTarget: `${sshd.host}:${sshd.port}`, sshUser: sandboxAccount() })
    await g.waitConnected('quiet-embedded')
    await g.waitConnected('quiet-openssh')
    const [a, b] = await Promise.all([
      execWait(g.publicUrl, 'quiet-embedded', { command: ['sh', '-c', 'sleep 2.2; exit 3'] }),
      execWait(g.publicUrl, 'quiet-openssh', { command: ['sh', '-c', 'sleep 2.2; exit 3'] })
    ])
    expect(a.body).toMatchObject({ status: 'exited', exitCode: 3 })
    expect(b.body).toMatchObject({ status: 'exited', exitCode: 3 })
  })

  it("OpenSSH: sh -c 'sleep 20 & echo bg; exit 3' → exit 3 within the close wait, despite the background child holding the pipes", async () => {
    const g = await gateway()
    const sshd = await openssh(g)
    supervisor(g, 'bg', { sshTarget: `${sshd.host}:${sshd.port}`, sshUser: sandboxAccount() })
    await g.waitConnected('bg')
    const { value: r, ms } = await timed(execWait(g.publicUrl, 'bg', { command: ['sh', '-c', 'sleep 20 & echo bg; exit 3'] }))
    expect(r.body).toMatchObject({ status: 'exited', exitCode: 3, stdout: 'bg\n' })
    expect(ms).toBeLessThan(500 + SLACK)
  })

  it('exit-status and then no channel close → the status after --close-wait-ms', async () => {
    const g = await gateway()
    const s = await scripted(({ channel }) => {
      channel.write('before\n')
      channel.exit(9)
      // never EOF, never close
    })
    supervisor(g, 'no-close', { sshTarget: `${s.host}:${s.port}` })
    await g.waitConnected('no-close')
    const { value: r, ms } = await timed(execWait(g.publicUrl, 'no-close', { command: ['anything'] }))
    expect(r.body).toMatchObject({ status: 'exited', exitCode: 9, stdout: 'before\n' })
    expect(ms).toBeGreaterThanOrEqual(450)
    expect(ms).toBeLessThan(500 + SLACK)
  })

  it('data arriving after exit-status inside the close wait is delivered before the exit', async () => {
    const g = await gateway()
    const s = await scripted(({ channel }) => {
      channel.write('early\n')
      channel.exit(0)
      setTimeout(() => { channel.write('late\n'); setTimeout(() => channel.close(), 50) }, 200)
    })
    supervisor(g, 'late-data', { sshTarget: `${s.host}:${s.port}` })
    await g.waitConnected('late-data')
    const r = await execWait(g.publicUrl, 'late-data', { command: ['x'] })
    expect(r.body).toMatchObject({ exitCode: 0, stdout: 'early\nlate\n' })
  })

  it('a channel closed without exit-status → 503 relay_unavailable, never exit 0 or 1', async () => {
    const g = await gateway()
    const s = await scripted(({ channel }) => {
      channel.write('some output\n')
      channel.end()
    })
    supervisor(g, 'no-status', { sshTarget: `${s.host}:${s.port}` })
    await g.waitConnected('no-status')
    const r = await execWait(g.publicUrl, 'no-status', { command: ['x'] })
    expect(r.status).toBe(503)
    expect(r.body.code).toBe('relay_unavailable')
    const rec = (await api(g.publicUrl, 'GET', `/v1/execs/${r.body.execId}`)).body
    expect(rec).toMatchObject({ status: 'failed', exitCode: null, signal: null, stdoutBytes: 12 })
  })

  it('exit-signal only is reported as the signal; exit status 0xFFFFFFFF as it was sent', async () => {
    const g = await gateway()
    const s = await scripted(({ command, channel }) => {
      if (command.endsWith(' sig')) channel.exit('TERM', false, 'terminated')
      else channel.exit(0xFFFFFFFF)
      channel.end()
    })
    supervisor(g, 'edges', { sshTarget: `${s.host}:${s.port}` })
    await g.waitConnected('edges')
    const a = await execWait(g.publicUrl, 'edges', { command: ['sig'] })
    expect(a.body).toMatchObject({ status: 'exited', exitCode: null, signal: 'TERM' })
    const b = await execWait(g.publicUrl, 'edges', { command: ['big'] })
    expect(b.body).toMatchObject({ status: 'exited', exitCode: 4294967295, signal: null })
  })
})

describe('SSH setup faults', () => {
  it('an SSH daemon that never speaks → 502 ssh_failed after --ssh-ready-timeout-ms', async () => {
    const g = await gateway({ sshReadyTimeoutMs: 1000 })
    const sockets = new Set<Socket>()
    const silent = createServer((s) => { sockets.add(s); s.on('error', () => {}) })
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve))
    kit.defer(async () => { for (const s of sockets) s.destroy(); await new Promise((resolve) => silent.close(resolve)) })
    const port = (silent.address() as { port: number }).port
    supervisor(g, 'mute-sshd', { sshTarget: `127.0.0.1:${port}` })
    await g.waitConnected('mute-sshd')
    const { value: r, ms } = await timed(execWait(g.publicUrl, 'mute-sshd', { command: ['true'] }))
    expect(r.status).toBe(502)
    expect(r.body.code).toBe('ssh_failed')
    expect(r.body.detail).toContain('1000 ms')
    expect(ms).toBeGreaterThanOrEqual(950)
    expect(ms).toBeLessThan(1000 + SLACK)
  })

  it('OpenSSH that does not authorize the gateway key → 502 ssh_failed, at once', async () => {
    const g = await gateway()
    const sshd = await startOpenSshd({ authorizedKeys: [generateEd25519KeyPair().public] })
    kit.defer(async () => { await sshd.close() })
    supervisor(g, 'not-authorized', { sshTarget: `${sshd.host}:${sshd.port}`, sshUser: sandboxAccount() })
    await g.waitConnected('not-authorized')
    const { value: r, ms } = await timed(execWait(g.publicUrl, 'not-authorized', { command: ['true'] }))
    expect(r.status).toBe(502)
    expect(r.body).toMatchObject({ code: 'ssh_failed', detail: 'the sandbox SSH daemon rejected the gateway key' })
    expect(ms).toBeLessThan(SLACK)
  })
})
