import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildGateway } from '../../src/app.js'
import { defaultGatewayConfig } from '../../src/config.js'
import { loadDataDir } from '../../src/data-dir.js'
import { signSupervisorToken } from '../../src/tokens.js'
import { api, outputOf, readWebSocket } from '../helpers/api.js'
import { startRedisServer } from '../helpers/redis-server.js'
import { startSupervisorProcess } from '../helpers/supervisor-process.js'
import { waitFor } from '../helpers/wait.js'

// Exec read tokens in cluster mode: any replica verifies what any other minted (they share the
// data dir's token secret), a request for an exec another replica holds is forwarded with the
// replica key once the edge has checked the token, and the owner keeps a forwarded attach
// read-only. Two real replicas with --api-token, a real redis-server, one supervisor on r0.

const BEARER = { authorization: 'Bearer ops-token' }

describe('read tokens across replicas', () => {
  const cleanups: Array<() => Promise<void>> = []
  const urls: string[] = []
  afterAll(async () => { for (const c of cleanups.splice(0).reverse()) await c().catch(() => {}) })

  beforeAll(async () => {
    const redis = await startRedisServer()
    cleanups.push(async () => { await redis.stop() })
    const dataDir = mkdtempSync(join(tmpdir(), 'egw-cluster-rt-'))
    cleanups.push(async () => { rmSync(dataDir, { recursive: true, force: true }) })
    const identity = loadDataDir(dataDir)
    for (const replicaId of ['r0', 'r1']) {
      const config = defaultGatewayConfig({ dataDir, redisUrl: redis.url, replicaId, apiTokens: ['ops-token'], shutdownGraceMs: 1000, execRateLimitPerMinute: 0 })
      const gw = await buildGateway(config, { logger: pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' }), identity })
      const { publicUrl, supervisorUrl } = await gw.listen()
      cleanups.push(async () => { await gw.close() })
      urls.push(publicUrl)
      if (replicaId === 'r0') {
        const sup = startSupervisorProcess({ gatewayUrl: supervisorUrl, sandboxId: 'rt-box', token: signSupervisorToken(identity.tokenSecret, 'rt-box') })
        cleanups.push(async () => { await sup.stop() })
        await waitFor(() => gw.registry.get('rt-box')?.session !== undefined, { timeoutMs: 10_000, description: 'rt-box on r0' })
      }
    }
  }, 30_000)

  it('minted through r1 for r0\'s exec, it opens /events and a read-only /stream through either replica', async () => {
    const [r0, r1] = urls as [string, string]
    // Created through r1: forwarded to r0, which holds the sandbox.
    const created = await api(r1, 'POST', '/v1/sandboxes/rt-box/execs', { command: ['sh', '-c', 'echo ready; read line; echo "got $line"'], interactive: true }, BEARER)
    expect(created.status, created.text).toBe(201)
    const id = created.body.id as string
    const minted = await api(r1, 'POST', `/v1/execs/${id}/read-token`, undefined, BEARER)
    expect(minted.status, minted.text).toBe(201)
    const { token, eventsUrl } = minted.body as { token: string, eventsUrl: string }

    for (const url of [r0, r1]) {
      const ws = await readWebSocket(url, id, {
        query: `?access_token=${token}`,
        onOpen: (sock) => { sock.once('message', () => sock.send(JSON.stringify({ type: 'stdin', data: 'typed\n' }))) }
      })
      expect(ws.closeCode, url).toBe(1008)
      expect(ws.closeReason).toMatch(/read-only/)
      expect(outputOf(ws.events, 'stdout')).toBe('ready\n')
      // Refused at the edge (r1 forwards nothing it would not admit) as on the owner.
      await expect(readWebSocket(url, id, { query: '?access_token=egr1.9999999999.AAAA' })).rejects.toThrow(/401/)
      expect((await api(url, 'GET', `/v1/execs/${id}?access_token=${token}`)).status).toBe(401)
    }
    const state = await api(r1, 'GET', `/v1/execs/${id}`, undefined, BEARER)
    expect(state.body).toMatchObject({ status: 'running', stdinBytes: 0 })
    await api(r0, 'POST', `/v1/execs/${id}/signal`, { signal: 'KILL' }, BEARER)
    for (const url of [r0, r1]) {
      const res = await fetch(url + eventsUrl, { headers: { accept: 'text/event-stream' } })
      expect(res.status, url).toBe(200)
      const text = await res.text()
      expect(text).toContain('"data":"ready\\n"')
      expect(text).toMatch(/^id: \d+-\d+-end$/m)
    }
  }, 30_000)
})
