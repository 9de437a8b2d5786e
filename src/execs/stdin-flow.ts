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
// Stdin sent to a kept exec that the daemon may not have taken when the relay dies: what the
// channel held, what the relay held, and what the daemon's window had let through but its
// command had not read. Each is bounded near 2 MiB (the channel's and the relay's high-water
// marks, ssh2's window); beyond that much, resending is impossible and the reattach says so.
const STDIN_LEDGER_MAX_BYTES = 8 * 1024 * 1024

// The tail of the stdin sent to a kept exec, addressed by byte offset in the command's stdin,
// so that what the daemon did not receive can be sent again after a reattach.
export class StdinLedger {
  #chunks: Buffer[] = []
  #kept = 0
  #total: number
  readonly #max: number

  constructor (startAt = 0, maxBytes = STDIN_LEDGER_MAX_BYTES) {
    this.#total = startAt
    this.#max = maxBytes
  }

  // The offset of the next byte sent.
  get total (): number { return this.#total }
  // The first offset still held.
  get start (): number { return this.#total - this.#kept }

  record (data: Buffer): void {
    if (data.length === 0) return
    this.#chunks.push(data)
    this.#kept += data.length
    this.#total += data.length
    while (this.#kept > this.#max) {
      const first = this.#chunks[0]!
      const over = this.#kept - this.#max
      if (first.length <= over) {
        this.#chunks.shift()
        this.#kept -= first.length
      } else {
        this.#chunks[0] = first.subarray(over)
        this.#kept -= over
      }
    }
  }

  // The bytes sent from `offset` on; 'gone' when they are no longer held, 'ahead' when the
  // offset is beyond what was ever sent (the daemon claims bytes nobody sent it).
  since (offset: number): Buffer | 'gone' | 'ahead' {
    if (offset > this.#total) return 'ahead'
    if (offset < this.start) return 'gone'
    let skip = offset - this.start
    const out: Buffer[] = []
    for (const c of this.#chunks) {
      if (skip >= c.length) { skip -= c.length; continue }
      out.push(skip > 0 ? c.subarray(skip) : c)
      skip = 0
    }
    return Buffer.concat(out)
  }
}

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
  // Only for a kept exec, whose command may outlive the sink (see reattach).
  #ledger: StdinLedger | undefined
  // An exec rebuilt after a restart, not attached yet: its queue starts at the stdin offset the
  // record told its clients (see adopt).
  #adopted = false

  get ended (): boolean { return this.#ended }

  // From now on, what reaches a sink is remembered (bounded) for a reattach; `startAt` is the
  // command's stdin offset of the next byte (nonzero for an exec adopted after a restart).
  keepLedger (startAt = 0): void {
    this.#ledger ??= new StdinLedger(startAt)
  }

  // An exec rebuilt after a restart: the daemon had `received` bytes of stdin when it listed
  // the exec, which is the offset its record shows (stdinBytes), so a client whose stdin the old
  // gateway took resends from there and what it writes queues at that offset.
  adopt (received: number): void {
    this.#ledger ??= new StdinLedger(received)
    this.#adopted = true
  }

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
    if (this.#send(sink, data)) return 'accepted'
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
    for (const b of queue) taken = this.#send(sink, b)
    if (this.#ended) sink.endStdin()
    if (taken || this.#ended) this.#wake()
    else this.#awaitDrain(sink)
  }

  // The kept command's sink went away (its relay was lost): stdin queues again, bounded as
  // before the start, until reattach gives it the new one.
  detach (): void {
    if (this.#sink === undefined) return
    this.#sink = undefined
    this.#cancelDrainWait?.()
    this.#cancelDrainWait = undefined
    // Writers paused on the old sink's drain may fill the queue up to its mark meanwhile.
    this.#wake()
  }

  // The kept command's new sink: first what the daemon did not receive (`received` is its count
  // of stdin bytes taken), then the queue, then EOF unless the daemon has it. Undefined when
  // done, else why it cannot be (the bytes to resend are no longer held).
  reattach (sink: StdinSink, received: number, daemonEof: boolean): string | undefined {
    if (this.#sink !== undefined) return undefined
    const ledger = this.#ledger ?? new StdinLedger(received)
    this.#ledger = ledger
    let resend = ledger.since(received)
    // The dead gateway's last stdin can reach the daemon after the list that rebuilt this exec
    // and before this attach cut the old channel off; a client that resent from the listed
    // offset has those bytes at the head of the queue, and the daemon is not given them twice.
    if (resend === 'ahead' && this.#adopted && received - ledger.total <= this.#queued) {
      this.#dropQueued(received - ledger.total)
      resend = Buffer.alloc(0)
    }
    this.#adopted = false
    if (resend === 'gone') return `the sandbox received ${received} bytes of stdin, and the ${ledger.start - received} bytes after them are no longer held to resend (at most ${STDIN_LEDGER_MAX_BYTES} are)`
    if (resend === 'ahead') return `the sandbox claims ${received} bytes of stdin, but only ${ledger.total} were sent`
    this.#sink = sink
    let taken = true
    // Already in the ledger: written to the sink directly.
    if (resend.length > 0) taken = sink.writeStdin(resend)
    const queue = this.#queue
    this.#queue = []
    this.#queued = 0
    for (const b of queue) taken = this.#send(sink, b)
    if (this.#ended && !daemonEof) sink.endStdin()
    if (taken || this.#ended) this.#wake()
    else this.#awaitDrain(sink)
    return undefined
  }

  // Calls cb once, never synchronously, when a writer told 'paused' may write again; returns
  // the function that cancels it (for a writer that goes away first).
  onWritable (cb: () => void): () => void {
    this.#waiters.add(cb)
    if (!this.#congested) queueMicrotask(() => { if (!this.#congested) this.#wake() })
    return () => { this.#waiters.delete(cb) }
  }

  // The first n queued bytes count as delivered: into the ledger, not to the sink.
  #dropQueued (n: number): void {
    while (n > 0) {
      const first = this.#queue[0]!
      const take = Math.min(n, first.length)
      this.#ledger?.record(first.subarray(0, take))
      if (take === first.length) this.#queue.shift()
      else this.#queue[0] = first.subarray(take)
      this.#queued -= take
      n -= take
    }
  }

  #send (sink: StdinSink, data: Buffer): boolean {
    this.#ledger?.record(data)
    return sink.writeStdin(data)
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
