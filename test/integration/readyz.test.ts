import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'
import { afterAll, describe, expect, it } from 'vitest'
import { buildGateway } from '../../src/app.js'
import { defaultGatewayConfig } from '../../src/config.js'
import { api, execStart } from '../helpers/api.js'
import { startGateway, type TestGateway } from '../helpers/gateway.js'
import { waitFor } from '../helpers/wait.js'

// docs/api.md §3: GET /readyz is 200 while the gateway takes new work and 503 while it starts or
// drains, so a load balancer stops sending work before a replica goes away.

describe('GET /readyz', () => {
  const dirs: string[] = []
  afterAll(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }) })

  it('is 503 "starting" before the listeners are up, open to callers without a token', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'egw-readyz-'))
    dirs.push(dataDir)
    const gw = await buildGateway(defaultGatewayConfig({ dataDir, apiTokens: ['secret-token'] }), { logger: pino({ level: 'silent' }) })
    try {
      const res = await gw.app.inject({ method: 'GET', url: '/readyz', headers: { host: '127.0.0.1' } })
      expect(res.statusCode).toBe(503)
      expect(res.json()).toEqual({ status: 'starting' })
    } finally {
      await gw.close()
    }
  })

  it('is 200 "ready" once listening, and 503 "draining" from the first step of shutdown while execs still run', async () => {
    let g: TestGateway | undefined = await startGateway({ localSandbox: true, shutdownGraceMs: 3000 })
    try {
      const ready = await api(g.publicUrl, 'GET', '/readyz')
      expect(ready.status).toBe(200)
      expect(ready.body).toEqual({ status: 'ready' })
      // An exec that outlives the start of shutdown keeps the gateway draining for the grace.
      await execStart(g.publicUrl, 'local', { command: ['sleep', '2'] })
      const closing = g.close()
      await waitFor(async () => (await api(g!.publicUrl, 'GET', '/readyz')).status === 503, { timeoutMs: 2000, intervalMs: 20, description: '/readyz to turn 503 after close() began' })
      const draining = await api(g.publicUrl, 'GET', '/readyz')
      expect(draining.body).toEqual({ status: 'draining' })
      // New work is refused meanwhile, while the probe says why.
      const refused = await api(g.publicUrl, 'POST', '/v1/sandboxes/local/execs', { command: ['true'] })
      expect(refused.status).toBe(503)
      expect(refused.body.code).toBe('shutting_down')
      await closing
      g = undefined
    } finally {
      await g?.close()
    }
  })
})
