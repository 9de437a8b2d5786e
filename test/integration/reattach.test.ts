import { createHash } from 'node:crypto'
import { afterEach, describe, expect, it } from 'vitest'
import { api, execStart, readEvents, readWebSocket, outputOf } from '../helpers/api.js'
import type WebSocket from 'ws'
import { createFaultKit, FAST } from '../helpers/fault-kit.js'
import type { TestGateway } from '../helpers/gateway.js'
import type { TcpProxy } from '../helpers/tcp-proxy.js'
import { waitFor } from '../helpers/wait.js'

// CONTRACT §5 rule 4 with real processes: a gateway in-process, a supervisor process (run
// `npx tsc -p tsconfig.json` first) whose connection to the gateway goes through a TCP proxy
// the test resets. The embedded daemon keeps its execs, so a reset is reattached; a target that
// does not keep them (an ssh2 daemon behind --ssh-target) fails with 503 as before.

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

const sha = (s: string): string => createHash('sha256').update(s).digest('hex')
function seqOutput (n: number): string {
  let out = ''
  for (let i = 1; i <= n; i++) out += `${i}\n`
  return out
}

describe('reattach through a new relay (embedded daemon)', () => {
  it('a reset of the supervisor connection mid-output: true exit, exact bytes', async () => {
    const { g, proxy } = await sandbox('keep-reset')
    // ~5.9 MB, paced so the reset lands mid-output.
    const n = 800_000
    const execId = await execStart(g.publicUrl, 'keep-reset', { command: ['sh', '-c', `seq 1 ${n / 2}; sleep 1; seq ${n / 2 + 1} ${n}; exit 3`] })
    await waitFor(async () => (await execJson(g, execId)).stdoutBytes > 0, { timeoutMs: 10_000, description: 'first output' })
    proxy.resetAll()
    const events = await within(readEvents(g.publicUrl, execId), 30_000, 'events')
    const final = events.at(-1)
    expect(final).toMatchObject({ type: 'exit', exitCode: 3 })
    expect(events.some((e) => e.type === 'gap')).toBe(false)
    expect(sha(outputOf(events, 'stdout'))).toBe(sha(seqOutput(n)))
    expect(await execJson(g, execId)).toMatchObject({ status: 'exited', exitCode: 3 })
  })

  it('interactive: stdin sent before and after a reset arrives exactly once', async () => {
    const { g, proxy } = await sandbox('keep-stdin')
    const execId = await execStart(g.publicUrl, 'keep-stdin', { command: ['cat'], interactive: true })
    let ws: WebSocket | undefined
    const result = readWebSocket(g.publicUrl, execId, { onOpen: (w) => { ws = w } })
    await waitFor(() => ws !== undefined, { timeoutMs: 5000 })
    ws!.send(JSON.stringify({ type: 'stdin', data: 'before\n' }))
    await waitFor(async () => (await execJson(g, execId)).stdoutBytes === 7, { timeoutMs: 10_000 })
    proxy.resetAll()
    ws!.send(JSON.stringify({ type: 'stdin', data: 'after\n' }))
    await waitFor(async () => (await execJson(g, execId)).stdoutBytes === 13, { timeoutMs: 15_000, description: 'echo after the reset' })
    ws!.send(JSON.stringify({ type: 'eof' }))
    const { events } = await within(result, 10_000, 'ws close')
    expect(events.at(-1)).toMatchObject({ type: 'exit', exitCode: 0 })
    expect(outputOf(events, 'stdout')).toBe('before\nafter\n')
  })

  it('a blackhole shorter than the reattach bound: true exit, exact bytes', async () => {
    const { g, proxy } = await sandbox('keep-blackhole')
    const execId = await execStart(g.publicUrl, 'keep-blackhole', { command: ['sh', '-c', 'echo one; sleep 4; echo two; exit 5'] })
    await waitFor(async () => (await execJson(g, execId)).stdoutBytes === 4, { timeoutMs: 10_000 })
    // Past the keepalive and ping bounds (FAST: ~1.2 s and 0.8 s), short of REATTACH_MS.
    proxy.blackholeAll()
    await new Promise((resolve) => setTimeout(resolve, 2500))
    proxy.setMode('pass')
    const events = await within(readEvents(g.publicUrl, execId), 20_000, 'events')
    expect(events.at(-1)).toMatchObject({ type: 'exit', exitCode: 5 })
    expect(outputOf(events, 'stdout')).toBe('one\ntwo\n')
  })

  it('a SIGSTOP of the supervisor shorter than the bound: true exit; longer: 503', async () => {
    const { g, sup } = await sandbox('keep-stop')
    const short = await execStart(g.publicUrl, 'keep-stop', { command: ['sh', '-c', 'echo a; sleep 3; echo b'] })
    await waitFor(async () => (await execJson(g, short)).stdoutBytes === 2, { timeoutMs: 10_000 })
    sup.signal('SIGSTOP')
    await new Promise((resolve) => setTimeout(resolve, 2500))
    sup.signal('SIGCONT')
    const events = await within(readEvents(g.publicUrl, short), 20_000, 'events')
    expect(events.at(-1)).toMatchObject({ type: 'exit', exitCode: 0 })
    expect(outputOf(events, 'stdout')).toBe('a\nb\n')
    const long = await execStart(g.publicUrl, 'keep-stop', { command: ['sleep', '60'] })
    await waitFor(async () => (await execJson(g, long)).status === 'running', { timeoutMs: 10_000 })
    const t0 = performance.now()
    sup.signal('SIGSTOP')
    try {
      const longEvents = await within(readEvents(g.publicUrl, long), REATTACH_MS + 10_000, 'events')
      expect(longEvents.at(-1)).toMatchObject({ type: 'error', code: 'relay_unavailable', status: 503 })
      expect(performance.now() - t0).toBeLessThan(REATTACH_MS + 8000)
    } finally {
      sup.signal('SIGCONT')
    }
  })

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
