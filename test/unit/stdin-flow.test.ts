import { describe, expect, it } from 'vitest'
import { PENDING_STDIN_HIGH_WATER, STDIN_BUFFER_MAX_BYTES, StdinFlow, type StdinSink } from '../../src/execs/stdin-flow.js'

// StdinFlow against a sink that behaves like a Writable with a high-water mark, drained by hand.

class FakeSink implements StdinSink {
  readonly written: Buffer[] = []
  buffered = 0
  ended = false
  readonly stdinHighWater = 64 * 1024
  readonly #drains = new Set<() => void>()

  get stdinBuffered (): number { return this.buffered }
  get drainWaiters (): number { return this.#drains.size }

  writeStdin (data: Buffer): boolean {
    this.written.push(data)
    this.buffered += data.length
    return this.buffered < this.stdinHighWater
  }

  endStdin (): void { this.ended = true }

  onStdinDrain (cb: () => void): () => void {
    this.#drains.add(cb)
    return () => { this.#drains.delete(cb) }
  }

  drain (): void {
    this.buffered = 0
    const cbs = [...this.#drains]
    this.#drains.clear()
    for (const cb of cbs) cb()
  }
}

const tick = async (): Promise<void> => { await new Promise<void>((resolve) => setImmediate(resolve)) }

describe('StdinFlow', () => {
  it('before the start: queues, pauses at its high-water mark, refuses beyond the cap, and hands everything over in order on start', async () => {
    const flow = new StdinFlow()
    const chunk = Buffer.alloc(64 * 1024, 1)
    const results: string[] = []
    for (let i = 0; i < 4; i++) results.push(flow.write(chunk))
    expect(results).toEqual(['accepted', 'accepted', 'accepted', 'paused'])
    let resumed = 0
    flow.onWritable(() => { resumed++ })
    // Writers that had bytes in flight go on until the cap beyond the mark is held, then are refused.
    let queued = 4 * chunk.length
    while (queued <= PENDING_STDIN_HIGH_WATER + STDIN_BUFFER_MAX_BYTES) { expect(flow.write(chunk)).toBe('paused'); queued += chunk.length }
    expect(flow.write(chunk)).toBe('overflow')
    expect(flow.write(Buffer.alloc(1))).toBe('overflow')
    await tick()
    expect(resumed).toBe(0)
    const sink = new FakeSink()
    flow.start(sink)
    expect(Buffer.concat(sink.written).length).toBe(queued)
    // The sink took more than its mark: the writer waits for the sink's drain, not for the start.
    await tick()
    expect(resumed).toBe(0)
    expect(sink.drainWaiters).toBe(1)
    sink.drain()
    expect(resumed).toBe(1)
  })

  it('after the start: pauses while the sink is over its mark, with one drain wait however many writers, and refuses past the cap', () => {
    const flow = new StdinFlow()
    const sink = new FakeSink()
    flow.start(sink)
    expect(flow.write(Buffer.alloc(1000))).toBe('accepted')
    expect(flow.write(Buffer.alloc(64 * 1024))).toBe('paused')
    const woken: string[] = []
    flow.onWritable(() => woken.push('a'))
    expect(flow.write(Buffer.alloc(1000))).toBe('paused')
    flow.onWritable(() => woken.push('b'))
    expect(sink.drainWaiters).toBe(1)
    // One max-size frame beyond the mark is still taken (one writer crossing it); once more
    // than the cap is held beyond the mark, nothing is.
    expect(flow.write(Buffer.alloc(STDIN_BUFFER_MAX_BYTES))).toBe('paused')
    expect(flow.write(Buffer.alloc(1))).toBe('overflow')
    sink.drain()
    expect(woken).toEqual(['a', 'b'])
    expect(flow.write(Buffer.alloc(10))).toBe('accepted')
  })

  it('a cancelled wait is never called; EOF wakes the waiters and drops later stdin', () => {
    const flow = new StdinFlow()
    const sink = new FakeSink()
    flow.start(sink)
    expect(flow.write(Buffer.alloc(64 * 1024))).toBe('paused')
    const woken: string[] = []
    const cancel = flow.onWritable(() => woken.push('gone'))
    flow.onWritable(() => woken.push('kept'))
    cancel()
    flow.end()
    expect(woken).toEqual(['kept'])
    expect(sink.ended).toBe(true)
    expect(sink.drainWaiters).toBe(0)
    const before = sink.written.length
    expect(flow.write(Buffer.alloc(10))).toBe('accepted')
    expect(sink.written.length).toBe(before)
  })

  it('EOF before the start reaches the sink after the queued bytes', () => {
    const flow = new StdinFlow()
    flow.write(Buffer.from('abc'))
    flow.end()
    const sink = new FakeSink()
    flow.start(sink)
    expect(Buffer.concat(sink.written).toString()).toBe('abc')
    expect(sink.ended).toBe(true)
  })

  it('a wait registered while nothing is congested is called soon, not synchronously', async () => {
    const flow = new StdinFlow()
    let called = 0
    flow.onWritable(() => { called++ })
    expect(called).toBe(0)
    await tick()
    expect(called).toBe(1)
  })
})
