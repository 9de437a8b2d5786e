import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import WebSocket from 'ws'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { startOpenSshd, sandboxAccount, type OpenSshd } from '../helpers/openssh.js'
import { startGateway, type TestGateway } from '../helpers/gateway.js'
import { waitFor } from '../helpers/wait.js'
import { generateEd25519KeyPair } from '../../src/ssh-keys.js'
import { publicKeyOf } from '../../src/data-dir.js'
import { WS_MAX_PAYLOAD_BYTES } from '../../src/http/public-app.js'
import { api, type ApiResponse } from '../helpers/api.js'

// Per-token rate limit on exec creation, the running-exec cap per sandbox, the WebSocket
// payload bound, and the SSH host key a supervisor reports for an OpenSSH target.

async function post (url: string, body: unknown, token?: string): Promise<ApiResponse> {
  return await api(url, 'POST', '', body, token === undefined ? {} : { authorization: `Bearer ${token}` })
}

describe('exec creation rate limit, per API token', () => {
  let s: TestSandbox
  beforeAll(async () => { s = await startSandbox('embedded', 'rl', { apiTokens: ['tok-a', 'tok-b'], execRateLimitPerMinute: 3 }) })
  afterAll(async () => { await s?.close() })

  it('the 4th exec in a minute is 429 too_many_requests with Retry-After; another token is unaffected', async () => {
    const url = `${s.g.publicUrl}/v1/sandboxes/rl/execs`
    for (let i = 0; i < 3; i++) expect((await post(url, { command: ['true'] }, 'tok-a')).status).toBe(201)
    const refused = await post(url, { command: ['true'] }, 'tok-a')
    expect(refused.status).toBe(429)
    expect(refused.headers.get('content-type')).toMatch(/^application\/problem\+json/)
    expect(refused.body.code).toBe('too_many_requests')
    expect(refused.body.detail).toMatch(/more than 3 execs a minute/)
    const retryAfter = Number(refused.headers.get('retry-after'))
    expect(retryAfter).toBeGreaterThanOrEqual(1)
    expect(retryAfter).toBeLessThanOrEqual(60)
    // Other routes and other tokens are not limited by tok-a's spending.
    expect((await post(url, { command: ['true'] }, 'tok-b')).status).toBe(201)
    expect((await fetch(`${s.g.publicUrl}/v1/execs`, { headers: { authorization: 'Bearer tok-a' } })).status).toBe(200)
    // A refused request never reaches the exec table.
    expect(s.g.gw.execs.size).toBe(4)
  })

  it('an unauthenticated flood is refused with 401 and spends nobody\'s budget', async () => {
    const url = `${s.g.publicUrl}/v1/sandboxes/rl/execs`
    for (let i = 0; i < 10; i++) expect((await post(url, { command: ['true'] }, 'wrong')).status).toBe(401)
    expect((await post(url, { command: ['true'] }, 'tok-b')).status).toBe(201)
  })
})

describe('exec creation rate limit without tokens', () => {
  it('is kept per client address', async () => {
    const s = await startSandbox('embedded', 'rl-ip', { execRateLimitPerMinute: 2 })
    try {
      const url = `${s.g.publicUrl}/v1/sandboxes/rl-ip/execs`
      expect((await post(url, { command: ['true'] })).status).toBe(201)
      expect((await post(url, { command: ['true'] })).status).toBe(201)
      const third = await post(url, { command: ['true'] })
      expect(third.status).toBe(429)
      expect(third.body.code).toBe('too_many_requests')
      expect(third.headers.get('retry-after')).not.toBeNull()
    } finally {
      await s.close()
    }
  })
})

describe('exec creation rate limit across createExec and runExec', () => {
  it('one budget per token for both ways of starting an exec', async () => {
    const s = await startSandbox('embedded', 'rl-run', { apiTokens: ['tok-r'], execRateLimitPerMinute: 2 })
    try {
      const url = `${s.g.publicUrl}/v1/sandboxes/rl-run/execs`
      expect((await post(url, { command: ['true'] }, 'tok-r')).status).toBe(201)
      expect((await post(`${url}/run`, { command: ['true'] }, 'tok-r')).status).toBe(200)
      for (const target of [url, `${url}/run`]) {
        const refused = await post(target, { command: ['true'] }, 'tok-r')
        expect(refused.status, target).toBe(429)
        expect(refused.body.code).toBe('too_many_requests')
        expect(refused.headers.get('retry-after'), target).not.toBeNull()
      }
      expect(s.g.gw.execs.size).toBe(2)
    } finally {
      await s.close()
    }
  })
})

describe('running execs per sandbox', () => {
  let g: TestGateway
  const sups: SupervisorProcess[] = []
  beforeAll(async () => {
    g = await startGateway({ maxRunningExecsPerSandbox: 2 })
    for (const id of ['cap-a', 'cap-b']) {
      sups.push(startSupervisorProcess({ gatewayUrl: g.supervisorUrl, sandboxId: id, token: g.token(id) }))
      await g.waitConnected(id)
    }
  })
  afterAll(async () => {
    for (const p of sups) await p.stop()
    await g?.close()
  })

  it('beyond the cap: 429 with Retry-After; other sandboxes unaffected; room again when one ends', async () => {
    const url = (id: string): string => `${g.publicUrl}/v1/sandboxes/${id}/execs`
    const first = await post(url('cap-a'), { command: ['sleep', '30'] })
    const second = await post(url('cap-a'), { command: ['sleep', '30'] })
    expect([first.status, second.status]).toEqual([201, 201])
    const third = await post(url('cap-a'), { command: ['echo', 'no room'] })
    expect(third.status).toBe(429)
    expect(third.body.code).toBe('too_many_requests')
    expect(third.body.detail).toMatch(/already has 2 execs running/)
    expect(third.headers.get('retry-after')).toBe('1')
    // ?wait=true is refused the same way, before anything runs.
    expect((await post(url('cap-a') + '?wait=true', { command: ['echo', 'no room'] })).status).toBe(429)
    const other = await post(url('cap-b') + '?wait=true', { command: ['echo', 'other sandbox'] })
    expect(other.body.stdout).toBe('other sandbox\n')

    expect((await fetch(`${g.publicUrl}/v1/execs/${first.body.id as string}`, { method: 'DELETE' })).status).toBe(204)
    await waitFor(async () => (await api(g.publicUrl, 'GET', '/v1/sandboxes/cap-a')).body.activeExecs < 2, { timeoutMs: 10_000, intervalMs: 20 })
    const again = await post(url('cap-a') + '?wait=true', { command: ['echo', 'room again'] })
    expect(again.status).toBe(200)
    expect(again.body.stdout).toBe('room again\n')
    await fetch(`${g.publicUrl}/v1/execs/${second.body.id as string}`, { method: 'DELETE' })
  })
})

describe('WebSocket frames over maxPayload', () => {
  it('close the socket with 1009 and leave the exec and the gateway running', async () => {
    const s = await startSandbox('embedded', 'ws-big')
    try {
      const start = await post(`${s.g.publicUrl}/v1/sandboxes/ws-big/execs`, { command: ['cat'], interactive: true })
      const id = start.body.id as string
      const statusOf = async (): Promise<string> => ((await (await fetch(`${s.g.publicUrl}/v1/execs/${id}`)).json()) as any).status
      await waitFor(async () => (await statusOf()) === 'running', { timeoutMs: 10_000, intervalMs: 20 })
      const ws = new WebSocket(`${s.g.publicUrl.replace(/^http/, 'ws')}/v1/execs/${id}/stream`)
      await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
      const closed = new Promise<number>((resolve) => ws.once('close', (code) => resolve(code)))
      ws.on('error', () => {})
      ws.send(Buffer.alloc(WS_MAX_PAYLOAD_BYTES + 1, 0x61))
      expect(await closed).toBe(1009)
      // The exec is still attachable and still running.
      expect(await statusOf()).toBe('running')
      expect((await fetch(`${s.g.publicUrl}/healthz`)).status).toBe(200)
      await fetch(`${s.g.publicUrl}/v1/execs/${id}`, { method: 'DELETE' })
    } finally {
      await s.close()
    }
  })
})

describe('SSH host key of an OpenSSH target (supervisor --ssh-host-key)', () => {
  let g: TestGateway
  let sshd: OpenSshd
  let dir: string
  const sups: SupervisorProcess[] = []
  beforeAll(async () => {
    g = await startGateway({ sessionWaitMs: 2000 })
    sshd = await startOpenSshd({ authorizedKeys: [g.gw.identity.publicKey] })
    dir = mkdtempSync(join(tmpdir(), 'egw-hostkey-'))
  })
  afterAll(async () => {
    for (const p of sups) await p.stop()
    await g?.close()
    await sshd?.close()
    rmSync(dir, { recursive: true, force: true })
  })

  function supervise (id: string, hostKeyFile: string): SupervisorProcess {
    const sup = startSupervisorProcess({
      gatewayUrl: g.supervisorUrl,
      sandboxId: id,
      token: g.token(id),
      sshTarget: `${sshd.host}:${sshd.port}`,
      sshUser: sandboxAccount(),
      extraArgs: ['--ssh-host-key', hostKeyFile]
    })
    sups.push(sup)
    return sup
  }

  it("the daemon's real key: execs run", async () => {
    const file = join(dir, 'real.pub')
    writeFileSync(file, sshd.hostPublicKey + '\n')
    supervise('hk-real', file)
    await g.waitConnected('hk-real')
    expect(g.gw.registry.get('hk-real')?.sshHostKey).toBe(sshd.hostPublicKey.split(' ').slice(0, 2).join(' '))
    const res = await post(`${g.publicUrl}/v1/sandboxes/hk-real/execs?wait=true`, { command: ['echo', 'pinned'] })
    expect(res.status).toBe(200)
    expect(res.body.stdout).toBe('pinned\n')
  })

  it('another key: 502 ssh_failed naming the host key, and the command never runs', async () => {
    const file = join(dir, 'other.pub')
    writeFileSync(file, publicKeyOf(generateEd25519KeyPair().private) + '\n')
    supervise('hk-other', file)
    await g.waitConnected('hk-other')
    const marker = join(dir, 'ran')
    const res = await post(`${g.publicUrl}/v1/sandboxes/hk-other/execs?wait=true`, { command: ['touch', marker] })
    expect(res.status).toBe(502)
    expect(res.body.code).toBe('ssh_failed')
    expect(res.body.detail).toMatch(/host key is not the one its supervisor reported/)
    const { existsSync } = await import('node:fs')
    expect(existsSync(marker)).toBe(false)
  })

  it('a private key or a file that is no key stops the supervisor at start with a clear error', async () => {
    const priv = join(dir, 'id')
    writeFileSync(priv, generateEd25519KeyPair().private)
    const junk = join(dir, 'junk.pub')
    writeFileSync(junk, 'not a key\n')
    for (const [file, message] of [[priv, /is a private key; give the .pub file/], [junk, /is not an SSH public key/]] as const) {
      const sup = supervise('hk-bad', file)
      const code = await new Promise<number | null>((resolve) => sup.proc.once('exit', (c) => resolve(c)))
      expect(code).toBe(2)
      expect(sup.output()).toMatch(message)
    }
  })
})
