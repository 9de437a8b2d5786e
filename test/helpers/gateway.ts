import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'
import { buildGateway, type Gateway } from '../../src/app.js'
import { defaultGatewayConfig, type GatewayConfig } from '../../src/config.js'
import { loadDataDir } from '../../src/data-dir.js'
import { signSupervisorToken } from '../../src/tokens.js'
import { waitFor } from './wait.js'

// A real gateway on free loopback ports, in the test process. Timing knobs come from the
// overrides so fault tests can run with intervals of a few hundred ms.

export interface TestGateway {
  gw: Gateway
  publicUrl: string
  supervisorUrl: string
  dataDir: string
  token: (sandboxId: string) => string
  waitConnected: (sandboxId: string, timeoutMs?: number) => Promise<void>
  waitDisconnected: (sandboxId: string, timeoutMs?: number) => Promise<void>
  close: () => Promise<void>
}

export async function startGateway (overrides: Partial<GatewayConfig> = {}): Promise<TestGateway> {
  const dataDir = mkdtempSync(join(tmpdir(), 'egw-data-'))
  const identity = loadDataDir(dataDir)
  // EXEC_GATEWAY_SSH_POOL=false runs the whole suite with one SSH connection per exec.
  const pooling = process.env.EXEC_GATEWAY_SSH_POOL === 'false' ? { sshPool: false } : {}
  // No exec rate limit unless a test asks for one: load, fuzz and soak runs create thousands of
  // execs a minute from one address, and the limit has its own tests.
  const config = defaultGatewayConfig({ dataDir, shutdownGraceMs: 1000, execRateLimitPerMinute: 0, ...pooling, ...overrides })
  const logger = pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' })
  const gw = await buildGateway(config, { logger, identity })
  const { publicUrl, supervisorUrl } = await gw.listen()
  const connected = (id: string): boolean => gw.registry.get(id)?.session !== undefined
  return {
    gw,
    publicUrl,
    supervisorUrl,
    dataDir,
    token: (sandboxId) => signSupervisorToken(identity.tokenSecret, sandboxId),
    waitConnected: async (id, timeoutMs = 10_000) => { await waitFor(() => connected(id), { timeoutMs, intervalMs: 20 }) },
    waitDisconnected: async (id, timeoutMs = 10_000) => { await waitFor(() => !connected(id), { timeoutMs, intervalMs: 20 }) },
    close: async () => {
      await gw.close()
      rmSync(dataDir, { recursive: true, force: true })
    }
  }
}
