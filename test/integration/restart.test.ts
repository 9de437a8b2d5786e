import { randomBytes } from 'node:crypto'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, expect, it, onTestFailed } from 'vitest'
import { api, execStart, execWait } from '../helpers/api.js'
import {
  eventsFrom0, openOffsetReader, runBySh, sha, startDashboardReader, within,
  type OffsetJournal, type OffsetReader, type Offsets, type ShRun
} from '../helpers/restart-readers.js'
import { startRestartRig, type RestartRig } from '../helpers/restart-rig.js'
import { sleep, waitFor } from '../helpers/wait.js'

// Issue 13, "a restarted gateway finds its execs again", with real processes only: an
// `exec-gateway serve` process (run `npx tsc -p tsconfig.json` first: the processes run dist/)
// on a data dir the test owns, and an `exec-gateway supervisor` process dialling it. The test
// SIGKILLs the gateway mid-exec and starts a new one on the same data dir and ports; the
// supervisor reconnects by itself, and its embedded daemon, which kept the exec, lets the new
// gateway rebuild it. Each exec must then end with its true exit status and exactly the bytes
// /bin/sh gives for the same program: over /events from offset 0, and over a WebSocket resumed
// from the offsets its reader had reached when the gateway died (no gap, no byte twice).
// OpenSSH keeps nothing: its exec is unknown to the new gateway (404 once the session wait ends).

const SESSION_WAIT_MS = 8000
const REATTACH_MS = 8000
const SERVE_ARGS = ['--session-wait-ms', String(SESSION_WAIT_MS), '--reattach-timeout-ms', String(REATTACH_MS)]
// The supervisor's backoff is at most 5 s; then it lists what its daemon keeps.
const BACK_BOUND_MS = 5000 + SESSION_WAIT_MS + 5000

let rig: RestartRig | undefined
const scratch: string[] = []
afterEach(async () => {
  await rig?.close()
  rig = undefined
  for (const d of scratch.splice(0)) rmSync(d, { recursive: true, force: true })
})

async function sandbox (id: string, openssh = false): Promise<RestartRig> {
  rig = await startRestartRig({ sandboxId: id, serveArgs: SERVE_ARGS, ...(openssh ? { openssh } : {}) })
  const r = rig
  onTestFailed(() => { console.error(`restart test ${id} failed; processes said:\n${r.diagnostics()}`) })
  return r
}

async function execJson (r: RestartRig, execId: string): Promise<any> {
  return (await api(r.gw.publicUrl, 'GET', `/v1/execs/${execId}`)).body
}

async function waitEnded (r: RestartRig, execId: string, timeoutMs: number): Promise<any> {
  let exec: any
  await waitFor(async () => {
    exec = await execJson(r, execId)
    return exec.status === 'exited' || exec.status === 'failed'
  }, { timeoutMs, intervalMs: 50, description: `exec ${execId} ended on the restarted gateway` })
  return exec
}

interface AcrossRestart {
  // The Exec record just before the kill.
  before: any
  // Where the reader had got to when the gateway died.
  cutAt: Offsets
  // What the first reader got, and what the one resumed from cutAt got.
  first: OffsetJournal
  resumed: OffsetJournal
  resumedClose: number
}

interface Phases {
  // Read (over the first reader) until this holds, then kill.
  killWhen: (first: OffsetJournal) => boolean | Promise<boolean>
  first?: (reader: OffsetReader) => Promise<void>
  whileDown?: () => Promise<void>
  // Before the resumed reader attaches (e.g. wait for the end so it all comes from retention).
  beforeResume?: () => Promise<void>
  resumed?: (reader: OffsetReader) => Promise<void>
  endBoundMs?: number
}

// Reader from 0 → SIGKILL the gateway mid-exec → a new gateway on the same data dir and ports
// → a reader resumed from the old reader's offsets, until the final event.
async function acrossRestart (r: RestartRig, execId: string, p: Phases): Promise<AcrossRestart> {
  const reader = openOffsetReader(r.gw.publicUrl, execId)
  await within(reader.opened, 10_000, 'first reader opens')
  await p.first?.(reader)
  await waitFor(async () => await p.killWhen(reader.journal), { timeoutMs: 20_000, intervalMs: 10, description: `exec ${execId}: the point to kill the gateway at` })
  const before = await execJson(r, execId)
  const killedAt = performance.now()
  await r.kill()
  expect(await within(reader.closed, 5000, 'first reader sees the gateway die'), 'the dead gateway closed no socket cleanly').toBe(1006)
  expect(reader.journal.final, 'the exec was still running when the gateway died').toBeUndefined()
  const cutAt = { ...reader.journal.next }
  await p.whileDown?.()
  await r.restart()
  await p.beforeResume?.()
  const resumed = openOffsetReader(r.gw.publicUrl, execId, cutAt)
  // An exec the gateway does not know yet is looked up until its supervisor reports it.
  await within(resumed.opened, BACK_BOUND_MS, `WebSocket of ${execId} on the restarted gateway opens`)
  console.log(`restart ${r.sandboxId}: SIGKILL → new gateway listening ${Math.round(r.listeningAt - killedAt)} ms; listening → resumed WebSocket open ${Math.round(performance.now() - r.listeningAt)} ms; cut at ${JSON.stringify(reader.journal.next)}`)
  await p.resumed?.(resumed)
  const resumedClose = await within(resumed.closed, p.endBoundMs ?? 30_000, `resumed reader of ${execId} gets its final event`)
  return { before, cutAt, first: reader.journal, resumed: resumed.journal, resumedClose }
}

// Both readers' bytes, joined at the cut, and /events from 0 on the restarted gateway, against
// the oracle; the same outcome in the final events and the record.
async function expectExact (r: RestartRig, execId: string, run: AcrossRestart, want: { stdout: Buffer, stderr: Buffer }, final: Record<string, unknown>): Promise<void> {
  expect(run.first.problems, 'first reader: offsets continuous').toEqual([])
  expect(run.resumed.problems, 'resumed reader: offsets continuous from the cut, no gap, no duplicate').toEqual([])
  expect(run.resumedClose).toBe(1000)
  const joined = { stdout: Buffer.concat([run.first.bytes('stdout'), run.resumed.bytes('stdout')]), stderr: Buffer.concat([run.first.bytes('stderr'), run.resumed.bytes('stderr')]) }
  expect({ stdout: joined.stdout.length, stderr: joined.stderr.length }, 'bytes across the restart').toEqual({ stdout: want.stdout.length, stderr: want.stderr.length })
  expect(sha(joined.stdout)).toBe(sha(want.stdout))
  expect(sha(joined.stderr)).toBe(sha(want.stderr))
  expect(run.resumed.final).toEqual({ type: 'exit', ...final })

  const from0 = await eventsFrom0(r.gw.publicUrl, execId, 20_000)
  expect(from0.problems, '/events from 0: no gap, no duplicate').toEqual([])
  expect(sha(from0.bytes('stdout'))).toBe(sha(want.stdout))
  expect(sha(from0.bytes('stderr'))).toBe(sha(want.stderr))
  expect(from0.final).toEqual({ type: 'exit', ...final })

  const exec = await execJson(r, execId)
  expect(exec).toMatchObject({ id: execId, status: 'exited', error: null, stdoutBytes: want.stdout.length, stderrBytes: want.stderr.length, ...final })
  expect({ command: exec.command, createdAt: exec.createdAt, tty: exec.tty, interactive: exec.interactive }).toEqual({ command: run.before.command, createdAt: run.before.createdAt, tty: run.before.tty, interactive: run.before.interactive })
}

const seenBytes = (j: OffsetJournal): number => j.next.stdout + j.next.stderr

function scratchDir (): string {
  const dir = mkdtempSync(join(tmpdir(), 'egw-restart-'))
  scratch.push(dir)
  return dir
}

interface StdinPump {
  // Bytes handed to the socket so far (from the start offset on).
  sent: number
  // Resolves with `sent` once all of it went out, or the socket closed.
  done: Promise<number>
}

// stdin frames (ASCII payload in JSON text frames) from offset `from`, at most 1 MiB handed to
// the socket and not yet written, as the soak's clients pace themselves.
function pumpStdin (reader: OffsetReader, payload: Buffer, from: number): StdinPump {
  const ws = reader.ws
  const pump: StdinPump = { sent: from, done: Promise.resolve(from) }
  pump.done = new Promise((resolve) => {
    let unsent = 0
    const step = (): void => {
      while (ws.readyState === ws.OPEN && pump.sent < payload.length && unsent < 1024 * 1024) {
        const n = Math.min(payload.length - pump.sent, 32 * 1024)
        const chunk = payload.subarray(pump.sent, pump.sent + n)
        pump.sent += n
        unsent += n
        ws.send(JSON.stringify({ type: 'stdin', data: chunk.toString('latin1') }), () => {
          unsent -= n
          if (unsent < 256 * 1024) setImmediate(step)
        })
      }
      if (ws.readyState !== ws.OPEN || (pump.sent === payload.length && unsent === 0)) resolve(pump.sent)
    }
    ws.once('close', () => resolve(pump.sent))
    step()
  })
  return pump
}

// A line on each stream every 50 ms; the exit code says it ran to its end.
function chatty (lines: number, exitCode: number): string {
  return `i=0; while [ $i -lt ${lines} ]; do printf 'out %04d abcdefghijklmnopqrstuvwxyz\\n' $i; printf 'err %04d\\n' $i >&2; i=$((i+1)); sleep 0.05; done; exit ${exitCode}`
}

describe('a gateway SIGKILLed and restarted on the same data dir finds the embedded daemon\'s execs again', () => {
  it('silent exec (sleep 6; echo late; exit 7): true exit 7 and "late\\n" on the restarted gateway', async () => {
    const r = await sandbox('rs-silent')
    const script = 'sleep 6; echo late; exit 7'
    const execId = await execStart(r.gw.publicUrl, r.sandboxId, { command: ['sh', '-c', script] })
    const run = await acrossRestart(r, execId, { killWhen: async () => (await execJson(r, execId)).status === 'running' })
    expect(run.cutAt).toEqual({ stdout: 0, stderr: 0 })
    const want = await runBySh(script)
    expect(want.code).toBe(7)
    await expectExact(r, execId, run, want, { exitCode: 7, signal: null, timedOut: false })
  }, 90_000)

  it('chatty exec, both streams for ~8 s: exact bytes across the restart, and the dashboard-style WebSocket reconnect continues exactly', async () => {
    const r = await sandbox('rs-chatty')
    const script = chatty(160, 3)
    const execId = await execStart(r.gw.publicUrl, r.sandboxId, { command: ['sh', '-c', script] })
    // public/events.js's reader on the same URL: the restarted gateway has the same port.
    const dash = startDashboardReader(r.gw.publicUrl, execId, 60_000)
    const run = await acrossRestart(r, execId, { killWhen: (j) => j.next.stdout >= 20 * 36 && j.next.stderr >= 20 * 9 })
    // The kill came mid-output (the program runs for ~8 s).
    expect(run.cutAt.stdout).toBeLessThan(160 * 36)
    const want = await runBySh(script)
    expect(want.code).toBe(3)
    await expectExact(r, execId, run, want, { exitCode: 3, signal: null, timedOut: false })
    const d = await within(dash.done, 30_000, 'dashboard reader ends')
    expect(d.reconnects, 'the dashboard reader reconnected after the restart').toBeGreaterThanOrEqual(1)
    expect(sha(d.stdout), 'dashboard reader: stdout exact, nothing shown twice').toBe(sha(want.stdout))
    expect(sha(d.stderr), 'dashboard reader: stderr exact').toBe(sha(want.stderr))
    expect(d.final).toEqual({ type: 'exit', exitCode: 3, signal: null, timedOut: false })
  }, 90_000)

  it('6 MiB of binary output, mostly produced while the gateway is down and read by nobody: every byte kept, exact', async () => {
    const r = await sandbox('rs-big')
    const dir = mkdtempSync(join(tmpdir(), 'egw-restart-seed-'))
    scratch.push(dir)
    const seed = join(dir, 'seed.bin')
    const blocks = 24
    writeFileSync(seed, randomBytes(blocks * 262_144))
    // 256 KiB every 250 ms (~6 s): the gateway dies early, and the rest has to wait in the daemon.
    const script = `i=0; while [ $i -lt ${blocks} ]; do dd if=${seed} bs=262144 skip=$i count=1 2>/dev/null; i=$((i+1)); sleep 0.25; done; echo produced $i blocks >&2; exit 5`
    const execId = await execStart(r.gw.publicUrl, r.sandboxId, { command: ['sh', '-c', script] })
    const run = await acrossRestart(r, execId, {
      killWhen: (j) => j.next.stdout >= 262_144,
      // Not a reader in sight until the exec has ended: all of it comes from what was kept.
      beforeResume: async () => { await waitEnded(r, execId, BACK_BOUND_MS + 20_000) },
      endBoundMs: 60_000
    })
    expect(run.cutAt.stdout, 'the kill came mid-output').toBeLessThan(blocks * 262_144 / 2)
    const want = await runBySh(script)
    expect(want.code).toBe(5)
    expect(want.stdout.length).toBe(6 * 1024 * 1024)
    await expectExact(r, execId, run, want, { exitCode: 5, signal: null, timedOut: false })
  }, 120_000)

  it('interactive cat: stdin sent before the kill and after the restart reaches the command once each, in order', async () => {
    const r = await sandbox('rs-stdin')
    const execId = await execStart(r.gw.publicUrl, r.sandboxId, { command: ['cat'], interactive: true })
    const lines = (tag: string, n: number): string => Array.from({ length: n }, (_v, i) => `${tag} ${String(i).padStart(5, '0')} ${'y'.repeat(40)}\n`).join('')
    const before = lines('before', 500)
    const after = lines('after', 500)
    const run = await acrossRestart(r, execId, {
      first: async (reader) => { reader.send({ type: 'stdin', data: before }) },
      killWhen: (j) => j.next.stdout === before.length,
      resumed: async (reader) => {
        reader.send({ type: 'stdin', data: after })
        await waitFor(() => reader.journal.next.stdout === before.length + after.length, { timeoutMs: 15_000, description: 'cat echoed the stdin sent after the restart' })
        reader.send({ type: 'eof' })
      }
    })
    expect(run.cutAt).toEqual({ stdout: before.length, stderr: 0 })
    const want = await runBySh(`printf '%s' '${before}${after}' | cat`)
    await expectExact(r, execId, run, want, { exitCode: 0, signal: null, timedOut: false })
  }, 90_000)

  it('interactive exec fed 7 MiB of stdin faster than it reads, SIGKILLed mid-stream: the client resumes its stdin from the record\'s stdinBytes, and the command gets every byte once, in order', async () => {
    const r = await sandbox('rs-stdin-flight')
    // Echoes its stdin at about 3 MB/s, so a client at full speed has stdin held in every buffer
    // on the way (its socket, the gateway's queue, the relay, the SSH window) when the gateway dies.
    const echo = "process.stdin.on('data', (d) => { process.stdout.write(d); process.stdin.pause(); setTimeout(() => process.stdin.resume(), 20) })"
    const execId = await execStart(r.gw.publicUrl, r.sandboxId, { command: [process.execPath, '-e', echo], interactive: true })
    const payload = Buffer.from(randomBytes(5.25 * 1024 * 1024).toString('base64'))
    let firstPump: StdinPump | undefined
    let sentAtKill = -1
    let listedAtResume = -1
    const run = await acrossRestart(r, execId, {
      first: async (reader) => { firstPump = pumpStdin(reader, payload, 0) },
      killWhen: (j) => j.next.stdout >= 1024 * 1024,
      whileDown: async () => { sentAtKill = await within(firstPump!.done, 5000, 'the first stdin pump stops with its socket') },
      resumed: async (reader) => {
        listedAtResume = (await execJson(r, execId)).stdinBytes
        const end = await within(pumpStdin(reader, payload, listedAtResume).done, 60_000, 'the resumed client sends the rest of its stdin')
        expect(end, 'the resumed client sent the rest of its stdin').toBe(payload.length)
        reader.send({ type: 'eof' })
      },
      endBoundMs: 60_000
    })
    console.log(`stdin in flight: the client had sent ${sentAtKill} bytes when the gateway died, the daemon had ${listedAtResume}; ${sentAtKill - listedAtResume} sent again`)
    expect(listedAtResume).toBeGreaterThanOrEqual(1024 * 1024)
    // The daemon had less than the client had sent: the rest died with the gateway and came
    // again from the resumed client.
    expect(listedAtResume, 'stdin was in flight when the gateway died').toBeLessThan(sentAtKill)
    const file = join(scratchDir(), 'stdin')
    writeFileSync(file, payload)
    const want = await runBySh(`cat '${file}'`)
    await expectExact(r, execId, run, want, { exitCode: 0, signal: null, timedOut: false })
    expect((await execJson(r, execId)).stdinBytes).toBe(payload.length)
  }, 120_000)

  it('tty exec: the terminal\'s bytes (stdout and stderr merged, \\n as \\r\\n) exact across the restart', async () => {
    const r = await sandbox('rs-tty')
    const script = chatty(120, 6)
    const execId = await execStart(r.gw.publicUrl, r.sandboxId, { command: ['sh', '-c', script], tty: true })
    const run = await acrossRestart(r, execId, { killWhen: (j) => seenBytes(j) >= 20 * 47 })
    // Under a terminal both streams are one, and the line discipline turns \n into \r\n.
    const sh = await runBySh(`(${script}) 2>&1`)
    expect(sh.code).toBe(6)
    const want: ShRun = { stdout: Buffer.from(sh.stdout.toString('latin1').replaceAll('\n', '\r\n'), 'latin1'), stderr: Buffer.alloc(0), code: 6 }
    expect(run.cutAt.stdout).toBeLessThan(want.stdout.length)
    await expectExact(r, execId, run, want, { exitCode: 6, signal: null, timedOut: false })
  }, 90_000)

  it('timeoutSeconds 3 on `sleep 30`, expiring while the gateway is down: exit 124, timedOut true, long before 30 s', async () => {
    const r = await sandbox('rs-timeout')
    const execId = await execStart(r.gw.publicUrl, r.sandboxId, { command: ['sleep', '30'], timeoutSeconds: 3 })
    let startedAt = 0
    let restartedAt = 0
    const run = await acrossRestart(r, execId, {
      killWhen: async () => {
        const e = await execJson(r, execId)
        if (e.status === 'running') startedAt = Date.parse(e.startedAt)
        return e.status === 'running'
      },
      // Down until the timeout has certainly expired: the daemon, not a gateway, has to kill it.
      whileDown: async () => { await sleep(Math.max(0, startedAt + 4500 - Date.now())) },
      beforeResume: async () => { restartedAt = Date.now() }
    })
    expect(restartedAt - startedAt, 'the new gateway listened only after the 3 s had expired').toBeGreaterThan(3500)
    await expectExact(r, execId, run, { stdout: Buffer.alloc(0), stderr: Buffer.alloc(0) }, { exitCode: 124, signal: null, timedOut: true })
    const exec = await execJson(r, execId)
    expect(Date.parse(exec.endedAt) - Date.parse(exec.startedAt), 'killed at its timeout, not at the end of sleep 30').toBeLessThan(10_000)
  }, 90_000)

  it('a finished exec\'s record comes back (same id, command, createdAt, exit); an unknown id is 404 only once the session wait is over', async () => {
    const r = await sandbox('rs-records')
    const done = await execWait(r.gw.publicUrl, r.sandboxId, { command: ['sh', '-c', 'echo done; echo e >&2; exit 4'] })
    expect(done.status).toBe(200)
    const record = await execJson(r, done.body.id)
    expect(record).toMatchObject({ status: 'exited', exitCode: 4 })
    await r.kill()
    await r.restart()
    const unknownId = 'ex_' + randomBytes(12).toString('hex')
    const t0 = r.listeningAt
    const [known, unknown] = await Promise.all([
      (async () => ({ res: await api(r.gw.publicUrl, 'GET', `/v1/execs/${record.id}`), at: performance.now() - t0 }))(),
      (async () => ({ res: await api(r.gw.publicUrl, 'GET', `/v1/execs/${unknownId}`), at: performance.now() - t0 }))()
    ])
    console.log(`restart records: finished exec answered ${known.res.status} ${Math.round(known.at)} ms after listening; unknown id ${unknown.res.status} after ${Math.round(unknown.at)} ms (session wait ${SESSION_WAIT_MS} ms)`)
    expect(known.res.status, 'the finished exec, rebuilt from what the daemon kept').toBe(200)
    const same = { id: record.id, sandboxId: r.sandboxId, command: record.command, createdAt: record.createdAt, status: 'exited', exitCode: 4, signal: null, timedOut: false, error: null, stdoutBytes: 5, stderrBytes: 2 }
    // The first answer, not one polled for: a client asking once after the restart must not be
    // told that an exec which ended before it is running. Soft, so the settled record is checked too.
    expect.soft(known.res.body, 'the first GET after the restart').toMatchObject(same)
    const settled = await waitEnded(r, record.id, 5000)
    expect(settled).toMatchObject(same)
    expect(Math.abs(Date.parse(settled.endedAt) - Date.parse(record.endedAt)), 'endedAt is the original end, not the rebuild').toBeLessThan(1000)
    expect(unknown.res.status).toBe(404)
    expect(unknown.res.body.code).toBe('exec_not_found')
    expect(unknown.at, 'the unknown id waited for the supervisors to report').toBeGreaterThan(known.at)
    // The window starts as the gateway starts, a little before its "listening" line.
    expect(unknown.at).toBeGreaterThan(SESSION_WAIT_MS - 1500)
    expect(unknown.at).toBeLessThan(SESSION_WAIT_MS + 3000)
    // After the window an unknown id is 404 at once.
    const started = performance.now()
    expect((await api(r.gw.publicUrl, 'GET', `/v1/execs/${unknownId}x`)).status).toBe(404)
    expect(performance.now() - started).toBeLessThan(1000)
    const from0 = await eventsFrom0(r.gw.publicUrl, record.id, 10_000)
    expect(from0.problems).toEqual([])
    expect([from0.bytes('stdout').toString(), from0.bytes('stderr').toString()]).toEqual(['done\n', 'e\n'])
    expect(from0.final).toEqual({ type: 'exit', exitCode: 4, signal: null, timedOut: false })
  }, 90_000)
})

describe('OpenSSH keeps nothing across a gateway restart', () => {
  it('an exec that was running on OpenSSH is unknown to the restarted gateway: 404 exec_not_found once the session wait is over', async () => {
    const r = await sandbox('rs-openssh', true)
    const execId = await execStart(r.gw.publicUrl, r.sandboxId, { command: ['sh', '-c', 'sleep 4; echo late; exit 7'] })
    await waitFor(async () => (await execJson(r, execId)).status === 'running', { timeoutMs: 15_000, description: 'the OpenSSH exec is running' })
    await r.kill()
    await r.restart()
    const t0 = r.listeningAt
    const res = await api(r.gw.publicUrl, 'GET', `/v1/execs/${execId}`)
    const at = performance.now() - t0
    console.log(`restart openssh: exec ${execId} answered ${res.status} ${String(res.body?.code)} ${Math.round(at)} ms after listening`)
    expect(res.status).toBe(404)
    expect(res.body.code).toBe('exec_not_found')
    expect(at, 'it waited out the session wait first').toBeGreaterThan(SESSION_WAIT_MS - 1500)
    // The sandbox itself is back: new execs run.
    await r.waitConnected()
    const again = await execWait(r.gw.publicUrl, r.sandboxId, { command: ['sh', '-c', 'echo again; exit 2'] })
    expect(again.body).toMatchObject({ status: 'exited', exitCode: 2, stdout: 'again\n' })
  }, 90_000)
})
