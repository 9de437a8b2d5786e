// src/relay/ssh-guard.ts against an in-process hostile daemon (test/hostile/hostile-sshd.ts),
// with ssh2's own client, so each rule is seen on real packets; and the ssh2 internals the
// guard hooks into, pinned so that an ssh2 upgrade that changes them fails here first.
import { createRequire } from 'node:module'
import { PassThrough } from 'node:stream'
import { afterEach, describe, expect, it } from 'vitest'
import ssh2 from 'ssh2'
import type { ClientChannel } from 'ssh2'
import { GATEWAY_KEX, GUARDED_HANDLERS, installSshGuard, kExitRejected, type SshGuardOptions } from '../../src/relay/ssh-guard.js'
import { boundedText } from '../../src/relay/bounded-text.js'
import { generateEd25519KeyPair } from '../../src/ssh-keys.js'
import { startHostileSshd, wire, type HostileConn, type HostileExec, type HostileSshd, type HostileSshdOptions } from '../hostile/hostile-sshd.js'
import { sleep, waitFor } from '../helpers/wait.js'

const { Client } = ssh2
const { u32, str, bool, msg } = wire
const CLIENT_KEY = generateEd25519KeyPair().private
const WINDOW = 2 * 1024 * 1024

interface Seen { refused: Array<[string, string]>, failed: Array<[string, string]> }

interface Outcome { out: string, exit: unknown[] | undefined, rejected: string | undefined }
// The channel, and how it ends; listeners are attached inside ssh2's callback, before the rest
// of the packets of the same read are parsed (an 'exit' emitted before them is lost).
interface Exec { ch: ClientChannel, done: Promise<Outcome> }
interface Rig { d: HostileSshd, c: InstanceType<typeof Client>, seen: Seen, exec: (cmd: string, paused?: boolean) => Promise<Exec> }

const open: Rig[] = []
afterEach(async () => {
  for (const r of open.splice(0)) { r.c.end(); await r.d.close() }
})

async function rig (daemon: HostileSshdOptions, guard: Partial<SshGuardOptions> = {}): Promise<Rig> {
  const d = await startHostileSshd(daemon)
  const c = new Client()
  const seen: Seen = { refused: [], failed: [] }
  c.on('error', () => undefined)
  c.connect({ host: '127.0.0.1', port: d.port, username: 'u', privateKey: CLIENT_KEY, algorithms: { kex: GATEWAY_KEX } })
  installSshGuard(c, {
    maxRekeysPerMinute: 10,
    maxRefusedChannelOpens: 16,
    relayBacklog: () => 0,
    maxRelayBacklog: 1 << 30,
    refuse: (reason, message) => { seen.refused.push([reason, message]) },
    fail: (reason, detail) => { seen.failed.push([reason, detail]); c.end() },
    ...guard
  })
  await new Promise<void>((resolve, reject) => { c.once('ready', resolve); c.once('close', () => reject(new Error('closed before ready'))) })
  // A paused exec is never read: its window closes as the daemon sends.
  const exec = async (cmd: string, paused = false): Promise<Exec> => await new Promise((resolve, reject) => {
    c.exec(cmd, (err, ch) => {
      if (err !== undefined && err !== null) { reject(err); return }
      if (paused) { ch.pause(); ch.stderr.pause() }
      resolve({ ch, done: paused ? new Promise<Outcome>(() => {}) : outcome(ch) })
    })
  })
  const r = { d, c, seen, exec }
  open.push(r)
  return r
}

// What an exec on the rig ends with: its output, and the exit event's arguments.
async function outcome (ch: ClientChannel): Promise<Outcome> {
  let out = ''
  let exit: unknown[] | undefined
  let rejected: string | undefined
  ch.on('data', (b: Buffer) => { out += b.toString() })
  ch.stderr.resume()
  ch.on('exit', (...a: unknown[]) => { exit ??= a })
  ;(ch as unknown as NodeJS.EventEmitter).on(kExitRejected, (d: string) => { rejected = d })
  await new Promise<void>((resolve) => ch.on('close', () => resolve()))
  return { out, exit, rejected }
}

const reasons = (s: Seen): string[] => s.refused.map(([r]) => r)

describe('ssh2 internals the guard relies on', () => {
  it('is ssh2 1.17.0: another version must be checked against src/relay/ssh-guard.ts first', () => {
    const pkg = createRequire(import.meta.url)('ssh2/package.json') as { version: string }
    expect(pkg.version).toBe('1.17.0')
  })

  it('finds every handler it wraps on a connected client, and fails loudly when one is missing', () => {
    const c = new Client()
    c.on('error', () => undefined)
    c.connect({ sock: new PassThrough(), username: 'u', privateKey: CLIENT_KEY })
    const handlers = (c as unknown as { _protocol: { _handlers: Record<string, unknown> } })._protocol._handlers
    for (const name of GUARDED_HANDLERS) expect(typeof handlers[name]).toBe('function')
    const noop = { maxRekeysPerMinute: 1, maxRefusedChannelOpens: 1, relayBacklog: () => 0, maxRelayBacklog: 1, refuse: () => {}, fail: () => {} }
    expect(() => installSshGuard(c, noop)).not.toThrow()
    // Wrapped in place: the protocol looks its handlers up by name on every packet.
    for (const name of GUARDED_HANDLERS) expect(typeof handlers[name]).toBe('function')

    const c2 = new Client()
    c2.on('error', () => undefined)
    c2.connect({ sock: new PassThrough(), username: 'u', privateKey: CLIENT_KEY })
    delete (c2 as unknown as { _protocol: { _handlers: Record<string, unknown> } })._protocol._handlers.CHANNEL_DATA
    expect(() => installSshGuard(c2, noop)).toThrow(/ssh2's client internals .*_protocol\._handlers\.CHANNEL_DATA/)
    expect(() => installSshGuard(new Client(), noop)).toThrow(/client\._protocol/)
    c.end(); c2.end()
  })

  it('offers only the fixed-cost key exchanges (ssh2 adds its two extension markers)', async () => {
    const r = await rig({})
    expect(r.d.kexOffers).toEqual([[...GATEWAY_KEX, 'ext-info-c', 'kex-strict-c-v00@openssh.com']])
    for (const k of GATEWAY_KEX) expect(k).toMatch(/^(curve25519-sha256|ecdh-sha2-nistp)/)
  })
})

describe('the SSH window', () => {
  // Sends exactly what the client granted (ssh2's server tracks the client's adjusts in the
  // channel's outgoing window; raw packets do not, so it is counted down here), until the
  // client, whose reader is paused, grants no more; then `extra` bytes beyond it.
  const exhaust = (extra: number, sent: number[]) => async (x: HostileExec): Promise<void> => {
    const out = (x.channel as unknown as { outgoing: { window: number } }).outgoing
    let total = 0
    for (let idle = 0; idle < 4;) {
      if (out.window === 0) { idle++; await sleep(50); continue }
      idle = 0
      const n = Math.min(32 * 1024, out.window)
      out.window -= n
      total += n
      x.conn.channelData(x.id, Buffer.alloc(n, 0x62))
      await new Promise((resolve) => setImmediate(resolve))
    }
    sent.push(total)
    if (extra > 0) x.conn.channelData(x.id, Buffer.alloc(extra, 0x63))
  }

  it('takes every byte of the window it granted, from a daemon that sends no more', async () => {
    const sent: number[] = []
    const r = await rig({ onExec: exhaust(0, sent) })
    const { ch } = await r.exec('x', true)
    await waitFor(() => sent.length === 1, { timeoutMs: 5000 })
    await waitFor(() => ch.readableLength === sent[0], { timeoutMs: 5000 })
    // The paused reader holds its buffer (2 MiB) and one more window granted before it filled.
    expect(sent[0]).toBeGreaterThanOrEqual(WINDOW)
    expect(r.seen.failed).toEqual([])
  })

  it('fails the connection on the first byte beyond it, at window 0, and reads nothing after', async () => {
    const sent: number[] = []
    const r = await rig({ onExec: exhaust(1, sent) })
    const { ch } = await r.exec('x', true)
    await waitFor(() => r.seen.failed.length > 0, { timeoutMs: 5000 })
    expect(r.seen.failed).toEqual([['window_overrun', 'the sandbox SSH daemon sent 1 bytes of stdout with 0 bytes left in the SSH window the gateway granted']])
    expect(ch.readableLength).toBe(sent[0])
  })

  it('counts stderr against the same window, and refuses packets over the maximum packet size', async () => {
    const r = await rig({ onExec: (x) => { x.conn.raw(msg(95, u32(x.id), u32(1), str(Buffer.alloc(33_000)))) } })
    await r.exec('x', true)
    await waitFor(() => r.seen.failed.length > 0, { timeoutMs: 5000 })
    expect(r.seen.failed[0]).toEqual(['window_overrun', 'the sandbox SSH daemon sent 33000 bytes of stderr in one packet, over the 32768-byte maximum the gateway granted'])
  })
})

describe('channel ids and exit reports', () => {
  it('ignores and counts every message for an id that is not open (0xFFFFFFFF used to throw out of the parser); the exec goes on', async () => {
    const r = await rig({
      onExec: (x) => {
        for (const id of [0xffff_ffff, 777]) {
          for (const type of [93, 96, 97, 99, 100]) x.conn.raw(msg(type, u32(id), ...(type === 93 ? [u32(5)] : [])))
          x.conn.channelData(id, Buffer.from('forged'))
          x.conn.raw(msg(91, u32(id), u32(1), u32(WINDOW), u32(32768)))
          x.conn.raw(msg(98, u32(id), str('keepalive@openssh.com'), bool(true)))
          x.conn.exitStatus(id, 77)
        }
        x.conn.channelData(x.id, Buffer.from('real'))
        x.conn.exitStatus(x.id, 3)
        x.channel.eof()
        x.channel.close()
      }
    })
    const o = await (await r.exec('x')).done
    expect(o).toEqual({ out: 'real', exit: [3], rejected: undefined })
    expect(reasons(r.seen)).toEqual(Array(18).fill('unknown_channel'))
    expect(r.seen.failed).toEqual([])
  })

  it('takes the first report only, none before the exec is answered, none after the close', async () => {
    const r = await rig({
      beforeExecReply: (c, id, cmd) => { if (cmd === 'early') c.exitStatus(id, 70) },
      onExec: (x) => {
        if (x.command === 'early') { x.conn.exitStatus(x.id, 4); x.channel.eof(); x.channel.close(); return }
        x.conn.exitStatus(x.id, 5)
        x.conn.exitStatus(x.id, 6)
        x.conn.exitSignal(x.id, 'KILL')
        x.channel.eof()
        x.channel.close()
      }
    })
    expect(await (await r.exec('early')).done).toMatchObject({ exit: [4] })
    expect(await (await r.exec('dup')).done).toMatchObject({ exit: [5] })
    expect(reasons(r.seen)).toEqual(['bad_exit_report', 'duplicate_exit', 'duplicate_exit'])
    // After the close, the id names nothing: a report for it is one on a closed channel.
    const late = await rig({ onExec: (x) => { x.conn.exitStatus(x.id, 1); x.channel.eof(); x.channel.close(); setTimeout(() => x.conn.exitStatus(x.id, 9), 50) } })
    expect(await (await late.exec('x')).done).toMatchObject({ exit: [1] })
    await waitFor(() => late.seen.refused.length > 0, { timeoutMs: 5000 })
    expect(late.seen.refused).toEqual([['bad_exit_report', 'the sandbox SSH daemon sent exit-status for a channel that is not open (ignored)']])
  })

  it('rejects an exit-signal name outside the SSH grammar (the exec is told why), and takes one inside it', async () => {
    const r = await rig({ onExec: (x) => { x.conn.exitSignal(x.id, x.command); x.channel.eof(); x.channel.close() } })
    const bad = await (await r.exec('<img src=x onerror=alert(1)>')).done
    expect(bad).toEqual({ out: '', exit: undefined, rejected: 'the sandbox reported an exit signal outside the SSH grammar' })
    const good = await (await r.exec('SIG@openssh.com')).done
    expect(good.exit).toEqual([null, 'SIGSIG@openssh.com', false, ''])
    expect(reasons(r.seen)).toEqual(['bad_exit_report'])
  })
})

describe('channel opens, re-keys and requests', () => {
  it('refuses every channel the daemon opens, and fails the connection beyond the budget', async () => {
    const r = await rig({ onReady: (c) => { for (let i = 0; i < 4; i++) c.channelOpen(i % 2 === 0 ? 'auth-agent@openssh.com' : 'session', 500 + i) } }, { maxRefusedChannelOpens: 2 })
    await waitFor(() => r.seen.failed.length > 0, { timeoutMs: 5000 })
    expect(reasons(r.seen)).toEqual(['channel_open', 'channel_open'])
    expect(r.seen.failed).toEqual([['channel_open', 'the sandbox SSH daemon tried to open 3 channels towards the gateway (--ssh-max-refused-channel-opens 2)']])
    await waitFor(() => r.d.openFailuresReceived.length === 2, { timeoutMs: 5000 })
    expect(r.d.openFailuresReceived).toEqual([500, 501])
  })

  it('fails the connection when the daemon re-keys more often than the budget within a minute', async () => {
    const storm = (c: HostileConn): void => {
      let n = 0
      const again = (): void => { if (n++ < 6) setImmediate(() => { try { c.conn.rekey() } catch { /* gone */ } }) }
      c.conn.on('handshake', again)
      again()
    }
    const r = await rig({ onReady: storm }, { maxRekeysPerMinute: 3 })
    await waitFor(() => r.seen.failed.length > 0, { timeoutMs: 5000 })
    expect(r.seen.failed).toEqual([['rekey_rate', 'the sandbox SSH daemon started 4 key exchanges within a minute (--ssh-max-rekeys-per-minute 3)']])
    // The same re-keys a minute apart are fine.
    let t = 0
    const slow = await rig({ onReady: storm }, { maxRekeysPerMinute: 3, now: () => (t += 61_000) })
    await waitFor(() => slow.d.negotiatedKex.length >= 7, { timeoutMs: 5000 })
    expect(slow.seen.failed).toEqual([])
  })

  it('does not act on hostkeys-00@openssh.com: no host key proofs are asked for, none verified', async () => {
    const r = await rig({
      onExec: (x) => {
        const blob = Buffer.from(generateEd25519KeyPair().public.split(' ')[1]!, 'base64')
        x.conn.raw(msg(80, str('hostkeys-00@openssh.com'), bool(false), ...Array.from({ length: 50 }, () => str(blob))))
        x.conn.exitStatus(x.id, 0)
        x.channel.eof()
        x.channel.close()
      }
    })
    expect(await (await r.exec('x')).done).toMatchObject({ exit: [0] })
    // One more round trip, so a proof request would have arrived by now.
    expect(await (await r.exec('x')).done).toMatchObject({ exit: [0] })
    expect(r.d.globalRequestsReceived.filter((n) => n.startsWith('hostkeys'))).toEqual([])
  })

  it('answers requests that want a reply only while the relay takes the replies', async () => {
    let backlog = 0
    const r = await rig({ onExec: (x) => { x.conn.raw(msg(80, str('x@example.com'), bool(true))) } }, { relayBacklog: () => backlog, maxRelayBacklog: 100 })
    backlog = 1000
    await r.exec('x')
    await waitFor(() => r.seen.failed.length > 0, { timeoutMs: 5000 })
    expect(r.seen.failed).toEqual([['protocol_error', 'the sandbox SSH daemon sends global requests but does not read the replies (1000 bytes unread)']])
  })
})

describe('boundedText', () => {
  it('strips terminal escapes, controls and bidi overrides, and says what it cut', () => {
    expect(boundedText('\u001b[2J\u001b[31mred\u001b[0m text')).toBe('red text')
    expect(boundedText('a\u001b]0;title\u0007b')).toBe('a b')
    expect(boundedText('one\n{"level":60}\r\ntwo\t')).toBe('one {"level":60} two')
    expect(boundedText('TERM\u202eevil\u2066')).toBe('TERM evil')
    expect(boundedText('A'.repeat(500), 10)).toBe('AAAAAAAAAA… (500 characters)')
    expect(boundedText('\ud83d\ude00'.repeat(10), 5)).toBe('\ud83d\ude00\ud83d\ude00… (20 characters)')
    expect(boundedText('x\ud800y')).toBe('x\ufffdy')
    expect(boundedText(undefined)).toBe('')
    expect(boundedText(42)).toBe('(number)')
  })

  it('reads only the head of a huge string', () => {
    const huge = 'B'.repeat(10_000_000)
    const t0 = performance.now()
    expect(boundedText(huge, 200)).toBe('B'.repeat(200) + '… (10000000 characters)')
    expect(performance.now() - t0).toBeLessThan(50)
  })
})
