import { describe, expect, it } from 'vitest'
import { PENDING_STDIN_HIGH_WATER, StdinFlow, StdinLedger, type StdinSink } from '../../src/execs/stdin-flow.js'

// The stdin ledger of a kept exec and StdinFlow's detach/reattach: what the daemon did not
// receive is resent once, in order, and nothing else.

class Sink implements StdinSink {
  written: Buffer[] = []
  eofs = 0
  full = false
  stdinBuffered = 0
  readonly stdinHighWater = 1024
  #drain: Array<() => void> = []
  writeStdin (data: Buffer): boolean { this.written.push(data); return !this.full }
  endStdin (): void { this.eofs++ }
  onStdinDrain (cb: () => void): () => void { this.#drain.push(cb); return () => { this.#drain = this.#drain.filter((c) => c !== cb) } }
  drain (): void { this.full = false; const d = this.#drain; this.#drain = []; for (const c of d) c() }
  get text (): string { return Buffer.concat(this.written).toString() }
}

describe('StdinLedger', () => {
  it('returns the bytes after an offset across chunk boundaries', () => {
    const l = new StdinLedger()
    l.record(Buffer.from('abc'))
    l.record(Buffer.from('defg'))
    expect(l.total).toBe(7)
    expect(String(l.since(0))).toBe('abcdefg')
    expect(String(l.since(2))).toBe('cdefg')
    expect(String(l.since(3))).toBe('defg')
    expect(String(l.since(7))).toBe('')
    expect(l.since(8)).toBe('ahead')
  })

  it('keeps only its bound, and says when bytes to resend are gone', () => {
    const l = new StdinLedger(0, 5)
    l.record(Buffer.from('abcd'))
    l.record(Buffer.from('efgh'))
    expect(l.start).toBe(3)
    expect(String(l.since(3))).toBe('defgh')
    expect(l.since(2)).toBe('gone')
    l.record(Buffer.from('0123456789'))
    expect(l.start).toBe(13)
    expect(String(l.since(13))).toBe('56789')
  })

  it('starts at an offset (an adopted exec)', () => {
    const l = new StdinLedger(100)
    expect(String(l.since(100))).toBe('')
    expect(l.since(99)).toBe('gone')
    l.record(Buffer.from('x'))
    expect(String(l.since(100))).toBe('x')
  })
})

describe('StdinFlow detach and reattach', () => {
  it('resends what the daemon did not receive, then the queue, then EOF once', () => {
    const flow = new StdinFlow()
    flow.keepLedger()
    const a = new Sink()
    flow.start(a)
    expect(flow.write(Buffer.from('one-'))).toBe('accepted')
    expect(flow.write(Buffer.from('two-'))).toBe('accepted')
    flow.detach()
    expect(flow.write(Buffer.from('three-'))).toBe('accepted')
    flow.end()
    expect(a.text).toBe('one-two-')
    expect(a.eofs).toBe(0)
    const b = new Sink()
    // The daemon took "one-" only.
    expect(flow.reattach(b, 4, false)).toBeUndefined()
    expect(b.text).toBe('two-three-')
    expect(b.eofs).toBe(1)
    // Once attached, a second reattach is a no-op.
    expect(flow.reattach(new Sink(), 0, false)).toBeUndefined()
  })

  it('does not resend EOF the daemon has', () => {
    const flow = new StdinFlow()
    flow.keepLedger()
    const a = new Sink()
    flow.start(a)
    flow.write(Buffer.from('x'))
    flow.end()
    expect(a.eofs).toBe(1)
    flow.detach()
    const b = new Sink()
    expect(flow.reattach(b, 1, true)).toBeUndefined()
    expect(b.written).toEqual([])
    expect(b.eofs).toBe(0)
  })

  it('refuses a reattach whose bytes to resend are gone, or that claims bytes never sent', () => {
    const flow = new StdinFlow()
    flow.keepLedger()
    flow.start(new Sink())
    flow.write(Buffer.from('abc'))
    flow.detach()
    expect(flow.reattach(new Sink(), 9, false)).toMatch(/claims 9 bytes of stdin, but only 3 were sent/)
    const l = new StdinFlow()
    l.keepLedger()
    l.start(new Sink())
    l.write(Buffer.alloc(9 * 1024 * 1024))
    l.detach()
    expect(l.reattach(new Sink(), 0, false)).toMatch(/no longer held to resend/)
  })

  it('queues while detached and pauses writers at the pending high-water mark', async () => {
    const flow = new StdinFlow()
    flow.keepLedger()
    const a = new Sink()
    a.full = true
    flow.start(a)
    expect(flow.write(Buffer.from('held'))).toBe('paused')
    let woke = 0
    flow.onWritable(() => { woke++ })
    // The old sink is gone: the writer may go on into the queue.
    flow.detach()
    expect(woke).toBe(1)
    expect(flow.write(Buffer.alloc(PENDING_STDIN_HIGH_WATER))).toBe('paused')
    flow.onWritable(() => { woke++ })
    const b = new Sink()
    expect(flow.reattach(b, 0, false)).toBeUndefined()
    await new Promise((resolve) => setImmediate(resolve))
    expect(woke).toBe(2)
    expect(Buffer.concat(b.written).length).toBe(4 + PENDING_STDIN_HIGH_WATER)
    expect(b.written[0]!.toString()).toBe('held')
  })

  it('keeps no ledger for a command that is not kept', () => {
    const flow = new StdinFlow()
    flow.start(new Sink())
    flow.write(Buffer.from('abc'))
    flow.detach()
    // Without a ledger nothing can be resent: the count the daemon gives is where it starts.
    const b = new Sink()
    expect(flow.reattach(b, 3, false)).toBeUndefined()
    expect(b.written).toEqual([])
  })

  it('an adopted exec queues from the listed offset; bytes the daemon got after the list are not sent twice', () => {
    // The daemon listed 10 bytes received; the client resends from 10.
    const flow = new StdinFlow()
    flow.adopt(10)
    flow.write(Buffer.from('klmn'))
    flow.write(Buffer.from('opq'))
    flow.end()
    // By the attach, the old gateway's last 2 bytes ("kl") had reached the daemon as well.
    const b = new Sink()
    expect(flow.reattach(b, 12, false)).toBeUndefined()
    expect(b.text).toBe('mnopq')
    expect(b.eofs).toBe(1)
    // Lost again later: the ledger is addressed as the daemon counts.
    flow.detach()
    const c = new Sink()
    expect(flow.reattach(c, 14, false)).toBeUndefined()
    expect(c.text).toBe('opq')
  })

  it('an adopted exec whose daemon claims more than was listed and queued is refused', () => {
    const flow = new StdinFlow()
    flow.adopt(10)
    flow.write(Buffer.from('ab'))
    expect(flow.reattach(new Sink(), 13, false)).toMatch(/claims 13 bytes/)
  })

  it('only the first attach of an adopted exec may find bytes the gateway did not send', () => {
    const flow = new StdinFlow()
    flow.adopt(0)
    expect(flow.reattach(new Sink(), 0, false)).toBeUndefined()
    flow.write(Buffer.from('ab'))
    flow.detach()
    flow.write(Buffer.from('cd'))
    expect(flow.reattach(new Sink(), 3, false)).toMatch(/claims 3 bytes/)
  })
})
