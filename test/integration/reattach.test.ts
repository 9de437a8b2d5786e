import { afterEach, describe, expect, it } from 'vitest'
import { api, execStart, readEvents } from '../helpers/api.js'
import { createFaultKit, FAST } from '../helpers/fault-kit.js'
import type { TestGateway } from '../helpers/gateway.js'
import type { TcpProxy } from '../helpers/tcp-proxy.js'
import { waitFor } from '../helpers/wait.js'

// CONTRACT §5 rule 4 with real processes: a gateway in-process, a supervisor process (run
// `npx tsc -p tsconfig.json` first) whose connection to the gateway goes through a TCP proxy
// the test resets. Whatever the daemon, a supervisor that dies ends its execs with 503 within
// the reattach bound; a target that does not keep execs fails with 503 at the relay's own bound,
// with no reattach wait. (The reattach cases need a daemon that keeps execs: the gateway side is
// tested against a scripted keeper in test/unit/reattach-run.test.ts.)

const REATTACH_MS = 5000
const kit = createFaultKit({ ...FAST, reattachTimeoutMs: REATTACH_MS })
afterEach(async () => { await kit.cleanup() })

async function sandbox (id: string, sshTarget?: string): Promise<{ g: TestGateway, proxy: TcpProxy, sup: ReturnType<typeof kit.supervisor> }> {
  const g = await kit.gateway()
  const url = new URL(g.supervisorUrl)
  const proxy = await kit.proxyTo(url.hostname, Number(url.port))
  const sup = kit.supervisor(g, id, { gatewayUrl: `http://${proxy.host}:${proxy.port}`, ...(sshTarget === undefined ? {} : { sshTarget }) })
  await g.waitConnected(id)
  return { g, proxy, sup }
}

async function execJson (g: TestGateway, execId: string): Promise<any> {
  return (await api(g.publicUrl, 'GET', `/v1/execs/${execId}`)).body
}

// A hang fails the test instead of timing it out silently.
async function within<T> (p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no result within ${ms} ms`)), ms) })])
  } finally {
    clearTimeout(timer)
  }
}

describe('a supervisor that dies', () => {
  it('SIGKILL of the supervisor: 503 relay_unavailable within the reattach bound', async () => {
    const { g, sup } = await sandbox('keep-kill')
    const execId = await execStart(g.publicUrl, 'keep-kill', { command: ['sleep', '60'] })
    await waitFor(async () => (await execJson(g, execId)).status === 'running', { timeoutMs: 10_000 })
    const t0 = performance.now()
    sup.signal('SIGKILL')
    const events = await within(readEvents(g.publicUrl, execId), REATTACH_MS + 10_000, 'events')
    expect(events.at(-1)).toMatchObject({ type: 'error', code: 'relay_unavailable', status: 503 })
    expect(performance.now() - t0).toBeLessThan(REATTACH_MS + 8000)
  })
})

describe('a target that does not keep execs', () => {
  it('a reset fails the exec with 503 relay_unavailable, as before', async () => {
    const sshd = await kit.scripted(({ channel }) => { channel.on('data', (b: Buffer) => channel.write(b)) })
    const { g, proxy } = await sandbox('plain-reset', `${sshd.host}:${sshd.port}`)
    const execId = await execStart(g.publicUrl, 'plain-reset', { command: ['cat'], interactive: true })
    await waitFor(async () => (await execJson(g, execId)).status === 'running', { timeoutMs: 10_000 })
    const t0 = performance.now()
    proxy.resetAll()
    const events = await within(readEvents(g.publicUrl, execId), 10_000, 'events')
    expect(events.at(-1)).toMatchObject({ type: 'error', code: 'relay_unavailable', status: 503 })
    expect(events.some((e) => e.type === 'relay')).toBe(false)
    // No reattach wait: the bound is the relay's own.
    expect(performance.now() - t0).toBeLessThan(REATTACH_MS)
  })
})
