import { createHash, randomBytes } from 'node:crypto'
import { afterEach, describe, expect, it } from 'vitest'
import type { Outcome } from '../../src/relay/outcome.js'
import { decodeKeepMeta, KEEP_ENV } from '../../src/schemas/keeper.js'
import { waitFor } from '../helpers/wait.js'
import { startRig, stdoutOf, TIMEOUT_EXIT_MESSAGE, treeSignals, type Rig } from './reattach-rig.js'
import { within } from '../helpers/restart-readers.js'

// ExecRun's reattach loop, end to end over real sockets and real ssh2 on both sides: the daemon
// is an ssh2 server that speaks the keeper protocol (reattach-rig.ts), the relay a TCP
// connection the test cuts.

const rigs: Rig[] = []
afterEach(async () => { for (const r of rigs.splice(0)) await r.close() })

async function rig (opts: Parameters<typeof startRig>[0] = {}): Promise<Rig> {
  const r = await startRig(opts)
  rigs.push(r)
  return r
}

// The daemon took the exec request and the gateway has its answer: the command runs.
async function started (r: Rig, entry: { id: string, startedAt: Date | undefined }): Promise<void> {
  await waitFor(() => r.kept.has(entry.id) && entry.startedAt !== undefined, { timeoutMs: 5000, description: `exec ${entry.id} started` })
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

function hooks (entry: object): string[] {
  const seen: string[] = []
  Object.assign(entry, { relayLost: () => seen.push('lost'), relayRestored: () => seen.push('restored') })
  return seen
}

describe('reattach of a kept exec', () => {
  it('starts a kept exec with its meta in KEEP_ENV before the exec request', async () => {
    const r = await rig()
    const { entry, done } = r.start({ command: ['sleep', '1'], timeoutSeconds: 7 })
    await started(r, entry)
    const meta = decodeKeepMeta(r.envSeen[0]![KEEP_ENV]!)
    expect(meta).toMatchObject({ v: 1, execId: entry.id, command: ['sleep', '1'], tty: false, interactive: false, timeoutSeconds: 7 })
    r.kept.get(entry.id)!.finish({ code: 3 })
    const outcome = await within(done, 5000, 'exec end')
    expect(outcome).toMatchObject({ kind: 'exited', exitCode: 3 })
  })

  it('a command line too long for the keeper meta runs unkept, as before', async () => {
    const r = await rig()
    const { entry, done } = r.start({ command: ['echo', 'x'.repeat(25_000)] })
    await waitFor(() => entry.startedAt !== undefined, { timeoutMs: 5000 })
    expect(r.kept.size).toBe(0)
    expect(r.envSeen.some((e) => e[KEEP_ENV] !== undefined)).toBe(false)
    r.cut()
    expect(await within(done, 5000, 'exec end')).toMatchObject({ kind: 'failed', error: { code: 'relay_unavailable' } })
  })

  it('a relay reset mid-output is reattached: true exit, exact bytes, lost/restored once each', async () => {
    const r = await rig()
    const { entry, done } = r.start({})
    const seen = hooks(entry)
    await started(r, entry)
    const m = r.kept.get(entry.id)!
    const first = randomBytes(2 * 1024 * 1024)
    m.produce(first)
    await waitFor(() => entry.stdout.total > 0, { timeoutMs: 5000 })
    r.cut()
    // Output made while no channel is attached is the daemon's to replay.
    const second = randomBytes(1024 * 1024 + 17)
    m.produce(second)
    await waitFor(() => seen.includes('restored'), { timeoutMs: 5000, description: 'reattached' })
    const third = randomBytes(4096)
    m.produce(third)
    m.finish({ code: 7 })
    const outcome = await within(done, 10_000, 'exec end')
    expect(outcome).toMatchObject({ kind: 'exited', exitCode: 7 })
    expect(sha(stdoutOf(entry))).toBe(sha(Buffer.concat([first, second, third])))
    expect(seen).toEqual(['lost', 'restored'])
    expect(m.attaches).toBe(2)
  })

  it('stdin sent before, during and after a reset reaches the command exactly once, in flight bytes resent', async () => {
    const r = await rig()
    const { entry, run, done } = r.start({ interactive: true })
    const seen = hooks(entry)
    await started(r, entry)
    const m = r.kept.get(entry.id)!
    run.writeStdin(Buffer.from('before\n'))
    await waitFor(() => m.stdinReceived === 7, { timeoutMs: 5000 })
    // These reach the gateway's channel but never the command: the relay dies under them.
    m.deaf = true
    run.writeStdin(Buffer.from('in-flight\n'))
    await new Promise((resolve) => setTimeout(resolve, 100))
    r.cut()
    m.deaf = false
    run.writeStdin(Buffer.from('while-lost\n'))
    await waitFor(() => seen.includes('restored'), { timeoutMs: 5000 })
    run.writeStdin(Buffer.from('after\n'))
    run.endStdin()
    await waitFor(() => m.stdinEof, { timeoutMs: 5000, description: 'EOF resent on the new channel' })
    m.finish({ code: 0 })
    await within(done, 10_000, 'exec end')
    const want = 'before\nin-flight\nwhile-lost\nafter\n'
    expect(Buffer.concat(m.stdin).toString()).toBe(want)
    expect(stdoutOf(entry).toString()).toBe(want)
  })

  it('a relay lost between the daemon taking the exec request and its answer: reattached, not run twice', async () => {
    const r = await rig()
    const { entry, done } = r.start({ stdin: Buffer.from('spec stdin\n') })
    const seen = hooks(entry)
    await waitFor(() => r.kept.has(entry.id), { timeoutMs: 5000 })
    r.cut()
    const m = r.kept.get(entry.id)!
    await waitFor(() => m.stdinEof, { timeoutMs: 5000, description: 'spec stdin and EOF delivered' })
    m.finish({ code: 0 })
    expect(await within(done, 5000, 'exec end')).toMatchObject({ kind: 'exited', exitCode: 0 })
    expect(Buffer.concat(m.stdin).toString()).toBe('spec stdin\n')
    expect(stdoutOf(entry).toString()).toBe('spec stdin\n')
    expect(r.kept.size).toBe(1)
    expect(seen.at(-1)).toBe('restored')
    expect(entry.startedAt).toBeInstanceOf(Date)
  })

  it('a daemon that no longer knows the exec ends it at once with 503 saying so', async () => {
    const r = await rig()
    const { entry, done } = r.start({})
    await started(r, entry)
    r.kept.clear()
    const t0 = performance.now()
    r.cut()
    const outcome = await within(done, 5000, 'exec end') as Extract<Outcome, { kind: 'failed' }>
    expect(outcome.kind).toBe('failed')
    expect(outcome.error.code).toBe('relay_unavailable')
    expect(outcome.error.detail).toContain(`no longer knows exec ${entry.id}`)
    expect(performance.now() - t0).toBeLessThan(4000)
  })

  it('a supervisor that does not come back within the bound: 503 naming it, within the bound', async () => {
    const r = await rig()
    const { entry, done } = r.start({})
    const seen = hooks(entry)
    await started(r, entry)
    const t0 = performance.now()
    r.disconnect()
    const outcome = await within(done, 8000, 'exec end') as Extract<Outcome, { kind: 'failed' }>
    const took = performance.now() - t0
    expect(outcome.kind).toBe('failed')
    expect(outcome.error.code).toBe('relay_unavailable')
    expect(outcome.error.detail).toMatch(/could not be reattached within 5000 ms: no supervisor of sandbox sb is connected/)
    expect(took).toBeGreaterThan(4500)
    expect(took).toBeLessThan(7000)
    expect(seen).toEqual(['lost'])
  })

  it('a wedged daemon that never answers the reattach: 503 saying so, within the bound', async () => {
    const r = await rig()
    const { entry, done } = r.start({}, { reattachTimeoutMs: 3000 })
    await started(r, entry)
    r.intercept = (command) => command.startsWith('#exec-gateway status')
    const t0 = performance.now()
    r.cut()
    const outcome = await within(done, 6000, 'exec end') as Extract<Outcome, { kind: 'failed' }>
    const took = performance.now() - t0
    expect(outcome.kind).toBe('failed')
    expect(outcome.error.code).toBe('relay_unavailable')
    expect(outcome.error.detail).toMatch(/within 3000 ms: the sandbox's supervisor is connected but the reattach did not succeed \(wedged\?\); the last try( had no answer before the deadline|: relay_unavailable: the sandbox did not answer the keeper's status request)/)
    expect(took).toBeGreaterThan(2800)
    expect(took).toBeLessThan(4500)
  })

  it('a supervisor back within the bound: the exec goes on', async () => {
    const r = await rig()
    const { entry, done } = r.start({})
    const seen = hooks(entry)
    await started(r, entry)
    const m = r.kept.get(entry.id)!
    r.disconnect()
    m.produce(Buffer.from('made while away\n'))
    await new Promise((resolve) => setTimeout(resolve, 1500))
    r.connect()
    await waitFor(() => seen.includes('restored'), { timeoutMs: 5000 })
    m.finish({ code: 0 })
    expect(await within(done, 5000, 'exec end')).toMatchObject({ kind: 'exited', exitCode: 0 })
    expect(stdoutOf(entry).toString()).toBe('made while away\n')
  })

  it('signals sent while the relay is lost are delivered after the reattach, through the keeper', async () => {
    const r = await rig()
    const { entry, run, done } = r.start({})
    const seen = hooks(entry)
    await started(r, entry)
    const m = r.kept.get(entry.id)!
    r.disconnect()
    await waitFor(() => seen.includes('lost'), { timeoutMs: 5000 })
    run.signal('TERM')
    r.connect()
    await waitFor(() => m.signals.includes('TERM'), { timeoutMs: 5000, description: 'TERM delivered' })
    run.signal('USR1')
    await waitFor(() => m.signals.includes('USR1'), { timeoutMs: 5000 })
    m.finish({ signal: 'TERM', message: '' })
    expect(await within(done, 5000, 'exec end')).toMatchObject({ kind: 'signaled', signal: 'TERM' })
  })

  it("the daemon's timeout marker is timedOut with exit code 124", async () => {
    const r = await rig()
    const { entry, done } = r.start({ timeoutSeconds: 60 })
    await started(r, entry)
    r.kept.get(entry.id)!.finish({ signal: 'KILL', message: TIMEOUT_EXIT_MESSAGE })
    expect(await within(done, 5000, 'exec end')).toEqual({ kind: 'exited', exitCode: 124, signal: null, timedOut: true })
  })

  it('an exit-signal KILL without the marker stays a signal', async () => {
    const r = await rig()
    const { entry, done } = r.start({ timeoutSeconds: 60 })
    await started(r, entry)
    r.kept.get(entry.id)!.finish({ signal: 'KILL', message: 'other' })
    expect(await within(done, 5000, 'exec end')).toMatchObject({ kind: 'signaled', signal: 'KILL' })
  })

  it('a target that does not keep execs fails with 503 on a reset, as before', async () => {
    const r = await rig({ keepsExecs: false })
    const { entry, run, done } = r.start({ interactive: true })
    const seen = hooks(entry)
    run.writeStdin(Buffer.from('x'))
    await waitFor(() => entry.stdout.total === 1, { timeoutMs: 5000 })
    expect(r.envSeen[0]![KEEP_ENV]).toBeUndefined()
    r.cut()
    const outcome = await within(done, 5000, 'exec end') as Extract<Outcome, { kind: 'failed' }>
    expect(outcome.kind).toBe('failed')
    expect(outcome.error.code).toBe('relay_unavailable')
    expect(seen).toEqual([])
  })

  it('DELETE of a kept exec kills it through the keeper', async () => {
    const r = await rig()
    const { entry, run, done } = r.start({})
    await started(r, entry)
    run.remove()
    expect(await within(done, 5000, 'exec end')).toMatchObject({ kind: 'signaled', signal: 'KILL' })
    expect(r.kept.get(entry.id)!.signals).toEqual(['KILL'])
  })

  it('an adopted exec attaches from the entry offsets and goes on', async () => {
    const r = await rig()
    // A first run starts it; the "old gateway" then goes away without a word.
    const first = r.start({})
    await waitFor(() => r.kept.has(first.entry.id), { timeoutMs: 5000 })
    const m = r.kept.get(first.entry.id)!
    first.run.abort(new (await import('../../src/errors.js')).GatewayError('shutting_down', 'old gateway gone'))
    await within(first.done, 5000, 'old run end')
    m.channel = undefined
    m.produce(Buffer.from('0123456789'))
    const { ExecEntry } = await import('../../src/execs/exec-entry.js')
    const { ExecRun } = await import('../../src/execs/exec-run.js')
    const { silent } = await import('./reattach-rig.js')
    const { GatewayEvents } = await import('../../src/diagnostics.js')
    const entry = new ExecEntry(first.entry.id, 'sb', first.entry.spec, 1024 * 1024)
    // Surface sets the journal to the offset the new gateway knows: here, 4 bytes seen.
    entry.append('stdout', Buffer.from('0123'))
    const run = new ExecRun(entry, { pool: r.pool, treeSignals: treeSignals(), closeWaitMs: 200, logger: silent, events: new GatewayEvents(), reattachTimeoutMs: 5000, adopt: m.status() })
    const done = run.run()
    await waitFor(() => m.attaches === 2, { timeoutMs: 5000 })
    // Non-interactive: its stdin ends. The EOF follows the attach's answer, so the command is
    // only finished once the daemon has it (an exit first would close the channel before it).
    await waitFor(() => m.stdinEof, { timeoutMs: 5000, description: 'stdin EOF on the new channel' })
    m.finish({ code: 5 })
    expect(await within(done, 5000, 'adopted end')).toMatchObject({ kind: 'exited', exitCode: 5 })
    expect(stdoutOf(entry).toString()).toBe('0123456789')
  })
})
