import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import http2 from 'node:http2'
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Writable } from 'node:stream'
import pino from 'pino'
import { startGatewayProcess, type GatewayProcess } from '../helpers/gateway-process.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { startFakeSupervisor } from '../helpers/fake-supervisor.js'
import { waitFor } from '../helpers/wait.js'
import { buildGateway, type Gateway } from '../../src/app.js'
import { defaultGatewayConfig } from '../../src/config.js'
import { loadDataDir } from '../../src/data-dir.js'
import { signSupervisorToken } from '../../src/tokens.js'
import { RELAY_PATH_PREFIX } from '../../src/relay/protocol.js'
import { api, type ApiResponse } from '../helpers/api.js'

// API tokens from files and their reload, supervisor token rotation, forged supervisors and
// cross-sandbox relay claims, and what the logs say about refused tokens (never the token).

const BIN = fileURLToPath(new URL('../../bin/exec-gateway.js', import.meta.url))

function cli (...args: string[]): string {
  return execFileSync(process.execPath, [BIN, ...args], { encoding: 'utf8' }).trim()
}

async function status (url: string, token?: string): Promise<number> {
  const res = await fetch(url, { headers: token === undefined ? {} : { authorization: `Bearer ${token}` } })
  await res.arrayBuffer()
  return res.status
}

async function runWait (publicUrl: string, sandboxId: string, command: string[], token?: string): Promise<ApiResponse> {
  return await api(publicUrl, 'POST', `/v1/sandboxes/${sandboxId}/execs?wait=true`, { command }, token === undefined ? {} : { authorization: `Bearer ${token}` })
}

function count (haystack: string, needle: string): number {
  return haystack.split(needle).length - 1
}

const procs: Array<{ stop: () => Promise<unknown> }> = []
afterEach(async () => {
  for (const p of procs.splice(0).reverse()) await p.stop()
})

function supervisor (gw: GatewayProcess, sandboxId: string, token: string, extraArgs: string[] = []): SupervisorProcess {
  const sup = startSupervisorProcess({ gatewayUrl: gw.supervisorUrl, sandboxId, token, extraArgs })
  procs.push(sup)
  return sup
}

async function connected (gw: GatewayProcess, sandboxId: string): Promise<boolean> {
  const res = await fetch(`${gw.publicUrl}/v1/sandboxes/${sandboxId}`, { headers: { authorization: 'Bearer ops-token' } })
  if (res.status !== 200) { await res.arrayBuffer(); return false }
  return (await res.json() as any).status === 'connected'
}

describe('API tokens from --api-token-file, reloaded on SIGHUP', () => {
  let dir: string
  beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'egw-tokens-')) })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  it('accepts the flag tokens and every token in the file; SIGHUP replaces the file tokens; an empty file keeps them', async () => {
    const file = join(dir, 'tokens')
    writeFileSync(file, '# dashboards\ntok-file-a\n\n  tok-file-b  \n# retired: tok-old\n', { mode: 0o600 })
    const gw = await startGatewayProcess({ extraArgs: ['--api-token', 'tok-flag', '--api-token-file', file] })
    procs.push(gw)
    const url = `${gw.publicUrl}/v1/sandboxes`
    for (const t of ['tok-flag', 'tok-file-a', 'tok-file-b']) expect(await status(url, t)).toBe(200)
    for (const t of [undefined, 'tok-old', '# dashboards', '', 'tok-file', 'tok-file-a-']) expect(await status(url, t)).toBe(401)
    expect(await status(`${gw.publicUrl}/healthz`)).toBe(200)
    // RFC 6750: a 401 names the scheme, and says when a token was sent but is not valid.
    expect((await fetch(url)).headers.get('www-authenticate')).toBe('Bearer realm="exec-gateway"')
    expect((await fetch(url, { headers: { authorization: 'Bearer tok-old' } })).headers.get('www-authenticate')).toBe('Bearer realm="exec-gateway", error="invalid_token"')

    writeFileSync(file, 'tok-file-b\ntok-file-c\n')
    process.kill(gw.pid, 'SIGHUP')
    await waitFor(() => count(gw.output(), 'credentials reloaded') === 1, { timeoutMs: 5000, intervalMs: 20 })
    expect(await status(url, 'tok-file-a')).toBe(401)
    expect(await status(url, 'tok-file-c')).toBe(200)
    expect(await status(url, 'tok-flag')).toBe(200)

    // Emptying the file drops its tokens; the flag's token stays.
    writeFileSync(file, '')
    process.kill(gw.pid, 'SIGHUP')
    await waitFor(() => count(gw.output(), 'credentials reloaded') === 2, { timeoutMs: 5000, intervalMs: 20 })
    expect(await status(url, 'tok-file-c')).toBe(401)
    expect(await status(url, 'tok-flag')).toBe(200)
    expect(await status(url)).toBe(401)
    // Refusals are logged, the tokens themselves never are.
    expect(gw.output()).toContain('API request refused')
    expect(gw.output()).not.toContain('tok-old')
    expect(gw.output()).not.toContain('tok-file-a')
  })

  it('a token file readable by others is served but warned about; a missing file stops the start', async () => {
    const file = join(dir, 'loose')
    writeFileSync(file, 'tok-loose\n')
    chmodSync(file, 0o644)
    const gw = await startGatewayProcess({ extraArgs: ['--api-token-file', file] })
    procs.push(gw)
    expect(await status(`${gw.publicUrl}/v1/execs`, 'tok-loose')).toBe(200)
    expect(gw.output()).toContain('readable by other users')
    // A file emptied by accident, when it holds the only tokens, must neither lock everyone
    // out nor leave the gateway without tokens.
    writeFileSync(file, '\n')
    process.kill(gw.pid, 'SIGHUP')
    await waitFor(() => count(gw.output(), 'credentials reloaded') === 1, { timeoutMs: 5000, intervalMs: 20 })
    expect(gw.output()).toContain('the API token file now has no tokens; keeping the previous ones')
    expect(await status(`${gw.publicUrl}/v1/execs`, 'tok-loose')).toBe(200)
    expect(await status(`${gw.publicUrl}/v1/execs`)).toBe(401)
    let err = ''
    try { cli('serve', '--listen', '127.0.0.1:0', '--api-token-file', join(dir, 'nope')) } catch (e) { err = String((e as { stderr: string }).stderr) }
    expect(err).toMatch(/--api-token-file .*nope: ENOENT/)
  })
})

describe('supervisor token secret rotation', () => {
  it('start: old and new tokens both work; retire: old-token relays and sessions are refused, new ones keep working', async () => {
    const gw = await startGatewayProcess({ localSandbox: false, extraArgs: ['--api-token', 'ops-token', '--relay-open-timeout-ms', '5000', '--session-wait-ms', '2000'] })
    procs.push(gw)
    const oldToken = cli('token', 'rot-a', '--data-dir', gw.dataDir)
    const supA = supervisor(gw, 'rot-a', oldToken)
    await waitFor(async () => await connected(gw, 'rot-a'), { timeoutMs: 10_000, intervalMs: 50 })
    expect((await runWait(gw.publicUrl, 'rot-a', ['echo', 'before'], 'ops-token')).body.stdout).toBe('before\n')

    expect(cli('rotate-token-secret', '--data-dir', gw.dataDir)).toMatch(/Old tokens stay valid/)
    process.kill(gw.pid, 'SIGHUP')
    await waitFor(() => count(gw.output(), 'credentials reloaded') === 1, { timeoutMs: 5000, intervalMs: 20 })
    const newToken = cli('token', 'rot-b', '--data-dir', gw.dataDir)
    expect(newToken).not.toBe(cli('token', 'rot-b', '--data-dir', gw.dataDir, '--ttl-s', '1000'))
    supervisor(gw, 'rot-b', newToken)
    await waitFor(async () => await connected(gw, 'rot-b'), { timeoutMs: 10_000, intervalMs: 50 })
    expect((await runWait(gw.publicUrl, 'rot-b', ['echo', 'new'], 'ops-token')).body.stdout).toBe('new\n')
    // During the rotation the old token still opens relays.
    const during = await runWait(gw.publicUrl, 'rot-a', ['sh', '-c', 'echo during; exit 4'], 'ops-token')
    expect(during.body).toMatchObject({ exitCode: 4, stdout: 'during\n' })

    cli('rotate-token-secret', '--data-dir', gw.dataDir, '--retire')
    process.kill(gw.pid, 'SIGHUP')
    await waitFor(() => count(gw.output(), 'credentials reloaded') === 2, { timeoutMs: 5000, intervalMs: 20 })
    // The old-token session is ended at once and cannot come back.
    await waitFor(async () => !(await connected(gw, 'rot-a')), { timeoutMs: 5000, intervalMs: 50 })
    expect(gw.output()).toContain('its token is no longer accepted')
    const after = await runWait(gw.publicUrl, 'rot-a', ['echo', 'never'], 'ops-token')
    expect(after.status).toBe(503)
    expect(after.body.code).toBe('sandbox_unavailable')
    // Its reconnects are refused (the supervisor hears why; the gateway logs it without the token).
    await waitFor(() => /supervisor token refused: bad signature/.test(supA.output()), { timeoutMs: 15_000, intervalMs: 50 })
    expect(gw.output()).toMatch(/"reason":"bad signature".*"msg":"supervisor request refused"|"msg":"supervisor request refused".*"reason":"bad signature"/)
    // The new token is unaffected.
    expect((await runWait(gw.publicUrl, 'rot-b', ['echo', 'still'], 'ops-token')).body.stdout).toBe('still\n')
    expect(gw.output()).not.toContain(oldToken)
    expect(gw.output()).not.toContain(oldToken.split('.')[3]!)
  }, 90_000)
})

describe('forged and mismatched supervisors', () => {
  it('a supervisor with a token signed by another secret is refused and logged without the token', async () => {
    const gw = await startGatewayProcess({ localSandbox: false, extraArgs: ['--api-token', 'ops-token'] })
    procs.push(gw)
    const forged = signSupervisorToken(randomBytes(32), 'forged')
    const sup = supervisor(gw, 'forged', forged)
    await waitFor(() => /supervisor request refused/.test(gw.output()), { timeoutMs: 10_000, intervalMs: 50 })
    await waitFor(() => /401/.test(sup.output()) && /bad signature/.test(sup.output()), { timeoutMs: 10_000, intervalMs: 50 })
    expect(gw.output()).toMatch(/"reason":"bad signature"/)
    expect(gw.output()).not.toContain(forged)
    expect(gw.output()).not.toContain(forged.split('.')[3]!)
    const list = await fetch(`${gw.publicUrl}/v1/sandboxes`, { headers: { authorization: 'Bearer ops-token' } })
    expect(((await list.json()) as any).sandboxes).toEqual([])
  })

  it('a real token whose sandbox id was swapped for another is refused', async () => {
    const gw = await startGatewayProcess({ localSandbox: false, extraArgs: ['--api-token', 'ops-token'] })
    procs.push(gw)
    const parts = gw.token('mine').split('.')
    parts[1] = Buffer.from('victim').toString('base64url')
    const swapped = parts.join('.')
    supervisor(gw, 'victim', swapped)
    await waitFor(() => /supervisor request refused/.test(gw.output()), { timeoutMs: 10_000, intervalMs: 50 })
    expect(await connected(gw, 'victim')).toBe(false)
    expect(gw.output()).not.toContain(swapped)
  })

  it('a session ends when its token expires, and the supervisor cannot come back with it', async () => {
    const gw = await startGatewayProcess({ localSandbox: false, extraArgs: ['--api-token', 'ops-token', '--heartbeat-interval-ms', '200'] })
    procs.push(gw)
    const shortLived = cli('token', 'expiring', '--data-dir', gw.dataDir, '--ttl-s', '3')
    const sup = supervisor(gw, 'expiring', shortLived)
    await waitFor(async () => await connected(gw, 'expiring'), { timeoutMs: 10_000, intervalMs: 50 })
    await waitFor(async () => !(await connected(gw, 'expiring')), { timeoutMs: 10_000, intervalMs: 100 })
    expect(gw.output()).toMatch(/"reason":"token expired"/)
    await waitFor(() => /token expired/.test(sup.output()), { timeoutMs: 10_000, intervalMs: 50 })
    expect(await connected(gw, 'expiring')).toBe(false)
  })

  it('the supervisor refuses to start with a token issued for another sandbox', () => {
    const token = signSupervisorToken(randomBytes(32), 'sandbox-a')
    let err: { status: number, stderr: string } | undefined
    try { cli('supervisor', '--sandbox-id', 'sandbox-b', '--token', token) } catch (e) { err = e as { status: number, stderr: string } }
    expect(err?.status).toBe(2)
    expect(err?.stderr).toMatch(/issued for sandbox "sandbox-a", not "sandbox-b"/)
  })
})

describe('relays belong to their sandbox', () => {
  it("a supervisor of one sandbox cannot claim another sandbox's relay", async () => {
    const logs: string[] = []
    const logger = pino({ level: 'info' }, new Writable({ write (c, _e, cb) { logs.push(String(c)); cb() } }))
    const dataDir = mkdtempSync(join(tmpdir(), 'egw-claim-'))
    const identity = loadDataDir(dataDir)
    const gw: Gateway = await buildGateway(defaultGatewayConfig({ dataDir, relayOpenTimeoutMs: 3000, execRateLimitPerMinute: 0 }), { logger, identity })
    const { publicUrl, supervisorUrl } = await gw.listen()
    const relayIds: string[] = []
    const victim = await startFakeSupervisor({ supervisorUrl, token: signSupervisorToken(identity.tokenSecret, 'victim'), onRelay: (id) => { relayIds.push(id) } })
    const attacker = await startFakeSupervisor({ supervisorUrl, token: signSupervisorToken(identity.tokenSecret, 'attacker') })
    const client = http2.connect(supervisorUrl)
    try {
      const res = fetch(`${publicUrl}/v1/sandboxes/victim/execs?wait=true`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ command: ['id'] }) })
      await waitFor(() => relayIds.length === 1, { timeoutMs: 5000, intervalMs: 10 })
      // The attacker knows the relay id (say it leaked) and holds a valid token of its own.
      const stream = client.request({
        ':method': 'POST',
        ':path': RELAY_PATH_PREFIX + relayIds[0]!,
        authorization: `Bearer ${signSupervisorToken(identity.tokenSecret, 'attacker')}`
      }, { endStream: false })
      const code = await new Promise<number>((resolve) => { stream.on('close', () => resolve(stream.rstCode ?? -1)); stream.on('error', () => {}); stream.resume() })
      expect(code).toBe(http2.constants.NGHTTP2_REFUSED_STREAM)
      // The victim's exec was never served by the attacker: it ends at the relay-open bound.
      const r = await res
      expect(r.status).toBe(504)
      expect(((await r.json()) as any).code).toBe('relay_open_timeout')
      expect(logs.join('')).toContain('relay claim refused')
      expect(attacker.relayRequests).toEqual([])
    } finally {
      client.destroy()
      await victim.close()
      await attacker.close()
      await gw.close()
      rmSync(dataDir, { recursive: true, force: true })
    }
  })
})

describe('browser-style WebSocket auth', () => {
  it('offering the JSON data subprotocol next to the bearer one: the server selects the data one, never the bearer', async () => {
    const { startSandbox } = await import('../helpers/sandbox.js')
    const { default: WebSocket } = await import('ws')
    const s = await startSandbox('embedded', 'ws-auth', { apiTokens: ['browser-token'] })
    try {
      const start = await runWait(s.g.publicUrl, 'ws-auth', ['sh', '-c', 'echo hi; exit 6'], 'browser-token')
      expect(start.body.exitCode).toBe(6)
      const bearer = 'exec-gateway.bearer.' + Buffer.from('browser-token').toString('base64url')
      const ws = new WebSocket(`${s.g.publicUrl.replace(/^http/, 'ws')}/v1/execs/${start.body.id as string}/stream`, ['exec-gateway.v1.json', bearer])
      const events: any[] = []
      ws.on('message', (d) => events.push(JSON.parse(d.toString())))
      const selected = await new Promise<string>((resolve, reject) => {
        ws.on('open', () => resolve(ws.protocol))
        ws.on('unexpected-response', (_q, r) => reject(new Error(`refused ${r.statusCode ?? 0}`)))
        ws.on('error', reject)
      })
      if (ws.readyState !== WebSocket.CLOSED) await new Promise((resolve) => ws.on('close', resolve))
      expect(selected).toBe('exec-gateway.v1.json')
      expect(events.map((e) => e.type)).toEqual(['stdout', 'exit'])
      expect(events[1]).toMatchObject({ exitCode: 6 })
    } finally {
      await s.close()
    }
  })
})
