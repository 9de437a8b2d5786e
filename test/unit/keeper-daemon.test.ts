// The embedded daemon's keeper, driven by a real ssh2 client over real TCP: execs outlive their
// channel and connection, are reattached from offsets, block when their spool is full, time out
// on the daemon's own clock, and answer the keeper protocol's control requests.
import { createHash } from 'node:crypto'
import { pino } from 'pino'
import ssh2 from 'ssh2'
import type { Client as SshClient, ClientChannel } from 'ssh2'
import { afterEach, describe, expect, it } from 'vitest'
import { Keeper, type KeeperOptions } from '../../src/sandbox-sshd/keeper/keeper.js'
import { startEmbeddedSshd, type EmbeddedSshd } from '../../src/sandbox-sshd/server.js'
import {
  CONTROL_UNKNOWN_EXIT, decodeKeptList, decodeKeptStatus, encodeKeepMeta, KEEP_ENV, TIMEOUT_EXIT_MESSAGE,
  type KeepMeta, type KeptStatus
} from '../../src/schemas/keeper.js'
import { generateEd25519KeyPair } from '../../src/ssh-keys.js'

const { Client } = ssh2
const silent = pino({ level: 'silent' })

const cleanups: Array<() => unknown> = []
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!()
})

interface Daemon { sshd: EmbeddedSshd, keeper: Keeper, connect: () => Promise<SshClient> }

async function daemon (opts: Partial<KeeperOptions> = {}): Promise<Daemon> {
  const keys = generateEd25519KeyPair()
  const keeper = new Keeper({ bytesPerExec: 8 * 1024 * 1024, totalBytes: 256 * 1024 * 1024, finishedS: 60, logger: silent, ...opts })
  const sshd = await startEmbeddedSshd({ authorizedKeys: [keys.public], keeper })
  cleanups.push(async () => { await keeper.shutdown(500); keeper.close(); await sshd.close() })
  const connect = async (): Promise<SshClient> => await new Promise((resolve, reject) => {
    const c = new Client()
    cleanups.push(() => c.end())
    c.once('ready', () => { c.on('error', () => undefined); resolve(c) })
    c.once('error', reject)
    c.connect({ host: sshd.host, port: sshd.port, username: 'u', privateKey: keys.private, readyTimeout: 5000 })
  })
  return { sshd, keeper, connect }
}

function meta (execId: string, over: Partial<KeepMeta> = {}): KeepMeta {
  return { v: 1, execId, command: ['sh'], tty: false, interactive: false, cols: 80, rows: 24, timeoutSeconds: 0, createdAt: new Date().toISOString(), ...over }
}

interface Result { out: Buffer, err: Buffer, code: number | undefined, signal: string | undefined, message: string | undefined, order: string[] }

// Opens an exec channel; resolves with the channel once it is open.
async function open (c: SshClient, command: string, opts: { keep?: KeepMeta, pty?: boolean } = {}): Promise<ClientChannel> {
  return await new Promise((resolve, reject) => {
    const execOpts = { ...(opts.keep === undefined ? {} : { env: { [KEEP_ENV]: encodeKeepMeta(opts.keep) } }), ...(opts.pty === true ? { pty: { rows: 24, cols: 80, term: 'xterm' } } : {}) }
    c.exec(command, execOpts, (err, ch) => {
      if (err !== undefined && err !== null) { reject(err); return }
      // At once: ssh2 may emit the exit report in the same read as the open confirmation.
      results.set(ch, gather(ch))
      resolve(ch)
    })
  })
}

const results = new WeakMap<ClientChannel, (boundMs: number) => Promise<Result>>()

// Everything a channel delivers until it closes, bounded: a hang fails with what arrived.
async function collect (ch: ClientChannel, boundMs = 20_000): Promise<Result> {
  return await results.get(ch)!(boundMs)
}

function gather (ch: ClientChannel): (boundMs: number) => Promise<Result> {
  const out: Buffer[] = []
  const err: Buffer[] = []
  const r: Result = { out: Buffer.alloc(0), err: Buffer.alloc(0), code: undefined, signal: undefined, message: undefined, order: [] }
  ch.on('data', (b: Buffer) => { out.push(b); r.order.push('o') })
  ch.stderr.on('data', (b: Buffer) => { err.push(b); r.order.push('e') })
  ch.on('exit', (code: number | null, signal?: string, _dump?: boolean, message?: string) => {
    if (code !== null) r.code = code
    if (signal !== undefined) { r.signal = signal.replace(/^SIG/, ''); r.message = message }
  })
  let closed = false
  ch.once('close', () => { closed = true })
  return async (boundMs) => {
    if (!closed) {
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => { reject(new Error(`hang: channel not closed within ${boundMs} ms (stdout ${Buffer.concat(out).length} B, stderr ${Buffer.concat(err).length} B)`)) }, boundMs)
        ch.once('close', () => { clearTimeout(t); resolve() })
      })
    }
    r.out = Buffer.concat(out)
    r.err = Buffer.concat(err)
    return r
  }
}

async function run (c: SshClient, command: string, opts: { keep?: KeepMeta, stdin?: string } = {}): Promise<Result> {
  const ch = await open(c, command, opts)
  if (opts.stdin !== undefined) ch.end(opts.stdin)
  return await collect(ch)
}

async function status (c: SshClient, id: string, detach = false): Promise<KeptStatus | 'unknown'> {
  const r = await run(c, `#exec-gateway status ${id}${detach ? ' detach' : ''}`)
  if (r.code === CONTROL_UNKNOWN_EXIT) return 'unknown'
  expect(r.code).toBe(0)
  const s = decodeKeptStatus(r.out.toString())
  expect(s).toBeDefined()
  return s!
}

async function until<T> (what: string, f: () => Promise<T | undefined>, boundMs = 15_000): Promise<T> {
  const end = Date.now() + boundMs
  for (;;) {
    const v = await f()
    if (v !== undefined) return v
    if (Date.now() > end) throw new Error(`hang: ${what} not within ${boundMs} ms`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

describe('keeper: the embedded daemon keeps its execs', () => {
  it('runs a kept exec like any other, without showing the command its tag', async () => {
    const d = await daemon()
    const c = await d.connect()
    const r = await run(c, 'echo out; echo err >&2; env | grep -c EXEC_GATEWAY_KEEP; exit 3', { keep: meta('a') })
    expect(r.out.toString()).toBe('out\n0\n')
    expect(r.err.toString()).toBe('err\n')
    expect(r.code).toBe(3)
    const s = await status(c, 'a')
    expect(s).toMatchObject({ state: 'exited', exit: { code: 3 }, timedOut: false, stdout: { base: 0, end: 6 }, stderr: { base: 0, end: 4 } })
  })

  it('refuses an exec id it already keeps, so a retried open never starts a command twice', async () => {
    const d = await daemon()
    const c = await d.connect()
    await run(c, 'true', { keep: meta('dup') })
    await expect(open(c, 'echo second', { keep: meta('dup') })).rejects.toThrow()
    expect(d.keeper.size).toBe(1)
  })

  it('keeps running when the connection drops, and a new connection reattaches from offsets with the bytes in production order', async () => {
    const d = await daemon()
    const c1 = await d.connect()
    const script = 'for i in $(seq 1 40); do echo "o$i"; echo "e$i" >&2; sleep 0.02; done; exit 9'
    const ch = await open(c1, script, { keep: meta('r') })
    let got = 0
    await new Promise<void>((resolve) => { ch.on('data', (b: Buffer) => { got += b.length; if (got > 10) resolve() }) })
    c1.end()
    const c2 = await d.connect()
    const s = await status(c2, 'r')
    expect(s).toMatchObject({ state: 'running', attached: false })
    // From the start: the whole output, both streams interleaved as the command wrote them.
    const full = await collect(await open(c2, '#exec-gateway attach r 0 0'))
    const expectOut = Array.from({ length: 40 }, (_, i) => `o${i + 1}\n`).join('')
    const expectErr = Array.from({ length: 40 }, (_, i) => `e${i + 1}\n`).join('')
    expect(full.out.toString()).toBe(expectOut)
    expect(full.err.toString()).toBe(expectErr)
    expect(full.code).toBe(9)
    // The client's two streams start flowing on the same later tick, so what arrived with the
    // open confirmation comes out grouped per stream; from then on, arrival order shows.
    expect(full.order.join('').slice(-60)).toBe('oe'.repeat(30))
    // From the middle of each stream, after the exit: exactly the rest, then the report again.
    const from = await collect(await open(c2, '#exec-gateway attach r 100 50'))
    expect(from.out.toString()).toBe(expectOut.slice(100))
    expect(from.err.toString()).toBe(expectErr.slice(50))
    expect(from.code).toBe(9)
  })

  it('blocks a command whose unsent output fills its spool, within the bound, and replays every byte once on attach', async () => {
    const bytesPerExec = 1024 * 1024
    const d = await daemon({ bytesPerExec })
    const c1 = await d.connect()
    // 24 MiB with nobody reading: the command must block, not the daemon grow.
    const cmd = 'head -c 25165824 /dev/zero | tr "\\0" "x" | sed "s/x\\{1000\\}/&\\n/g"; echo done >&2'
    const ch = await open(c1, cmd, { keep: meta('big') })
    ch.on('data', () => undefined)
    c1.end()
    const c2 = await d.connect()
    const first = await until('the spool to fill', async () => {
      const s = await status(c2, 'big')
      return s !== 'unknown' && s.stdout.end >= bytesPerExec / 4 ? s : undefined
    })
    await new Promise((resolve) => setTimeout(resolve, 1500))
    const later = await status(c2, 'big')
    if (later === 'unknown') throw new Error('exec forgotten')
    expect(later.state).toBe('running')
    // Blocked: no more than one more pipe read and the writer's buffer got in.
    expect(later.stdout.end - first.stdout.end).toBeLessThan(256 * 1024)
    expect(d.keeper.usedBytes).toBeLessThanOrEqual(bytesPerExec + 256 * 1024)
    const r = await collect(await open(c2, '#exec-gateway attach big 0 0'), 60_000)
    expect(r.code).toBe(0)
    expect(r.err.toString()).toBe('done\n')
    const oracle = Buffer.from(('x'.repeat(1000) + '\n').repeat(Math.floor(25165824 / 1000)) + 'x'.repeat(25165824 % 1000))
    expect(r.out.length).toBe(oracle.length)
    expect(sha(r.out)).toBe(sha(oracle))
  }, 90_000)

  it('counts the stdin it received, survives a dropped connection without an EOF, and takes the EOF from a later channel', async () => {
    const d = await daemon()
    const c1 = await d.connect()
    const ch = await open(c1, 'cat; echo end >&2', { keep: meta('in', { interactive: true }) })
    ch.write('hello ')
    await until('the echo', async () => { const s = await status(c1, 'in'); return s !== 'unknown' && s.stdout.end === 6 ? true : undefined })
    c1.end()
    const c2 = await d.connect()
    const s = await status(c2, 'in', true)
    expect(s).toMatchObject({ state: 'running', stdinReceived: 6, stdinEof: false })
    const att = await open(c2, '#exec-gateway attach in 6 0')
    att.end('world\n')
    const r = await collect(att)
    expect(r.out.toString()).toBe('world\n')
    expect(r.err.toString()).toBe('end\n')
    expect(r.code).toBe(0)
    expect(await status(c2, 'in')).toMatchObject({ stdinReceived: 12, stdinEof: true })
  })

  it('a newer attach supersedes the older: the older channel closes without an exit report', async () => {
    const d = await daemon()
    const c = await d.connect()
    const first = await open(c, 'sleep 1; echo x', { keep: meta('s') })
    const older = collect(first)
    const newer = collect(await open(c, '#exec-gateway attach s 0 0'))
    const o = await older
    expect(o.code).toBeUndefined()
    expect(o.signal).toBeUndefined()
    const n = await newer
    expect(n.out.toString()).toBe('x\n')
    expect(n.code).toBe(0)
  })

  it('times a kept exec out on its own clock, with nobody attached, and reports the marker', async () => {
    const d = await daemon()
    const c1 = await d.connect()
    await open(c1, 'echo started; sleep 30', { keep: meta('t', { timeoutSeconds: 1 }) })
    c1.end()
    const c2 = await d.connect()
    const s = await until('the timeout', async () => { const st = await status(c2, 't'); return st !== 'unknown' && st.state === 'exited' ? st : undefined }, 5000)
    expect(s).toMatchObject({ timedOut: true, exit: { signal: 'KILL' } })
    const r = await collect(await open(c2, '#exec-gateway attach t 0 0'))
    expect(r.out.toString()).toBe('started\n')
    expect(r.signal).toBe('KILL')
    expect(r.message).toBe(TIMEOUT_EXIT_MESSAGE)
  })

  it('signals, lists and forgets kept execs; unknown ids answer 3 and an unknown attach is refused', async () => {
    const d = await daemon()
    const c = await d.connect()
    const ch = await open(c, 'trap "echo got-usr1; exit 4" USR1; while :; do sleep 0.05; done', { keep: meta('g') })
    const done = collect(ch)
    await new Promise((resolve) => setTimeout(resolve, 300))
    expect((await run(c, '#exec-gateway signal g USR1')).code).toBe(0)
    const r = await done
    expect(r.out.toString()).toBe('got-usr1\n')
    expect(r.code).toBe(4)
    expect((await run(c, '#exec-gateway signal g USR1')).code).toBe(CONTROL_UNKNOWN_EXIT)
    await open(c, 'sleep 30', { keep: meta('f') })
    const list = decodeKeptList((await run(c, '#exec-gateway list')).out.toString())
    expect(list?.execs.map((e) => [e.meta.execId, e.state])).toEqual([['g', 'exited'], ['f', 'running']])
    expect((await run(c, '#exec-gateway forget f')).code).toBe(0)
    expect(await status(c, 'f')).toBe('unknown')
    expect((await run(c, '#exec-gateway forget f')).code).toBe(CONTROL_UNKNOWN_EXIT)
    await expect(open(c, '#exec-gateway attach nope 0 0')).rejects.toThrow()
    expect((await run(c, '#exec-gateway frobnicate')).code).toBe(2)
  })

  it('keeps a finished exec for --keep-finished-s, and evicts finished execs oldest first under the total bound', async () => {
    const d = await daemon({ finishedS: 1 })
    const c = await d.connect()
    await run(c, 'echo a', { keep: meta('old') })
    expect(await status(c, 'old')).toMatchObject({ state: 'exited' })
    await until('the finished exec to expire', async () => (await status(c, 'old')) === 'unknown' ? true : undefined, 4000)

    const e = await daemon({ totalBytes: 3 * 1024 * 1024, finishedS: 600 })
    const c2 = await e.connect()
    for (const id of ['f1', 'f2', 'f3']) await run(c2, 'head -c 1048576 /dev/zero', { keep: meta(id) })
    await run(c2, 'head -c 1048576 /dev/zero', { keep: meta('f4') })
    expect(await status(c2, 'f1')).toBe('unknown')
    expect(await status(c2, 'f4')).toMatchObject({ state: 'exited' })
    expect(e.keeper.usedBytes).toBeLessThanOrEqual(3 * 1024 * 1024)
  })

  it('keeps a pty exec across a dropped connection; the attach channel resizes it', async () => {
    const d = await daemon()
    const c1 = await d.connect()
    const ch = await open(c1, 'read line; stty size; echo "got:$line"', { keep: meta('p', { tty: true, interactive: true }), pty: true })
    ch.on('data', () => undefined)
    await new Promise((resolve) => setTimeout(resolve, 200))
    c1.end()
    const c2 = await d.connect()
    const s = await status(c2, 'p', true)
    if (s === 'unknown') throw new Error('pty exec forgotten')
    const att = await open(c2, `#exec-gateway attach p ${s.stdout.end} 0`)
    att.setWindow(33, 101, 0, 0)
    await new Promise((resolve) => setTimeout(resolve, 200))
    att.write('abc\n')
    const r = await collect(att)
    expect(r.out.toString()).toContain('33 101')
    expect(r.out.toString()).toContain('got:abc')
    expect(r.code).toBe(0)
  })

  it('ends the process groups of its running execs on shutdown: TERM, then KILL', async () => {
    const d = await daemon()
    const c = await d.connect()
    const polite = collect(await open(c, 'trap "exit 0" TERM; while :; do sleep 0.05; done', { keep: meta('polite') }))
    const stubborn = collect(await open(c, 'trap "" TERM; while :; do sleep 0.05; done', { keep: meta('stubborn') }))
    await new Promise((resolve) => setTimeout(resolve, 300))
    const t0 = Date.now()
    await d.keeper.shutdown(1000)
    expect((await polite).code).toBe(0)
    expect((await stubborn).signal).toBe('KILL')
    expect(Date.now() - t0).toBeLessThan(4000)
  })
})
