import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { renderHaproxyConfig, type HaproxyConfigOptions } from '../../src/cluster/haproxy-config.js'
import { loadDataDir } from '../../src/data-dir.js'
import { BINARY_SUBPROTOCOL } from '../../sdk/index.js'
import { api, execStart, execWait, outputOf, readWebSocket } from '../helpers/api.js'
import { startGateway, type TestGateway } from '../helpers/gateway.js'
import { startGatewayProcess, type GatewayProcess } from '../helpers/gateway-process.js'
import { startHaproxy, validateHaproxyConfig, type Haproxy, type HaproxyOptions } from '../helpers/haproxy.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { sleep, waitFor } from '../helpers/wait.js'

// Gateways behind a real haproxy (issue 14): supervisors through the layer-4 frontend, the public
// API through the layer-7 one, /readyz as the health check of both.

const DOC = fileURLToPath(new URL('../../docs/haproxy.cfg', import.meta.url))

// The example of docs/haproxy.cfg: three replicas on one host.
const DOC_OPTIONS: HaproxyConfigOptions = {
  publicBind: '127.0.0.1:8080',
  supervisorBind: '127.0.0.1:8081',
  replicas: [0, 1, 2].map((i) => ({ name: `replica${i + 1}`, publicAddr: `127.0.0.1:${18080 + i}`, supervisorAddr: `127.0.0.1:${18181 + i}` })),
  statsBind: '127.0.0.1:8404',
  statsSocket: '/run/haproxy/admin.sock'
}

function hostPort (url: string): string {
  const u = new URL(url)
  return `${u.hostname}:${u.port}`
}

function replicaOf (name: string, g: { publicUrl: string, supervisorUrl: string }): HaproxyOptions['replicas'][number] {
  return { name, publicAddr: hostPort(g.publicUrl), supervisorAddr: hostPort(g.supervisorUrl) }
}

interface Sse { events: Array<{ event: string, data: any, atMs: number }>, ended: 'done' | 'error', endedAtMs: number }

// Reads /events as SSE with plain fetch, timing each event from the request.
async function readSse (baseUrl: string, execId: string): Promise<Sse> {
  const started = performance.now()
  const events: Sse['events'] = []
  try {
    const res = await fetch(`${baseUrl}/v1/execs/${execId}/events`, { headers: { accept: 'text/event-stream' } })
    if (res.status !== 200) throw new Error(`events: ${res.status}`)
    const decoder = new TextDecoder()
    let buf = ''
    for await (const chunk of res.body!) {
      buf += decoder.decode(chunk as Uint8Array, { stream: true })
      let sep: number
      while ((sep = buf.indexOf('\n\n')) !== -1) {
        const block = buf.slice(0, sep)
        buf = buf.slice(sep + 2)
        const event = /^event: (.*)$/m.exec(block)?.[1] ?? 'message'
        const data = /^data: (.*)$/m.exec(block)?.[1]
        if (data !== undefined) events.push({ event, data: JSON.parse(data), atMs: performance.now() - started })
      }
    }
    return { events, ended: 'done', endedAtMs: performance.now() - started }
  } catch {
    return { events, ended: 'error', endedAtMs: performance.now() - started }
  }
}

// PING round trips the gateway has timed (its exec_gateway_h2_ping_rtt_seconds histogram).
async function pingCount (gatewayUrl: string): Promise<number> {
  const text = (await api(gatewayUrl, 'GET', '/metrics')).text
  return text.split('\n').filter((l) => l.startsWith('exec_gateway_h2_ping_rtt_seconds_count')).reduce((n, l) => n + Number(l.split(' ').at(-1)), 0)
}

describe('haproxy.cfg renderer', () => {
  it('docs/haproxy.cfg is the rendered three-replica example, and haproxy -c accepts it', () => {
    const rendered = renderHaproxyConfig(DOC_OPTIONS)
    if (process.env.UPDATE_HAPROXY_DOC === '1') writeFileSync(DOC, rendered)
    expect(readFileSync(DOC, 'utf8'), 'docs/haproxy.cfg has drifted from the renderer: run `UPDATE_HAPROXY_DOC=1 npx vitest run test/integration/haproxy.test.ts`').toBe(rendered)
    validateHaproxyConfig(DOC)
    // Established connections survive a mark-down: the option that would cut them is absent.
    expect(rendered).not.toMatch(/^\s*(default-server|server)\b.*on-marked-down/m)
    expect(rendered).toMatch(/^ {4}server replica2 127\.0\.0\.1:18182 check addr 127\.0\.0\.1 port 18081$/m)
  })

  it('refuses what haproxy would not take', () => {
    const base = { publicBind: '127.0.0.1:1', supervisorBind: '127.0.0.1:2', replicas: [{ name: 'a', publicAddr: '127.0.0.1:3', supervisorAddr: '127.0.0.1:4' }] }
    expect(() => renderHaproxyConfig({ ...base, replicas: [] })).toThrow(/at least one replica/)
    expect(() => renderHaproxyConfig({ ...base, replicas: [base.replicas[0]!, base.replicas[0]!] })).toThrow(/appears twice/)
    expect(() => renderHaproxyConfig({ ...base, replicas: [{ ...base.replicas[0]!, name: 'a b' }] })).toThrow(/replica name/)
    expect(() => renderHaproxyConfig({ ...base, publicBind: '127.0.0.1' })).toThrow(/publicBind must be host:port/)
    expect(() => renderHaproxyConfig({ ...base, timeouts: { tunnelMs: 0 } })).toThrow(/tunnelMs/)
    expect(renderHaproxyConfig({ ...base, publicBind: '[::1]:9' })).toMatch(/^ {4}bind ::1:9$/m)
  })
})

describe('one gateway behind haproxy', () => {
  let g: TestGateway
  let lb: Haproxy
  let sup: SupervisorProcess
  const sandbox = 'lb-one'

  beforeAll(async () => {
    // PINGs every 300 ms with a 300 ms bound, and heartbeats rare enough (20 s) that a silent
    // exec is really silent on the wire for the timeout tests below.
    g = await startGateway({ h2PingIntervalMs: 300, h2PingTimeoutMs: 300, heartbeatIntervalMs: 20_000 })
    lb = await startHaproxy({ replicas: [replicaOf('gw1', g)] })
    await lb.waitServer('public_replicas', 'gw1', 'UP')
    await lb.waitServer('supervisor_replicas', 'gw1', 'UP')
    sup = startSupervisorProcess({ gatewayUrl: lb.supervisorUrl, sandboxId: sandbox, token: g.token(sandbox) })
    await g.waitConnected(sandbox)
  })

  afterAll(async () => {
    await sup?.stop()
    await lb?.stop()
    await g?.close()
  })

  it('a supervisor dialling the tcp frontend holds its HTTP/2 session through it, and ?wait=true execs run through the http frontend', async () => {
    const sv = (await lb.stats()).find((s) => s.proxy === 'supervisor_replicas' && s.name === 'gw1')
    expect(sv?.scur).toBe(1)
    const r = await execWait(lb.publicUrl, sandbox, { command: ['sh', '-c', 'echo out; echo err >&2; exit 7'] })
    expect(r.status).toBe(200)
    expect(r.body).toMatchObject({ status: 'exited', exitCode: 7, stdout: 'out\n', stderr: 'err\n' })
    const got = await api(lb.publicUrl, 'GET', `/v1/execs/${r.body.id as string}`)
    expect(got.status).toBe(200)
    expect(got.body.exitCode).toBe(7)
  })

  it('a WebSocket exec stream passes text and binary frames both ways and the close code 1000', async () => {
    const bytes = Buffer.from([0, 255, 128, 13, 10, 0xc3, 0x28])
    const id = await execStart(lb.publicUrl, sandbox, { command: ['cat'], interactive: true })
    const res = await readWebSocket(lb.publicUrl, id, {
      protocols: [BINARY_SUBPROTOCOL],
      onOpen: (ws) => {
        ws.send(JSON.stringify({ type: 'stdin', data: 'text-frame\n' }))
        ws.send(Buffer.concat([Buffer.from([0]), bytes]), { binary: true })
        setTimeout(() => ws.send(JSON.stringify({ type: 'eof' })), 100)
      }
    })
    const stdout = Buffer.concat(res.binary.filter((f) => f[0] === 1).map((f) => f.subarray(1)))
    expect(stdout).toEqual(Buffer.concat([Buffer.from('text-frame\n'), bytes]))
    expect(res.events.at(-1)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
    expect(res.closeCode).toBe(1000)
    // And JSON text frames without the binary subprotocol.
    const id2 = await execStart(lb.publicUrl, sandbox, { command: ['sh', '-c', 'echo json; echo e >&2'] })
    const res2 = await readWebSocket(lb.publicUrl, id2)
    expect(outputOf(res2.events, 'stdout')).toBe('json\n')
    expect(outputOf(res2.events, 'stderr')).toBe('e\n')
    expect(res2.closeCode).toBe(1000)
  })

  it('SSE events stream through unbuffered: the first arrives long before the exec ends', async () => {
    const id = await execStart(lb.publicUrl, sandbox, { command: ['sh', '-c', 'echo a; sleep 2; echo b'] })
    const sse = await readSse(lb.publicUrl, id)
    expect(sse.ended).toBe('done')
    const out = sse.events.filter((e) => e.event === 'stdout')
    expect(out.map((e) => e.data.data).join('')).toBe('a\nb\n')
    expect(out[0]!.atMs).toBeLessThan(1000)
    expect(sse.events.at(-1)!.event).toBe('exit')
    expect(sse.events.at(-1)!.atMs).toBeGreaterThan(1800)
  })

  it('logs request lines with every access_token value redacted: exec read tokens travel in the query', async () => {
    const id = await execStart(lb.publicUrl, sandbox, { command: ['true'] })
    const minted = await api(lb.publicUrl, 'POST', `/v1/execs/${id}/read-token`)
    expect(minted.status).toBe(201)
    const { token, eventsUrl } = minted.body as { token: string, eventsUrl: string }
    expect((await api(lb.publicUrl, 'GET', `${eventsUrl}&stdoutOffset=0`)).status).toBe(200)
    expect((await api(lb.publicUrl, 'GET', `/v1/execs/${id}/events?access%5Ftoken=${token}`)).status).toBe(200)
    await waitFor(() => lb.output().includes(`"GET /v1/execs/${id}/events?access_token=redacted HTTP/1.1"`), { timeoutMs: 5000, intervalMs: 50, description: 'both request lines logged' })
    expect(lb.output()).toContain(`"GET /v1/execs/${id}/events?access_token=redacted&stdoutOffset=0 HTTP/1.1"`)
    expect(lb.output()).not.toContain(token.split('.')[2]!)
  })

  it('an upgraded WebSocket lives by timeout tunnel, not by the client/server timeouts; ?wait=true and runExec by their own server timeout', async () => {
    // Client and server timeouts of 2 s: a plain response silent for longer is cut (the SSE
    // reader below, the control). The tunnel timeout decides for the WebSocket: 30 s lets an
    // 8 s silent exec through, 2 s cuts it (the second control).
    const short = { clientMs: 2000, serverMs: 2000, waitRequestMs: 30_000 }
    const longTunnel = await startHaproxy({ replicas: [replicaOf('gw1', g)], timeouts: { ...short, tunnelMs: 30_000 } })
    const shortTunnel = await startHaproxy({ replicas: [replicaOf('gw1', g)], timeouts: { ...short, tunnelMs: 2000 } })
    try {
      await longTunnel.waitServer('public_replicas', 'gw1', 'UP')
      await shortTunnel.waitServer('public_replicas', 'gw1', 'UP')
      const silent = ['sh', '-c', 'sleep 8; echo late']
      const started = performance.now()
      const since = (): number => performance.now() - started
      const [ws, wsCut, waited, ran, sse] = await Promise.all([
        execStart(longTunnel.publicUrl, sandbox, { command: silent }).then(async (id) => await readWebSocket(longTunnel.publicUrl, id)).then((r) => ({ ...r, atMs: since() })),
        execStart(shortTunnel.publicUrl, sandbox, { command: silent }).then(async (id) => await readWebSocket(shortTunnel.publicUrl, id)).then((r) => ({ ...r, atMs: since() })),
        execWait(longTunnel.publicUrl, sandbox, { command: silent }),
        api(longTunnel.publicUrl, 'POST', `/v1/sandboxes/${sandbox}/execs/run`, { command: silent }),
        execStart(longTunnel.publicUrl, sandbox, { command: silent }).then(async (id) => await readSse(longTunnel.publicUrl, id))
      ])
      expect(outputOf(ws.events, 'stdout')).toBe('late\n')
      expect(ws.events.at(-1)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
      expect(ws.closeCode).toBe(1000)
      expect(ws.atMs).toBeGreaterThan(7500)
      // The 2 s tunnel cut the same stream, with no close frame (1006), long before the exec ended.
      expect(wsCut.closeCode).toBe(1006)
      expect(wsCut.events.filter((e) => e.type === 'exit')).toEqual([])
      expect(wsCut.atMs).toBeLessThan(5000)
      expect(waited.status).toBe(200)
      expect(waited.body).toMatchObject({ exitCode: 0, stdout: 'late\n' })
      expect(ran.status).toBe(200)
      expect(ran.body).toMatchObject({ exitCode: 0, stdout: 'late\n' })
      // SSE is a plain response: 2 s of silence (no heartbeat for 20 s) and timeout server cuts it.
      expect(sse.events.filter((e) => e.event === 'exit')).toEqual([])
      expect(sse.endedAtMs).toBeLessThan(5000)
    } finally {
      await longTunnel.stop()
      await shortTunnel.stop()
    }
  })

  it("the gateway's HTTP/2 PINGs reach the supervisor through tcp mode: the session outlives many ping intervals, and dies within the ping bound once haproxy is frozen", async () => {
    const before = await api(lb.publicUrl, 'GET', `/v1/sandboxes/${sandbox}`)
    expect(before.body.status).toBe('connected')
    const pingsBefore = await pingCount(g.publicUrl)
    // 3 s idle is ten ping intervals and five interval + timeout bounds.
    await sleep(3000)
    const after = await api(lb.publicUrl, 'GET', `/v1/sandboxes/${sandbox}`)
    expect(after.body.status).toBe('connected')
    expect(after.body.connectedAt).toBe(before.body.connectedAt)
    // The gateway PINGed (its heartbeats are 20 s apart, so the session was silent) and every
    // PING it timed was acknowledged by the supervisor, through haproxy.
    expect(await pingCount(g.publicUrl) - pingsBefore).toBeGreaterThanOrEqual(5)
    // Control: with haproxy frozen the PINGs go unanswered and the gateway ends the session.
    const frozen = performance.now()
    lb.signal('SIGSTOP')
    try {
      await g.waitDisconnected(sandbox, 3000)
      expect(performance.now() - frozen).toBeLessThan(2000)
    } finally {
      lb.signal('SIGCONT')
    }
    // The supervisor comes back through haproxy by itself.
    await g.waitConnected(sandbox, 10_000)
  })

  it('reload() loads a new config on the same ports while an established supervisor session and WebSocket stay up', async () => {
    const before = await api(lb.publicUrl, 'GET', `/v1/sandboxes/${sandbox}`)
    const id = await execStart(lb.publicUrl, sandbox, { command: ['sh', '-c', 'echo one; sleep 1.5; echo two'] })
    const reading = readWebSocket(lb.publicUrl, id)
    await sleep(300)
    await lb.reload({ replicas: [replicaOf('gw1-renamed', g)] })
    expect(lb.config()).toContain('server gw1-renamed ')
    const res = await reading
    expect(outputOf(res.events, 'stdout')).toBe('one\ntwo\n')
    expect(res.closeCode).toBe(1000)
    const after = await api(lb.publicUrl, 'GET', `/v1/sandboxes/${sandbox}`)
    expect(after.body.connectedAt).toBe(before.body.connectedAt)
    await lb.waitServer('public_replicas', 'gw1-renamed', 'UP')
    const r = await execWait(lb.publicUrl, sandbox, { command: ['echo', 'after-reload'] })
    expect(r.body.stdout).toBe('after-reload\n')
  })
})

describe('two serve processes behind haproxy', () => {
  const gws: GatewayProcess[] = []
  const sups: SupervisorProcess[] = []
  let lb: Haproxy
  let dirs: string[] = []

  beforeAll(async () => {
    // Same token secret and SSH key in both data dirs (as docs/api.md §6 asks of replicas), so a
    // supervisor token is good on either; separate dirs keep their exec records apart.
    dirs = [mkdtempSync(join(tmpdir(), 'egw-lb-a-')), mkdtempSync(join(tmpdir(), 'egw-lb-b-'))]
    loadDataDir(dirs[0]!)
    for (const f of ['token_secret', 'ssh_client_ed25519', 'ssh_client_ed25519.pub']) copyFileSync(join(dirs[0]!, f), join(dirs[1]!, f))
    // A long shutdown grace: a SIGTERMed replica drains (503 on /readyz) while its exec runs.
    const started = await Promise.all(dirs.map(async (dataDir) => await startGatewayProcess({ dataDir, shutdownGraceMs: 8000 })))
    gws.push(...started)
    lb = await startHaproxy({ replicas: [replicaOf('a', gws[0]!), replicaOf('b', gws[1]!)] })
    for (const be of ['public_replicas', 'supervisor_replicas']) {
      for (const s of ['a', 'b']) await lb.waitServer(be, s, 'UP')
    }
  })

  afterAll(async () => {
    for (const s of sups) await s.stop()
    await lb?.stop()
    for (const gw of gws) await gw.stop()
    for (const d of dirs) rmSync(d, { recursive: true, force: true })
  })

  // Which replica ran an exec: exec records are per process without cluster mode.
  async function ranOn (execId: string): Promise<'a' | 'b'> {
    const [a, b] = await Promise.all(gws.map(async (gw) => (await api(gw.publicUrl, 'GET', `/v1/execs/${execId}`)).status))
    if (a === 200 && b === 404) return 'a'
    if (b === 200 && a === 404) return 'b'
    throw new Error(`exec ${execId}: a says ${a}, b says ${b}`)
  }

  it('spreads API requests over both replicas', async () => {
    const seen = new Set<string>()
    for (let i = 0; i < 6; i++) {
      const r = await execWait(lb.publicUrl, 'local', { command: ['true'] })
      expect(r.status).toBe(200)
      seen.add(await ranOn(r.body.id))
    }
    expect([...seen].sort()).toEqual(['a', 'b'])
  })

  it('a draining replica is marked down within the check bound and gets no new requests or supervisors, while haproxy keeps its established supervisor connection', async () => {
    const sandbox = 'lb-drain'
    const sup = startSupervisorProcess({ gatewayUrl: lb.supervisorUrl, sandboxId: sandbox, token: gws[0]!.token(sandbox) })
    sups.push(sup)
    let holder = -1
    await waitFor(async () => {
      for (const [i, gw] of gws.entries()) {
        if ((await api(gw.publicUrl, 'GET', `/v1/sandboxes/${sandbox}`)).body?.status === 'connected') holder = i
      }
      return holder !== -1
    }, { timeoutMs: 10_000, description: `sandbox ${sandbox} connected to a replica through haproxy` })
    const x = gws[holder]!
    const xName = holder === 0 ? 'a' : 'b'
    const yName = holder === 0 ? 'b' : 'a'
    const y = gws[1 - holder]!

    // An exec on the holder (directly: without cluster mode only it knows the sandbox), read
    // over a WebSocket straight from it, that outlives the mark-down.
    const id = await execStart(x.publicUrl, sandbox, { command: ['sh', '-c', 'echo started; sleep 4; echo survived'] })
    const reading = readWebSocket(x.publicUrl, id)
    await waitFor(async () => (await api(x.publicUrl, 'GET', `/v1/execs/${id}`)).body.stdoutBytes > 0, { timeoutMs: 5000, description: 'the exec to print "started"' })

    const drained = performance.now()
    x.proc.kill('SIGTERM')
    const [pubDownMs, supDownMs] = await Promise.all([
      lb.waitServer('public_replicas', xName, 'DOWN', 5000),
      lb.waitServer('supervisor_replicas', xName, 'DOWN', 5000)
    ])
    expect(Math.max(pubDownMs, supDownMs)).toBeLessThan(2000)
    expect((await api(x.publicUrl, 'GET', '/readyz')).status).toBe(503)

    // New requests all go to the other replica.
    for (let i = 0; i < 4; i++) {
      const r = await execWait(lb.publicUrl, 'local', { command: ['true'] })
      expect(r.status).toBe(200)
      expect(await ranOn(r.body.id).catch(() => 'x only')).toBe(yName)
    }
    // The marked-down replica's supervisor connection is still held by haproxy...
    const sv = (await lb.stats()).find((s) => s.proxy === 'supervisor_replicas' && s.name === xName)!
    expect(sv.status).toBe('DOWN')
    expect(sv.scur).toBe(1)
    // ...so the exec on it ends with its true exit status, seconds after the mark-down.
    const res = await reading
    expect(outputOf(res.events, 'stdout')).toBe('started\nsurvived\n')
    expect(res.events.at(-1)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
    expect(performance.now() - drained).toBeGreaterThan(2500)

    // Once the replica ends its sessions, the supervisor dials haproxy again and lands on the
    // replica that is up.
    await waitFor(async () => (await api(y.publicUrl, 'GET', `/v1/sandboxes/${sandbox}`)).body?.status === 'connected', { timeoutMs: 15_000, description: `sandbox ${sandbox} re-homed to replica ${yName}` })
    const exit = await x.exited
    expect(exit.code).toBe(0)
    const r = await execWait(lb.publicUrl, sandbox, { command: ['echo', 'rehomed'] })
    expect(r.body.stdout).toBe('rehomed\n')
  })
})
