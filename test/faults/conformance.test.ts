import { describe, it, expect, afterEach, afterAll } from 'vitest'
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { connect, createServer, type Socket } from 'node:net'
import WebSocket from 'ws'
import type { TestGateway } from '../helpers/gateway.js'
import { startGatewayProcess, type GatewayProcess } from '../helpers/gateway-process.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { sandboxAccount } from '../helpers/openssh.js'
import { startFakeSupervisor } from '../helpers/fake-supervisor.js'
import { api, execStart, execWait, outputOf, readEvents, readWebSocket } from '../helpers/api.js'
import { sleep, timed, waitFor } from '../helpers/wait.js'
import { createFaultKit, FAST } from '../helpers/fault-kit.js'

// The fault conformance matrix: one named test per row of "every exec ends within a published
// bound with its true exit status or an honest 503". Rows already proven in backstops.test.ts
// (wedged relay, exit-status without close, late data, close without status, exit-signal only,
// 0xFFFFFFFF, unreachable sshd, SIGSTOP/SIGKILL of the supervisor, session wait) are not
// repeated here. Everything is real: supervisor and gateway processes, OpenSSH, TCP proxies,
// HTTP/2. Intervals are a few hundred ms; bounds are asserted with slack for a 2-core runner.

const PING_BOUND = 400 + 400
const SLACK = 1500
// A kept exec (embedded daemon) whose relay is lost waits this long for a reattach before its 503.
const REATTACH_BOUND = FAST.reattachTimeoutMs!

// Commands that outlive their exec (a reset relay, a killed gateway) would keep sleeping after
// the test; each such command records its pid (a process-group leader in both daemons) here.
const PID_DIR = mkdtempSync(join(tmpdir(), 'egw-conformance-'))
// Commands on OpenSSH run as the sandbox account and write their pids here.
chmodSync(PID_DIR, 0o1777)
const PID_FILE = join(PID_DIR, 'pids')
writeFileSync(PID_FILE, '')
function tracked (script: string): string[] {
  return ['sh', '-c', `echo $$ >> '${PID_FILE}'; ${script}`]
}
function killTracked (): void {
  const pids = readFileSync(PID_FILE, 'utf8').split('\n').map((l) => Number(l.trim())).filter((n) => Number.isInteger(n) && n > 1)
  for (const pid of pids) {
    try { process.kill(-pid, 'SIGKILL') } catch { /* gone, or not a group leader */ }
    try { process.kill(pid, 'SIGKILL') } catch { /* gone */ }
  }
  writeFileSync(PID_FILE, '')
}

const kit = createFaultKit(FAST)
const { gateway, supervisor, openssh, scripted, fakeSupervisor, proxyTo } = kit
afterEach(async () => {
  await kit.cleanup()
  killTracked()
})
afterAll(() => { rmSync(PID_DIR, { recursive: true, force: true }) })

// A TCP forwarder whose dead connections stay dead: unlike tcp-proxy's global blackhole, a
// connection blackholed here never carries a byte or a close again, even after new connections
// are let through (a NAT entry or route lost for one flow while fresh flows work).
interface DeadEndLink { host: string, port: number, letNewThrough: () => void, connections: () => number, close: () => Promise<void> }
async function deadEndLink (targetHost: string, targetPort: number): Promise<DeadEndLink> {
  let passNew = false
  const sockets = new Set<Socket>()
  const track = (s: Socket): void => { sockets.add(s); s.on('error', () => {}); s.once('close', () => sockets.delete(s)) }
  let count = 0
  const server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => {
    track(client)
    count++
    if (!passNew) return // accepted, never read, never answered, never closed
    const upstream = connect({ host: targetHost, port: targetPort, allowHalfOpen: true })
    track(upstream)
    client.pipe(upstream)
    upstream.pipe(client)
    client.once('close', () => upstream.destroy())
    upstream.once('close', () => client.destroy())
    client.resume()
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const link: DeadEndLink = {
    host: '127.0.0.1',
    port: (server.address() as { port: number }).port,
    letNewThrough: () => { passNew = true },
    connections: () => count,
    close: async () => {
      for (const s of sockets) s.destroy()
      await new Promise((resolve) => server.close(resolve))
    }
  }
  kit.defer(link.close)
  return link
}

function hostPort (url: string): { host: string, port: number } {
  const u = new URL(url)
  return { host: u.hostname, port: Number(u.port) }
}

async function getExec (baseUrl: string, id: string): Promise<any> {
  return (await api(baseUrl, 'GET', `/v1/execs/${id}`)).body
}

async function waitRunning (baseUrl: string, id: string): Promise<void> {
  await waitFor(async () => (await getExec(baseUrl, id)).status === 'running', { timeoutMs: 5000, intervalMs: 20, description: `exec ${id} running` })
}

async function waitEnded (baseUrl: string, id: string, timeoutMs: number): Promise<any> {
  let exec: any
  await waitFor(async () => {
    exec = await getExec(baseUrl, id)
    return exec.status === 'exited' || exec.status === 'failed'
  }, { timeoutMs, intervalMs: 20, description: `exec ${id} ended` })
  return exec
}

async function waitStdout (g: TestGateway, id: string, text: string): Promise<void> {
  await waitFor(() => g.gw.execs.get(id)?.stdout.tail().data.toString().includes(text) === true, { timeoutMs: 5000, intervalMs: 10, description: `stdout of ${id} has ${JSON.stringify(text)}` })
}

// Readers following the exec's live output (WebSocket, SSE, NDJSON).
function readers (g: TestGateway, id: string): number {
  return g.gw.execs.get(id)!.readers
}

function openWs (baseUrl: string, id: string): Promise<{ ws: WebSocket, events: any[] }> {
  const ws = new WebSocket(`${baseUrl.replace(/^http/, 'ws')}/v1/execs/${id}/stream`)
  const events: any[] = []
  ws.on('message', (data, isBinary) => { if (!isBinary) events.push(JSON.parse(data.toString())) })
  ws.on('error', () => {})
  kit.defer(async () => { ws.terminate() })
  return new Promise((resolve, reject) => {
    ws.once('open', () => resolve({ ws, events }))
    ws.once('unexpected-response', (_req, res) => reject(new Error(`websocket refused: ${res.statusCode}`)))
    ws.once('error', reject)
  })
}

// An events reader (SSE or NDJSON) that can be aborted mid-exec; `text` grows as bytes arrive.
async function openEventsReader (baseUrl: string, id: string, accept: string): Promise<{ text: () => string, abort: () => void, done: Promise<void> }> {
  const ctl = new AbortController()
  kit.defer(async () => { ctl.abort() })
  const res = await fetch(`${baseUrl}/v1/execs/${id}/events`, { headers: { accept }, signal: ctl.signal })
  expect(res.status).toBe(200)
  let text = ''
  const reader = res.body!.getReader()
  const decoder = new TextDecoder()
  const done = (async () => {
    try {
      for (;;) {
        const { value, done } = await reader.read()
        if (done) return
        text += decoder.decode(value, { stream: true })
      }
    } catch { /* aborted */ }
  })()
  return { text: () => text, abort: () => ctl.abort(), done }
}

describe('supervisor connection faults', () => {
  it('half-open supervisor connection → 503 within ping interval + timeout + the reattach bound, session removed, sandbox disconnected; a reconnect makes it usable again', async () => {
    // SSH keepalives far out of the way: only the HTTP/2 PING can catch this.
    const g = await gateway({ sshKeepaliveIntervalMs: 30_000, sessionWaitMs: 5000 })
    const sup = hostPort(g.supervisorUrl)
    const proxy = await proxyTo(sup.host, sup.port)
    supervisor(g, 'half-open', { gatewayUrl: `http://${proxy.host}:${proxy.port}` })
    await g.waitConnected('half-open')
    const id = await execStart(g.publicUrl, 'half-open', { command: tracked('echo started; sleep 15') })
    await waitRunning(g.publicUrl, id)
    await waitStdout(g, id, 'started\n')

    const blackholedAt = performance.now()
    proxy.blackholeAll()
    const exec = await waitEnded(g.publicUrl, id, PING_BOUND + REATTACH_BOUND + SLACK + 1000)
    const failedMs = performance.now() - blackholedAt
    expect(exec.status).toBe('failed')
    expect(exec.exitCode).toBeNull()
    expect(exec.error).toMatchObject({ code: 'relay_unavailable', status: 503 })
    expect(exec.stdoutBytes).toBe(8)
    expect(failedMs).toBeLessThan(PING_BOUND + REATTACH_BOUND + SLACK)

    // The session went with the connection.
    await g.waitDisconnected('half-open', 500)
    expect(performance.now() - blackholedAt).toBeLessThan(PING_BOUND + REATTACH_BOUND + SLACK)
    expect(g.gw.registry.get('half-open')!.session).toBeUndefined()
    expect((await api(g.publicUrl, 'GET', '/v1/sandboxes/half-open')).body).toMatchObject({ status: 'disconnected', activeExecs: 0 })

    // The link heals: the supervisor notices its own dead connection, reconnects, serves again.
    proxy.setMode('pass')
    await g.waitConnected('half-open', 15_000)
    const r = await execWait(g.publicUrl, 'half-open', { command: ['sh', '-c', 'echo back; exit 2'] })
    expect(r.status).toBe(200)
    expect(r.body).toMatchObject({ status: 'exited', exitCode: 2, stdout: 'back\n' })
    expect((await api(g.publicUrl, 'GET', '/v1/sandboxes/half-open')).body.status).toBe('connected')
  })

  it('a supervisor whose connection is dead before the session is accepted gives up on it and reconnects on a working path', async () => {
    const g = await gateway()
    const sup = hostPort(g.supervisorUrl)
    const link = await deadEndLink(sup.host, sup.port)
    const s = supervisor(g, 'dead-end', { gatewayUrl: `http://${link.host}:${link.port}` })
    // TCP connects (so the client's "connect" fires), then nothing ever comes back on that flow.
    await waitFor(() => link.connections() >= 1, { timeoutMs: 5000, description: 'supervisor dialled the link' })
    await sleep(300)
    link.letNewThrough()
    const dialled = link.connections()
    // Control: the path itself works again, a fresh connection through it is accepted at once.
    const control = await startFakeSupervisor({ supervisorUrl: `http://${link.host}:${link.port}`, token: g.token('dead-end-control') })
    await control.close()
    // Any bound the supervisor could reasonably use (its 10 s connect bound, or its capped
    // 10 s + 20 s PING bounds) plus the 5 s maximum backoff is well inside this.
    const RECONNECT_BOUND = 10_000 + 20_000 + 5000 + SLACK
    try {
      await g.waitConnected('dead-end', RECONNECT_BOUND)
    } catch (err) {
      throw new Error(`the supervisor never left the dead connection (it dialled ${dialled} connection(s) before the path healed and ${link.connections() - dialled - 1} after; waited ${RECONNECT_BOUND} ms): ${(err as Error).message}\nsupervisor log tail:\n${s.output().slice(-2000)}`)
    }
    const r = await execWait(g.publicUrl, 'dead-end', { command: ['echo', 'found-a-way'] })
    expect(r.body).toMatchObject({ exitCode: 0, stdout: 'found-a-way\n' })
  }, 60_000)

  it('supervisor that never opens the relay → 504 relay_open_timeout after --relay-open-timeout-ms', async () => {
    const g = await gateway()
    const fake = await fakeSupervisor(g, 'mute', { onRelay: 'ignore' })
    await g.waitConnected('mute')
    const { value: r, ms } = await timed(execWait(g.publicUrl, 'mute', { command: ['true'] }))
    expect(r.status).toBe(504)
    expect(r.headers.get('content-type')).toContain('application/problem+json')
    expect(r.body).toMatchObject({ code: 'relay_open_timeout', status: 504 })
    expect(ms).toBeGreaterThanOrEqual(1500 - 50)
    expect(ms).toBeLessThan(1500 + SLACK)
    expect(fake.relayRequests).toHaveLength(1)
    const rec = await getExec(g.publicUrl, r.body.execId)
    expect(rec).toMatchObject({ status: 'failed', exitCode: null, signal: null, error: { code: 'relay_open_timeout', status: 504 } })
    expect(g.gw.registry.pendingCount('mute')).toBe(0)
    expect((await api(g.publicUrl, 'GET', '/v1/sandboxes/mute')).body).toMatchObject({ status: 'connected', activeExecs: 0 })
  })

  it('pending-relay cap per sandbox: the supervisor is asked for at most that many relays; more execs queue (no 429) and share the failure of the opens they waited for; other sandboxes are unaffected', async () => {
    // One exec per connection, so that every exec needs a relay of its own, pooled or not.
    const g = await gateway({ maxPendingRelaysPerSandbox: 2, relayOpenTimeoutMs: 20_000, sshChannelsPerConnection: 1 })
    const fake = await fakeSupervisor(g, 'capped', { onRelay: 'ignore' })
    supervisor(g, 'free')
    await g.waitConnected('capped')
    await g.waitConnected('free')

    const a = await execStart(g.publicUrl, 'capped', { command: ['true'] })
    const b = await execStart(g.publicUrl, 'capped', { command: ['true'] })
    await fake.waitRelays(2)
    await waitFor(() => g.gw.registry.pendingCount('capped') === 2, { timeoutMs: 2000, description: 'two relays pending' })

    // Beyond the cap an exec is admitted and waits for a connection; the supervisor is not asked.
    const { value: c, ms } = await timed(execStart(g.publicUrl, 'capped', { command: ['true'] }))
    expect(ms).toBeLessThan(1000)
    const waiting = timed(execWait(g.publicUrl, 'capped', { command: ['true'] }))
    await waitFor(() => g.gw.pool.queued('capped') === 2, { timeoutMs: 2000, description: 'two execs queued for a connection' })
    expect(g.gw.execs.list({ sandboxId: 'capped' })).toHaveLength(4)
    await sleep(200)
    expect(fake.relayRequests).toHaveLength(2)
    expect(g.gw.registry.pendingCount('capped')).toBe(2)

    // Another sandbox is not affected: it has its own cap (here used to the full, 2 at a time).
    for (const round of [0, 2]) {
      const others = await Promise.all([1, 2].map(async (n) => await execWait(g.publicUrl, 'free', { command: ['sh', '-c', `echo free-${round + n}; exit ${round + n}`] })))
      others.forEach((r, i) => {
        expect(r.status).toBe(200)
        expect(r.body).toMatchObject({ status: 'exited', exitCode: round + i + 1, stdout: `free-${round + i + 1}\n` })
      })
    }
    expect(g.gw.registry.pendingCount('capped')).toBe(2)

    // The waiting relays are refused by the supervisor: the sandbox served no connection since
    // the queued execs came, so they end with the same error as the execs whose relays those were.
    fake.failRelay(fake.relayRequests[0]!, 'no room at the inn')
    fake.failRelay(fake.relayRequests[1]!, 'no room at the inn')
    const [ea, eb, ec] = await Promise.all([waitEnded(g.publicUrl, a, 3000), waitEnded(g.publicUrl, b, 3000), waitEnded(g.publicUrl, c, 3000)])
    for (const e of [ea, eb, ec]) {
      expect(e).toMatchObject({ status: 'failed', exitCode: null, error: { code: 'relay_unavailable', status: 503 } })
      expect(e.error.detail).toContain('no room at the inn')
    }
    const { value: w, ms: waitedMs } = await waiting
    expect(w.status).toBe(503)
    expect(w.body).toMatchObject({ code: 'relay_unavailable' })
    expect(waitedMs).toBeLessThan(20_000)
    expect(fake.relayRequests).toHaveLength(2)
    expect(g.gw.registry.pendingCount('capped')).toBe(0)
    expect(g.gw.pool.queued('capped')).toBe(0)
    const again = await api(g.publicUrl, 'POST', '/v1/sandboxes/capped/execs', { command: ['true'] })
    expect(again.status).toBe(201)
  })

  it('execs queued behind a supervisor that never opens relays end with relay_open_timeout after one --relay-open-timeout-ms, not one per wave of opens (--ssh-pool false)', async () => {
    const g = await gateway({ maxPendingRelaysPerSandbox: 2, sshPool: false })
    const fake = await fakeSupervisor(g, 'mute-queue', { onRelay: 'ignore' })
    await g.waitConnected('mute-queue')
    const { value: results, ms } = await timed(Promise.all(Array.from({ length: 6 }, async () => await execWait(g.publicUrl, 'mute-queue', { command: ['true'] }))))
    for (const r of results) expect(r.body).toMatchObject({ status: 504, code: 'relay_open_timeout' })
    expect(ms).toBeGreaterThanOrEqual(1500 - 50)
    expect(ms).toBeLessThan(1500 + SLACK)
    expect(fake.relayRequests).toHaveLength(2)
    expect(g.gw.registry.pendingCount('mute-queue')).toBe(0)
  })

  it('a second supervisor for the same sandbox supersedes the first, and pending relays complete on the new one', async () => {
    const g = await gateway({ relayOpenTimeoutMs: 15_000 })
    const first = await fakeSupervisor(g, 'twice', { onRelay: 'ignore' })
    await g.waitConnected('twice')
    const pending = timed(execWait(g.publicUrl, 'twice', { command: ['sh', '-c', 'echo via-new; exit 6'] }))
    await first.waitRelays(1)
    expect(g.gw.registry.pendingCount('twice')).toBe(1)

    supervisor(g, 'twice')
    const { value: r, ms } = await pending
    expect(r.status).toBe(200)
    expect(r.body).toMatchObject({ status: 'exited', exitCode: 6, stdout: 'via-new\n' })
    // Served by the new session, not ended by the relay-open timeout.
    expect(ms).toBeLessThan(15_000 - 1000)

    // The first one was told, and its session was closed by the gateway.
    await waitFor(() => first.superseded() && first.sessionClosed(), { timeoutMs: 2000 + SLACK, description: 'first supervisor superseded and closed' })
    expect(first.messages.some((m) => m.type === 'superseded')).toBe(true)
    expect(first.relayRequests).toHaveLength(1)
    expect(g.gw.registry.get('twice')!.session!.id).not.toBe(first.accepted.sessionId)
    expect((await api(g.publicUrl, 'GET', '/v1/sandboxes/twice')).body.status).toBe('connected')
    const again = await execWait(g.publicUrl, 'twice', { command: ['echo', 'still'] })
    expect(again.body).toMatchObject({ exitCode: 0, stdout: 'still\n' })
  })

  it('a superseded supervisor process does not take the sandbox back: the newer one keeps it and its exec completes', async () => {
    const g = await gateway()
    const older = supervisor(g, 'no-ping-pong')
    await g.waitConnected('no-ping-pong')
    const olderSession = g.gw.registry.get('no-ping-pong')!.session!.id
    const newer = supervisor(g, 'no-ping-pong')
    await waitFor(() => g.gw.registry.get('no-ping-pong')?.session?.id !== olderSession && g.gw.registry.get('no-ping-pong')?.session !== undefined,
      { timeoutMs: 10_000, intervalMs: 10, description: 'the newer supervisor registered' })
    const newerSession = g.gw.registry.get('no-ping-pong')!.session!.id
    // Longer than the supervisor's maximum reconnect backoff (5 s): a superseded supervisor
    // that simply reconnects would have taken the sandbox back (and cut this exec's relay) by then.
    const sessions = new Set<string>([newerSession])
    let watching = true
    const watch = (async () => {
      // eslint-disable-next-line no-unmodified-loop-condition -- the test clears it while the loop awaits
      while (watching) {
        const id = g.gw.registry.get('no-ping-pong')?.session?.id
        if (id !== undefined) sessions.add(id)
        await sleep(20)
      }
    })()
    const r = await execWait(g.publicUrl, 'no-ping-pong', { command: ['sh', '-c', 'sleep 6.5; echo kept; exit 3'] })
    watching = false
    await watch
    const describeLogs = (): string => `older supervisor log:\n${older.output().slice(-1500)}\nnewer supervisor log:\n${newer.output().slice(-1500)}`
    expect(r.body, `the exec on the newer supervisor: ${r.status} ${r.text}`).toMatchObject({ status: 'exited', exitCode: 3, stdout: 'kept\n' })
    expect(sessions.size, `the sandbox changed hands ${sessions.size - 1} time(s) after the newer supervisor took over\n${describeLogs()}`).toBe(1)
  })

  it('new execs after a supervisor SIGKILL wait for the reconnect and succeed', async () => {
    const g = await gateway({ sessionWaitMs: 10_000 })
    const sup = supervisor(g, 'phoenix')
    await g.waitConnected('phoenix')
    sup.signal('SIGKILL')
    await g.waitDisconnected('phoenix', PING_BOUND + SLACK)
    const pending = timed(execWait(g.publicUrl, 'phoenix', { command: ['sh', '-c', 'echo reborn; exit 5'] }))
    const pending2 = execWait(g.publicUrl, 'phoenix', { command: ['sh', '-c', 'echo twice; exit 6'] })
    await sleep(500)
    expect(g.gw.execs.list({ sandboxId: 'phoenix' }).every((e) => e.status === 'pending')).toBe(true)
    supervisor(g, 'phoenix')
    const { value: r, ms } = await pending
    expect(r.status).toBe(200)
    expect(r.body).toMatchObject({ status: 'exited', exitCode: 5, stdout: 'reborn\n' })
    expect(ms).toBeLessThan(10_000)
    expect((await pending2).body).toMatchObject({ status: 'exited', exitCode: 6, stdout: 'twice\n' })
  })
})

describe('hang-freedom under load', () => {
  it('40 concurrent execs on two sandboxes, one supervisor SIGKILLed mid-flight → every exec ends (true exit or 503) within its bound; nothing is left pending', async () => {
    const g = await gateway()
    const doomed = supervisor(g, 'load-doomed')
    supervisor(g, 'load-healthy')
    await g.waitConnected('load-doomed')
    await g.waitConnected('load-healthy')
    const N = 20
    const start = async (sandbox: string): Promise<string[]> => await Promise.all(Array.from({ length: N }, async (_, i) =>
      await execStart(g.publicUrl, sandbox, { command: tracked(`echo go-${i}; sleep 2; exit 3`) })))
    const [doomedIds, healthyIds] = await Promise.all([start('load-doomed'), start('load-healthy')])
    await waitFor(() => [...doomedIds, ...healthyIds].every((id) => g.gw.execs.get(id)!.stdout.total > 0), { timeoutMs: 15_000, intervalMs: 20, description: 'all 40 execs produced output' })

    const killedAt = performance.now()
    doomed.signal('SIGKILL')
    // Kept by the embedded daemon: each waits for a reattach within the bound, then 503.
    const doomedEnds = await Promise.all(doomedIds.map(async (id) => await waitEnded(g.publicUrl, id, PING_BOUND + REATTACH_BOUND + SLACK + 1000)))
    expect(performance.now() - killedAt).toBeLessThan(PING_BOUND + REATTACH_BOUND + SLACK)
    for (const e of doomedEnds) {
      expect(e).toMatchObject({ status: 'failed', exitCode: null, signal: null, error: { code: 'relay_unavailable', status: 503 } })
    }
    const healthyEnds = await Promise.all(healthyIds.map(async (id) => await waitEnded(g.publicUrl, id, 10_000)))
    healthyEnds.forEach((e, i) => expect(e).toMatchObject({ status: 'exited', exitCode: 3, error: null, stdoutBytes: `go-${i}\n`.length }))

    expect(g.gw.execs.running).toBe(0)
    expect(g.gw.registry.pendingCount()).toBe(0)
    const sandboxes = (await api(g.publicUrl, 'GET', '/v1/sandboxes')).body.sandboxes
    expect(sandboxes.find((s: any) => s.id === 'load-doomed')).toMatchObject({ status: 'disconnected', activeExecs: 0 })
    expect(sandboxes.find((s: any) => s.id === 'load-healthy')).toMatchObject({ status: 'connected', activeExecs: 0 })
    for (const id of [...doomedIds, ...healthyIds]) expect(readers(g, id)).toBe(0)
  })
})

describe('relay faults', () => {
  it('relay stream reset by the supervisor mid-exec → the output already received is delivered, then 503 relay_unavailable', async () => {
    const g = await gateway()
    const sshd = await openssh(g)
    const proxy = await proxyTo(sshd.host, sshd.port)
    supervisor(g, 'reset', { sshTarget: `${proxy.host}:${proxy.port}`, sshUser: sandboxAccount() })
    await g.waitConnected('reset')
    const pending = execWait(g.publicUrl, 'reset', { command: tracked('echo partial; sleep 10') })
    await waitFor(() => g.gw.execs.list({ sandboxId: 'reset' }).some((e) => e.stdout.total === 8), { timeoutMs: 5000, intervalMs: 10 })
    const id = g.gw.execs.list({ sandboxId: 'reset' })[0]!.id
    const ndjson = readEvents(g.publicUrl, id)
    const ws = readWebSocket(g.publicUrl, id)

    const resetAt = performance.now()
    proxy.resetAll()
    const r = await pending
    expect(performance.now() - resetAt).toBeLessThan(SLACK)
    expect(r.status).toBe(503)
    expect(r.body).toMatchObject({ code: 'relay_unavailable', status: 503, execId: id })

    const events = await ndjson
    expect(outputOf(events, 'stdout')).toBe('partial\n')
    expect(events.at(-1)).toMatchObject({ type: 'error', code: 'relay_unavailable', status: 503 })
    expect(events.filter((e) => e.type === 'exit' || e.type === 'error')).toHaveLength(1)
    const wsRes = await ws
    expect(outputOf(wsRes.events, 'stdout')).toBe('partial\n')
    expect(wsRes.events.at(-1)).toMatchObject({ type: 'error', code: 'relay_unavailable' })
    expect(wsRes.closeCode).toBe(1011)
    const rec = await getExec(g.publicUrl, id)
    expect(rec).toMatchObject({ status: 'failed', exitCode: null, signal: null, stdoutBytes: 8, error: { code: 'relay_unavailable', status: 503 } })
  })

  it('relay reset after the exit status arrived (inside the close wait) → the recorded exit status stands, not a 503', async () => {
    const g = await gateway({ closeWaitMs: 5000 })
    const s = await scripted(({ channel }) => {
      channel.write('done\n')
      channel.exit(6)
      // then hold: no EOF, no close, so the gateway sits in its close wait
    })
    const sup = supervisor(g, 'exit-then-reset', { sshTarget: `${s.host}:${s.port}` })
    await g.waitConnected('exit-then-reset')
    let settled = false
    const pending = execWait(g.publicUrl, 'exit-then-reset', { command: ['anything'] }).finally(() => { settled = true })
    await waitFor(() => g.gw.execs.list({ sandboxId: 'exit-then-reset' }).some((e) => e.stdout.total === 5), { timeoutMs: 5000, intervalMs: 10 })
    // exit-status follows the data on the same connection; give it time to land.
    await sleep(300)
    expect(settled).toBe(false)
    const killedAt = performance.now()
    sup.signal('SIGKILL')
    const r = await pending
    const ms = performance.now() - killedAt
    expect(r.status).toBe(200)
    expect(r.body).toMatchObject({ status: 'exited', exitCode: 6, signal: null, error: null, stdout: 'done\n' })
    // Ended by the reset, well inside the 5 s close wait.
    expect(ms).toBeLessThan(SLACK)
  })
})

describe('clients', () => {
  it.each(['embedded', 'openssh'] as const)('an interactive client that sends EOF before the command exits still gets the exit status (%s)', async (target) => {
    const g = await gateway()
    const sandbox = `eof-${target}`
    if (target === 'openssh') {
      const sshd = await openssh(g)
      supervisor(g, sandbox, { sshTarget: `${sshd.host}:${sshd.port}`, sshUser: sandboxAccount() })
    } else {
      supervisor(g, sandbox)
    }
    await g.waitConnected(sandbox)
    // cat ends at EOF; the command then keeps running on its own for a while before it exits.
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'cat; sleep 0.7; echo after-eof; exit 7'], interactive: true })
    let eofAt = 0
    const res = await readWebSocket(g.publicUrl, id, {
      onOpen: (ws) => {
        ws.send(JSON.stringify({ type: 'stdin', data: 'line\n' }))
        setTimeout(() => { eofAt = performance.now(); ws.send(JSON.stringify({ type: 'eof' })) }, 100)
      }
    })
    expect(performance.now() - eofAt).toBeGreaterThanOrEqual(600)
    expect(outputOf(res.events, 'stdout')).toBe('line\nafter-eof\n')
    expect(res.events.at(-1)).toEqual({ type: 'exit', exitCode: 7, signal: null, timedOut: false })
    expect(res.closeCode).toBe(1000)
    expect(await getExec(g.publicUrl, id)).toMatchObject({ status: 'exited', exitCode: 7, error: null })
  })

  it('an interactive client\'s EOF reaches the sandbox as EOF only, never a channel close, before the exit status (scripted sshd)', async () => {
    const g = await gateway()
    const s = await scripted(({ channel }) => {
      let closed = false
      channel.on('close', () => { closed = true })
      channel.on('data', (d: Buffer) => channel.write(d))
      channel.on('end', () => {
        setTimeout(() => {
          if (closed) return
          channel.write(`eof seen, closed=${String(closed)}\n`)
          channel.exit(7)
          channel.end()
        }, 300)
      })
    })
    supervisor(g, 'eof-only', { sshTarget: `${s.host}:${s.port}` })
    await g.waitConnected('eof-only')
    const id = await execStart(g.publicUrl, 'eof-only', { command: ['cat'], interactive: true })
    const res = await readWebSocket(g.publicUrl, id, {
      onOpen: (ws) => {
        ws.send(JSON.stringify({ type: 'stdin', data: 'ping\n' }))
        setTimeout(() => ws.send(JSON.stringify({ type: 'eof' })), 100)
      }
    })
    expect(outputOf(res.events, 'stdout')).toBe('ping\neof seen, closed=false\n')
    expect(res.events.at(-1)).toEqual({ type: 'exit', exitCode: 7, signal: null, timedOut: false })
  })

  it('a WebSocket client closed mid-exec detaches and frees its listeners; the exec still ends with its exit code', async () => {
    const g = await gateway()
    supervisor(g, 'ws-detach')
    await g.waitConnected('ws-detach')
    const id = await execStart(g.publicUrl, 'ws-detach', { command: ['sh', '-c', 'echo start; sleep 2; echo end; exit 5'] })
    const polite = await openWs(g.publicUrl, id)
    const rude = await openWs(g.publicUrl, id)
    await waitFor(() => [polite, rude].every((c) => outputOf(c.events, 'stdout') === 'start\n'), { timeoutMs: 5000, description: 'both sockets saw "start"' })
    expect(readers(g, id)).toBe(2)

    polite.ws.close(1000, 'bye')
    rude.ws.terminate()
    await waitFor(() => readers(g, id) === 0, { timeoutMs: 1000, intervalMs: 10, description: 'listeners released' })
    expect(g.gw.execs.get(id)!.finished).toBe(false)

    const exec = await waitEnded(g.publicUrl, id, 5000)
    expect(exec).toMatchObject({ status: 'exited', exitCode: 5, error: null, stdoutBytes: 10 })
    expect(readers(g, id)).toBe(0)
    const late = await readEvents(g.publicUrl, id)
    expect(outputOf(late, 'stdout')).toBe('start\nend\n')
    expect(late.at(-1)).toEqual({ type: 'exit', exitCode: 5, signal: null, timedOut: false })
  })

  it('SSE and NDJSON readers aborted mid-exec detach and free their listeners; the exec still ends with its exit code', async () => {
    const g = await gateway()
    supervisor(g, 'http-detach')
    await g.waitConnected('http-detach')
    const id = await execStart(g.publicUrl, 'http-detach', { command: ['sh', '-c', 'echo start; sleep 2; echo end; exit 4'] })
    const sse = await openEventsReader(g.publicUrl, id, 'text/event-stream')
    const nd = await openEventsReader(g.publicUrl, id, 'application/x-ndjson')
    await waitFor(() => sse.text().includes('start') && nd.text().includes('start'), { timeoutMs: 5000, description: 'both readers saw "start"' })
    expect(readers(g, id)).toBe(2)

    sse.abort()
    nd.abort()
    await Promise.all([sse.done, nd.done])
    await waitFor(() => readers(g, id) === 0, { timeoutMs: 1000, intervalMs: 10, description: 'listeners released' })
    expect(g.gw.execs.get(id)!.finished).toBe(false)

    const exec = await waitEnded(g.publicUrl, id, 5000)
    expect(exec).toMatchObject({ status: 'exited', exitCode: 4, error: null, stdoutBytes: 10 })
    expect(readers(g, id)).toBe(0)
  })
})

describe('gateway shutdown', () => {
  const GRACE = 2000

  async function gatewayProcess (): Promise<GatewayProcess> {
    const gp = await startGatewayProcess({ shutdownGraceMs: GRACE })
    kit.defer(async () => { await gp.stop() })
    return gp
  }

  function remoteSupervisor (gp: GatewayProcess, sandboxId: string): SupervisorProcess {
    const s = startSupervisorProcess({ gatewayUrl: gp.supervisorUrl, sandboxId, token: gp.token(sandboxId) })
    kit.defer(async () => { await s.stop() })
    return s
  }

  async function sandboxStatus (gp: GatewayProcess, sandboxId: string, status: 'connected' | 'disconnected'): Promise<void> {
    await waitFor(async () => (await api(gp.publicUrl, 'GET', `/v1/sandboxes/${sandboxId}`)).body.status === status,
      { timeoutMs: 10_000, intervalMs: 20, description: `sandbox ${sandboxId} ${status}` })
  }

  it('gateway SIGTERM with execs in flight → WebSocket clients get 1001, ?wait=true callers 503 shutting_down (or their result) within the grace, at every stage of an exec', async () => {
    const gp = await gatewayProcess()
    const url = gp.publicUrl
    remoteSupervisor(gp, 'remote')
    const gone = remoteSupervisor(gp, 'gone')
    const mute = await startFakeSupervisor({ supervisorUrl: gp.supervisorUrl, token: gp.token('mute'), onRelay: 'ignore' })
    kit.defer(async () => { await mute.close() })
    await sandboxStatus(gp, 'remote', 'connected')
    await sandboxStatus(gp, 'gone', 'connected')
    gone.signal('SIGKILL')
    await sandboxStatus(gp, 'gone', 'disconnected')

    // Running, on the embedded local sandbox and on a remote supervisor.
    const longLocal = execWait(url, 'local', { command: tracked('sleep 20') })
    const longRemote = execWait(url, 'remote', { command: tracked('sleep 20') })
    // Ends by itself inside the grace: gets its true result.
    const short = execWait(url, 'local', { command: ['sh', '-c', 'sleep 0.8; echo made-it; exit 3'] })
    // Waiting for a relay the supervisor never opens (default bound 10 s > grace).
    const relayWait = execWait(url, 'mute', { command: ['true'] })
    // Waiting for a supervisor session (default bound 15 s > grace).
    const sessionWait = execWait(url, 'gone', { command: ['true'] })
    const watchedLocal = await execStart(url, 'local', { command: tracked('echo watched; sleep 20') })
    const watchedRemote = await execStart(url, 'remote', { command: tracked('echo watched; sleep 20') })
    let open = 0
    const wsLocal = readWebSocket(url, watchedLocal, { onOpen: () => { open++ } })
    const wsRemote = readWebSocket(url, watchedRemote, { onOpen: () => { open++ } })
    await waitFor(async () => {
      const running = (await api(url, 'GET', '/v1/execs?status=running')).body.execs.length
      const pending = (await api(url, 'GET', '/v1/execs?status=pending')).body.execs.length
      return open === 2 && running === 5 && pending === 2
    }, { timeoutMs: 10_000, intervalMs: 20, description: 'five execs running, two waiting, both WebSockets open' })
    await mute.waitRelays(1)

    const termAt = performance.now()
    const since = async <T>(p: Promise<T>): Promise<{ value: T, ms: number }> => { const value = await p; return { value, ms: performance.now() - termAt } }
    gp.proc.kill('SIGTERM')
    const results = {
      longLocal: since(longLocal),
      longRemote: since(longRemote),
      short: since(short),
      relayWait: since(relayWait),
      sessionWait: since(sessionWait),
      wsLocal: since(wsLocal),
      wsRemote: since(wsRemote)
    }
    const exited = gp.exited
    // No new exec is taken while shutting down (once the signal has been handled).
    await sleep(200)
    const refused = await api(url, 'POST', '/v1/sandboxes/local/execs', { command: ['true'] }).catch(() => undefined)
    if (refused !== undefined) expect(refused.body).toMatchObject({ code: 'shutting_down', status: 503 })

    const s = await results.short
    expect(s.value.status).toBe(200)
    expect(s.value.body).toMatchObject({ status: 'exited', exitCode: 3, stdout: 'made-it\n' })
    for (const [name, p] of [['longLocal', results.longLocal], ['longRemote', results.longRemote], ['relayWait', results.relayWait], ['sessionWait', results.sessionWait]] as const) {
      const { value: r, ms } = await p
      expect(r.status, `${name}: ${r.text}`).toBe(503)
      expect(r.body, name).toMatchObject({ code: 'shutting_down', status: 503 })
      expect(ms, name).toBeLessThan(GRACE + SLACK)
    }
    for (const [name, p] of [['wsLocal', results.wsLocal], ['wsRemote', results.wsRemote]] as const) {
      const { value: w, ms } = await p
      expect(w.closeCode, name).toBe(1001)
      expect(outputOf(w.events, 'stdout'), name).toBe('watched\n')
      expect(w.events.at(-1), name).toMatchObject({ type: 'error', code: 'shutting_down' })
      expect(ms, name).toBeLessThan(GRACE + SLACK)
    }
    expect((await exited).code).toBe(0)
  })

  it.each(['the local sandbox', 'a remote supervisor'] as const)('gateway SIGTERM with an exec in flight on %s → the process exits within the grace', async (where) => {
    const gp = await gatewayProcess()
    let sandbox = 'local'
    if (where === 'a remote supervisor') {
      sandbox = 'remote'
      remoteSupervisor(gp, sandbox)
      await sandboxStatus(gp, sandbox, 'connected')
    }
    const pending = execWait(gp.publicUrl, sandbox, { command: tracked('echo in-flight; sleep 20') })
    await waitFor(async () => (await api(gp.publicUrl, 'GET', '/v1/execs?status=running')).body.execs.length === 1, { timeoutMs: 10_000, intervalMs: 20 })
    const termAt = performance.now()
    gp.proc.kill('SIGTERM')
    const r = await pending
    expect(r.body).toMatchObject({ code: 'shutting_down', status: 503 })
    const exit = await gp.exited
    const ms = performance.now() - termAt
    expect(exit).toEqual({ code: 0, signal: null })
    expect(ms, `exited ${Math.round(ms)} ms after SIGTERM with --shutdown-grace-ms ${GRACE}`).toBeLessThan(GRACE + SLACK)
  })
})
