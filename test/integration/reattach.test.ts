import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import WebSocket from 'ws'
import { afterEach, describe, expect, it } from 'vitest'
import { createGatewayClient } from '../../sdk/index.js'
import { api, execStart, readEvents } from '../helpers/api.js'
import { createFaultKit, FAST } from '../helpers/fault-kit.js'
import type { TestGateway } from '../helpers/gateway.js'
import type { TcpProxy } from '../helpers/tcp-proxy.js'
import { sleep, waitFor } from '../helpers/wait.js'
import { runBySh, sha, within } from '../helpers/restart-readers.js'

// docs/api.md §5 rule 4 with real processes: a gateway in-process, a supervisor process (run
// `npx tsc -p tsconfig.json` first) whose connection to the gateway goes through a TCP proxy
// the test resets, blackholes or holds, or whose process it stops. The embedded daemon keeps
// its execs, so each fault shorter than the reattach bound ends with the command's true exit
// and its exact bytes (compared with the same program run by /bin/sh here); a fault longer than
// the bound, a supervisor that dies, or a target that does not keep execs is 503.

const REATTACH_MS = 6000
// When the gateway declares the relay dead: SSH keepalives (interval × (count-max + 1)) or the
// HTTP/2 PING (interval + timeout), whichever comes first.
const KEEPALIVE_BOUND = FAST.sshKeepaliveIntervalMs! * (FAST.sshKeepaliveCountMax! + 1)
const PING_BOUND = FAST.h2PingIntervalMs! + FAST.h2PingTimeoutMs!
const LIVENESS_BOUND = Math.max(KEEPALIVE_BOUND, PING_BOUND)
const SLACK = 2000

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

async function waitEnded (g: TestGateway, execId: string, timeoutMs: number): Promise<any> {
  let exec: any
  await waitFor(async () => {
    exec = await execJson(g, execId)
    return exec.status === 'exited' || exec.status === 'failed'
  }, { timeoutMs, intervalMs: 20, description: `exec ${execId} ended` })
  return exec
}

interface Journal { stdout: Buffer, stderr: Buffer, final: any, events: any[] }

// Reads /events (base64, so bytes are exact) and checks that each stream's chunks follow one
// another with no gap and no byte twice: every chunk starts where the one before it ended.
function checkedJournal (events: any[]): Journal {
  const bytes = { stdout: [] as Buffer[], stderr: [] as Buffer[] }
  const next = { stdout: 0, stderr: 0 }
  for (const ev of events) {
    expect(ev.type, 'no gap').not.toBe('gap')
    if (ev.type !== 'stdout' && ev.type !== 'stderr') continue
    const stream = ev.type as 'stdout' | 'stderr'
    const chunk = Buffer.from(ev.data, 'base64')
    expect(ev.offset, `${stream} chunk at ${next[stream]}`).toBe(next[stream])
    next[stream] += chunk.length
    bytes[stream].push(chunk)
  }
  return { stdout: Buffer.concat(bytes.stdout), stderr: Buffer.concat(bytes.stderr), final: events.at(-1), events }
}

async function journalFrom0 (g: TestGateway, execId: string): Promise<Journal> {
  return checkedJournal(await within(readEvents(g.publicUrl, execId, 'application/x-ndjson', '?encoding=base64'), 20_000, `/events of ${execId} from 0`))
}

interface Follower { events: Array<{ ev: any, at: number }>, done: Promise<void>, relay: () => string[] }

// A live NDJSON reader (base64), each event stamped with when it arrived; bounded by boundMs.
function follow (g: TestGateway, execId: string, boundMs: number): Follower {
  const events: Array<{ ev: any, at: number }> = []
  const signal = AbortSignal.timeout(boundMs)
  const done = (async () => {
    try {
      for await (const ev of createGatewayClient({ baseUrl: g.publicUrl }).streamEvents(execId, { format: 'ndjson', encoding: 'base64', signal })) events.push({ ev, at: performance.now() })
    } catch (err) {
      if (signal.aborted) throw new Error(`live reader of ${execId}: no final event within ${boundMs} ms`)
      throw err
    }
  })()
  // A test that fails before awaiting it must not leave an unhandled rejection behind.
  done.catch(() => {})
  return { events, done, relay: () => events.filter((e) => e.ev.type === 'relay').map((e) => e.ev.state) }
}

async function waitRelay (f: Follower, state: 'lost' | 'restored', timeoutMs: number): Promise<number> {
  await waitFor(() => f.events.some((e) => e.ev.type === 'relay' && e.ev.state === state), { timeoutMs, intervalMs: 10, description: `relay ${state} event` })
  return f.events.find((e) => e.ev.type === 'relay' && e.ev.state === state)!.at
}

// Both streams, steadily, for a couple of seconds; the exit says the program ran to its end.
function chatty (lines: number, exitCode: number): string {
  return `i=0; while [ $i -lt ${lines} ]; do printf 'out %05d abcdefghijklmnopqrstuvwxyz\\n' $i; printf 'err %05d\\n' $i >&2; i=$((i+1)); ` +
    `[ $((i % 10)) -eq 0 ] && sleep 0.05; done; exit ${exitCode}`
}

describe('a kept exec across supervisor connection faults (embedded daemon)', () => {
  it('connection reset mid-exec: a chatty exec and a silent one run on; true exits, exact bytes, no gap or duplicate from offset 0', async () => {
    const { g, proxy } = await sandbox('keep-reset')
    const script = chatty(600, 3)
    const expected = await runBySh(script)
    const chattyId = await execStart(g.publicUrl, 'keep-reset', { command: ['sh', '-c', script] })
    const silentId = await execStart(g.publicUrl, 'keep-reset', { command: ['sh', '-c', 'sleep 3; exit 5'] })
    const live = follow(g, chattyId, REATTACH_MS + 20_000)
    const liveSilent = follow(g, silentId, REATTACH_MS + 20_000)
    await waitFor(async () => (await execJson(g, chattyId)).stdoutBytes > 4000, { timeoutMs: 10_000, description: 'the chatty exec is producing output' })
    await waitFor(async () => (await execJson(g, silentId)).status === 'running', { timeoutMs: 10_000, description: 'the silent exec is running' })
    proxy.resetAll()
    // The reset came mid-output.
    expect((await execJson(g, chattyId)).stdoutBytes).toBeLessThan(expected.stdout.length)

    const [chattyExec, silentExec] = await Promise.all([waitEnded(g, chattyId, REATTACH_MS + 20_000), waitEnded(g, silentId, REATTACH_MS + 10_000)])
    expect(chattyExec).toMatchObject({ status: 'exited', exitCode: 3, signal: null, error: null, stdoutBytes: expected.stdout.length, stderrBytes: expected.stderr.length })
    expect(silentExec).toMatchObject({ status: 'exited', exitCode: 5, signal: null, error: null, stdoutBytes: 0, stderrBytes: 0 })
    await within(Promise.all([live.done, liveSilent.done]), 5000, 'live readers end')
    expect(live.relay()).toEqual(['lost', 'restored'])
    expect(liveSilent.relay()).toEqual(['lost', 'restored'])
    // The live reader saw the same bytes, with no gap or duplicate across the reattach.
    const seenLive = checkedJournal(live.events.map((e) => e.ev))
    expect(sha(seenLive.stdout)).toBe(sha(expected.stdout))
    expect(sha(seenLive.stderr)).toBe(sha(expected.stderr))
    expect(seenLive.final).toEqual({ type: 'exit', exitCode: 3, signal: null, timedOut: false })

    const j = await journalFrom0(g, chattyId)
    expect(j.events.some((e) => e.type === 'relay'), 'a finished exec replays no relay events').toBe(false)
    expect(sha(j.stdout)).toBe(sha(expected.stdout))
    expect(sha(j.stderr)).toBe(sha(expected.stderr))
    expect(j.final).toEqual({ type: 'exit', exitCode: 3, signal: null, timedOut: false })
    expect(expected.code).toBe(3)
  })

  it('interactive exec across a reset: stdin sent before, during the outage (queued) and after reaches the command exactly once', async () => {
    const { g, proxy } = await sandbox('keep-stdin')
    const execId = await execStart(g.publicUrl, 'keep-stdin', { command: ['cat'], interactive: true })
    await waitFor(async () => (await execJson(g, execId)).status === 'running', { timeoutMs: 10_000, description: 'cat running' })
    const part = (tag: string, n: number): string => Array.from({ length: n }, (_v, i) => `${tag} ${String(i).padStart(6, '0')} ${'x'.repeat(50)}\n`).join('')
    const before = part('before', 2000)
    const during = part('during', 2000)
    const after = part('after', 2000)

    const ws = new WebSocket(`${g.publicUrl.replace(/^http/, 'ws')}/v1/execs/${execId}/stream`)
    const events: any[] = []
    const closed = new Promise<number>((resolve, reject) => {
      ws.on('message', (m, isBinary) => { if (!isBinary) events.push(JSON.parse(m.toString())) })
      ws.on('error', reject)
      ws.on('close', (code) => resolve(code))
    })
    closed.catch(() => {})
    kit.defer(() => { ws.terminate() })
    await within(new Promise((resolve) => ws.once('open', resolve)), 5000, 'websocket open')
    const sendInFrames = (text: string): void => {
      for (let i = 0; i < text.length; i += 16_384) ws.send(JSON.stringify({ type: 'stdin', data: text.slice(i, i + 16_384) }))
    }
    const relayStates = (): string[] => events.filter((e) => e.type === 'relay').map((e) => e.state)

    sendInFrames(before)
    await waitFor(async () => (await execJson(g, execId)).stdoutBytes === before.length, { timeoutMs: 10_000, description: 'cat echoed the stdin sent before the reset' })

    // Reset, and hold the supervisor's reconnect in the proxy: the outage lasts until 'pass'.
    proxy.resetAll()
    proxy.blackholeAll()
    await waitFor(() => relayStates().includes('lost'), { timeoutMs: 5000, intervalMs: 10, description: 'relay lost event' })
    sendInFrames(during)
    await sleep(800)
    expect(relayStates(), 'the stdin above was sent while the relay was down').toEqual(['lost'])
    expect((await execJson(g, execId)).stdoutBytes).toBe(before.length)
    proxy.setMode('pass')
    await waitFor(() => relayStates().includes('restored'), { timeoutMs: REATTACH_MS, intervalMs: 10, description: 'relay restored event' })
    sendInFrames(after)
    ws.send(JSON.stringify({ type: 'eof' }))

    expect(await within(closed, 15_000, 'websocket close after the exit')).toBe(1000)
    expect(events.at(-1)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
    expect(relayStates()).toEqual(['lost', 'restored'])
    const want = Buffer.from(before + during + after)
    const j = await journalFrom0(g, execId)
    expect(j.stdout.length).toBe(want.length)
    expect(sha(j.stdout)).toBe(sha(want))
    expect(j.stderr.length).toBe(0)
  })

  it('blackhole shorter than the reattach bound: the liveness bound declares the relay dead, the reattach succeeds; true exit, exact bytes, ends soon after the heal', async () => {
    const { g, proxy } = await sandbox('keep-blackhole')
    // Runs on through the blackhole and ends during it: its tail waits in the daemon.
    const script = chatty(200, 6)
    const expected = await runBySh(script)
    const execId = await execStart(g.publicUrl, 'keep-blackhole', { command: ['sh', '-c', script] })
    const live = follow(g, execId, REATTACH_MS + 20_000)
    await waitFor(async () => (await execJson(g, execId)).stdoutBytes > 1000, { timeoutMs: 10_000, description: 'output flowing' })
    const t0 = performance.now()
    proxy.blackholeAll()
    const lostAt = await waitRelay(live, 'lost', LIVENESS_BOUND + SLACK)
    expect(lostAt - t0).toBeLessThan(LIVENESS_BOUND + SLACK)
    await sleep(Math.max(0, t0 + 2500 - performance.now()))
    expect(live.relay()).toEqual(['lost'])
    const healAt = performance.now()
    proxy.setMode('pass')

    const exec = await waitEnded(g, execId, REATTACH_MS + 10_000)
    const endedAt = performance.now()
    expect(exec).toMatchObject({ status: 'exited', exitCode: 6, error: null })
    // The program ended during the blackhole: once the link heals, only the supervisor's
    // reconnect and the attach stand between it and its exit.
    expect(endedAt - healAt).toBeLessThan(3000)
    expect(endedAt - lostAt).toBeLessThan(REATTACH_MS)
    await within(live.done, 5000, 'live reader ends')
    expect(live.relay()).toEqual(['lost', 'restored'])
    const j = await journalFrom0(g, execId)
    expect(sha(j.stdout)).toBe(sha(expected.stdout))
    expect(sha(j.stderr)).toBe(sha(expected.stderr))
    expect(j.final).toEqual({ type: 'exit', exitCode: 6, signal: null, timedOut: false })
  })

  it('SIGSTOP of the supervisor shorter than the reattach bound: true exit and bytes after SIGCONT', async () => {
    const { g, sup } = await sandbox('keep-stop')
    const script = 'echo before; sleep 3; echo after >&2; exit 9'
    const expected = await runBySh(script)
    const execId = await execStart(g.publicUrl, 'keep-stop', { command: ['sh', '-c', script] })
    const live = follow(g, execId, REATTACH_MS + 20_000)
    await waitFor(async () => (await execJson(g, execId)).stdoutBytes === 7, { timeoutMs: 10_000, description: 'first line out' })
    const t0 = performance.now()
    sup.signal('SIGSTOP')
    const lostAt = await waitRelay(live, 'lost', LIVENESS_BOUND + SLACK)
    expect(lostAt - t0).toBeLessThan(LIVENESS_BOUND + SLACK)
    await sleep(Math.max(0, t0 + 2500 - performance.now()))
    sup.signal('SIGCONT')
    const contAt = performance.now()

    const exec = await waitEnded(g, execId, REATTACH_MS + 10_000)
    expect(exec).toMatchObject({ status: 'exited', exitCode: 9, error: null })
    expect(performance.now() - lostAt).toBeLessThan(REATTACH_MS)
    expect(performance.now() - contAt).toBeLessThan(REATTACH_MS)
    await within(live.done, 5000, 'live reader ends')
    expect(live.relay()).toEqual(['lost', 'restored'])
    const j = await journalFrom0(g, execId)
    expect(j.stdout.toString()).toBe(expected.stdout.toString())
    expect(j.stderr.toString()).toBe(expected.stderr.toString())
    expect(j.final).toEqual({ type: 'exit', exitCode: 9, signal: null, timedOut: false })
  })

  it('SIGSTOP of the supervisor longer than the reattach bound: 503 relay_unavailable within liveness + reattach bound, detail saying no supervisor is back', async () => {
    const { g, sup } = await sandbox('keep-stop-long')
    const execId = await execStart(g.publicUrl, 'keep-stop-long', { command: ['sh', '-c', 'echo started; sleep 60'] })
    const live = follow(g, execId, LIVENESS_BOUND + REATTACH_MS + SLACK + 10_000)
    await waitFor(async () => (await execJson(g, execId)).stdoutBytes === 8, { timeoutMs: 10_000, description: 'started' })
    const t0 = performance.now()
    sup.signal('SIGSTOP')
    const exec = await waitEnded(g, execId, LIVENESS_BOUND + REATTACH_MS + SLACK + 5000)
    const ms = performance.now() - t0
    expect(exec).toMatchObject({ status: 'failed', exitCode: null, error: { code: 'relay_unavailable', status: 503 } })
    expect(exec.error.detail).toContain(`could not be reattached within ${REATTACH_MS} ms`)
    expect(exec.error.detail).toContain('no supervisor of sandbox keep-stop-long is connected')
    // It waited for the reattach, and no longer than the bounds allow.
    expect(ms).toBeGreaterThanOrEqual(REATTACH_MS)
    expect(ms).toBeLessThan(LIVENESS_BOUND + REATTACH_MS + SLACK)
    await within(live.done, 5000, 'live reader ends')
    expect(live.relay()).toEqual(['lost'])
    expect(live.events.at(-1)!.ev).toMatchObject({ type: 'error', code: 'relay_unavailable', status: 503 })
    expect(live.events.filter((e) => e.ev.type === 'stdout').map((e) => Buffer.from(e.ev.data, 'base64').toString()).join('')).toBe('started\n')
  })

  it('1.5 MiB produced while the relay is down and nobody is attached (within the quarter of --keep-bytes-per-exec a stream may hold unsent): after the reattach every byte arrives once', async () => {
    const { g, proxy } = await sandbox('keep-4mib')
    const dir = mkdtempSync(join(tmpdir(), 'egw-4mib-'))
    kit.defer(() => { rmSync(dir, { recursive: true, force: true }) })
    // Waits for the test's go, writes 1.5 MiB and a stderr line, and says when it is done.
    const program = (d: string): string => `while [ ! -e ${d}/go ]; do sleep 0.05; done; seq 1 1000000 | head -c 1572864; echo tail >&2; : > ${d}/done; exit 4`
    const refDir = mkdtempSync(join(tmpdir(), 'egw-4mib-ref-'))
    writeFileSync(join(refDir, 'go'), '')
    const expected = await runBySh(program(refDir))
    rmSync(refDir, { recursive: true, force: true })
    expect(expected.stdout.length).toBe(1572864)

    const execId = await execStart(g.publicUrl, 'keep-4mib', { command: ['sh', '-c', program(dir)] })
    await waitFor(async () => (await execJson(g, execId)).status === 'running', { timeoutMs: 10_000, description: 'running' })
    proxy.resetAll()
    proxy.blackholeAll()
    await g.waitDisconnected('keep-4mib', 2000)
    const downAt = performance.now()
    writeFileSync(join(dir, 'go'), '')
    await waitFor(() => existsSync(join(dir, 'done')), { timeoutMs: 4000, description: 'the program wrote its 1.5 MiB with the relay down' })
    // Produced while the relay was down: none of it has reached the gateway yet.
    expect((await execJson(g, execId)).stdoutBytes).toBe(0)
    proxy.setMode('pass')

    const exec = await waitEnded(g, execId, REATTACH_MS + 15_000)
    expect(exec).toMatchObject({ status: 'exited', exitCode: 4, error: null, stdoutBytes: 1572864, stderrBytes: 5 })
    expect(performance.now() - downAt).toBeLessThan(REATTACH_MS + 5000)
    const j = await journalFrom0(g, execId)
    expect(j.stdout.length).toBe(expected.stdout.length)
    expect(sha(j.stdout)).toBe(sha(expected.stdout))
    expect(j.stderr.toString()).toBe('tail\n')
    expect(j.final).toEqual({ type: 'exit', exitCode: 4, signal: null, timedOut: false })
  })
})

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
