// One run's stdin on the gateway side. WebSocket clients can send stdin much faster than a
// command reads it; what they send must wait somewhere, and that somewhere is bounded:
// - before the command starts, in a queue: a writer is told to pause once the queue holds
//   PENDING_STDIN_HIGH_WATER bytes, and resumes when the command starts and the queue moved on;
// - after, in the SSH channel: a writer is told to pause while the channel holds its
//   high-water mark that the sandbox's window has not taken yet, and resumes on its 'drain';
//   and, for a daemon that opens its window wide but never reads, while the relay stream holds
//   as much that the supervisor has not read (the sink says so: RemoteCommand.writeStdin).
// A writer crosses the mark by up to one frame, and a paused one still delivers the frames of
// the socket read it was in; several writers add up. Once more than STDIN_BUFFER_MAX_BYTES
// beyond the mark is held, a write is refused ('overflow'): no number of clients can grow the
// gateway's memory without bound, yet one client that respects the pause (at most a 1 MiB
// frame plus a 64 KiB read beyond the mark) is never refused.

export const STDIN_BUFFER_MAX_BYTES = 2 * 1024 * 1024
export const PENDING_STDIN_HIGH_WATER = 256 * 1024

// 'accepted': keep writing. 'paused': the bytes are taken, but send no more until the
// onWritable callback runs. 'overflow': the bytes were refused.
export type StdinWrite = 'accepted' | 'paused' | 'overflow'

// The started command's stdin (RemoteCommand).
export interface StdinSink {
  // False once the sink (the channel, or the relay under it) holds its high-water mark; it
  // then calls onStdinDrain's callbacks. stdinBuffered is the channel's: the relay is shared
  // by the execs of a pooled connection, and its pause alone bounds it.
  writeStdin: (data: Buffer) => boolean
  endStdin: () => void
  readonly stdinBuffered: number
  readonly stdinHighWater: number
  // Calls cb once, never synchronously, when the buffered stdin has gone (or never will);
  // returns the function that cancels it.
  onStdinDrain: (cb: () => void) => () => void
}

export class StdinFlow {
  #queue: Buffer[] = []
  #queued = 0
  #sink: StdinSink | undefined
  #ended = false
  #congested = false
  #cancelDrainWait: (() => void) | undefined
  readonly #waiters = new Set<() => void>()

  get ended (): boolean { return this.#ended }

  write (data: Buffer): StdinWrite {
    if (this.#ended) return 'accepted'
    const sink = this.#sink
    if (sink === undefined) {
      if (this.#queued > PENDING_STDIN_HIGH_WATER + STDIN_BUFFER_MAX_BYTES) return 'overflow'
      this.#queue.push(data)
      this.#queued += data.length
      if (this.#queued < PENDING_STDIN_HIGH_WATER) return 'accepted'
      this.#congested = true
      return 'paused'
    }
    if (sink.stdinBuffered > sink.stdinHighWater + STDIN_BUFFER_MAX_BYTES) return 'overflow'
    if (sink.writeStdin(data)) return 'accepted'
    this.#awaitDrain(sink)
    return 'paused'
  }

  // EOF. Stdin after it is dropped, so nothing is held back any more.
  end (): void {
    if (this.#ended) return
    this.#ended = true
    this.#sink?.endStdin()
    this.#wake()
  }

  // The command started: what waited in the queue goes to it, in order.
  start (sink: StdinSink): void {
    if (this.#sink !== undefined) return
    this.#sink = sink
    const queue = this.#queue
    this.#queue = []
    this.#queued = 0
    let taken = true
    for (const b of queue) taken = sink.writeStdin(b)
    if (this.#ended) sink.endStdin()
    if (taken || this.#ended) this.#wake()
    else this.#awaitDrain(sink)
  }

  // Calls cb once, never synchronously, when a writer told 'paused' may write again; returns
  // the function that cancels it (for a writer that goes away first).
  onWritable (cb: () => void): () => void {
    this.#waiters.add(cb)
    if (!this.#congested) queueMicrotask(() => { if (!this.#congested) this.#wake() })
    return () => { this.#waiters.delete(cb) }
  }

  #awaitDrain (sink: StdinSink): void {
    this.#congested = true
    this.#cancelDrainWait ??= sink.onStdinDrain(() => {
      this.#cancelDrainWait = undefined
      this.#wake()
    })
  }

  #wake (): void {
    this.#congested = false
    this.#cancelDrainWait?.()
    this.#cancelDrainWait = undefined
    const waiters = [...this.#waiters]
    this.#waiters.clear()
    for (const w of waiters) w()
  }
}
