import { Writable } from 'node:stream'
import type { ServerChannel } from 'ssh2'

// The channel internals this module reads and resets (ssh2 1.17 lib/Channel.js, lib/server.js).
interface ChannelChunkState {
  outgoing: { state: string }
  _chunk: Buffer | undefined
  _chunkcb: (() => void) | undefined
  _chunkErr: Buffer | undefined
  _chunkcbErr: (() => void) | undefined
}

interface Pending { sink: Writable, chunk: Buffer, done: (err?: Error | null) => void }

// What one side may hold before its writer is told to wait ('drain'): ssh2's own high-water mark.
const SIDE_HIGH_WATER_BYTES = 2 * 1024 * 1024

/**
 * The one writer of a server channel's stdout and stderr. Both sides go through one FIFO, so at
 * most one ssh2 write is waiting for window space at any time, and output reaches the client in
 * the order the command produced it.
 *
 * Why: ssh2 (1.17.0, and every release since 1.0) keeps one `_waitWindow` flag per channel but
 * two parked writes (`_chunk` for stdout, `_chunkErr` for stderr), and its CHANNEL_WINDOW_ADJUST
 * handler resumes `_chunk` if it is set, else `_chunkErr`, and never clears either once the write
 * went out. After stdout has once waited for the window, `_chunk` stays set for good: a later
 * stderr write that waits for the window is never resumed (its callback never runs, so the rest
 * of stderr, the flush barrier and the exit report wait forever), and each window adjust meanwhile
 * re-sends the stale stdout chunk and calls its callback again. That is how a burst of more than
 * the client's 2 MiB window followed by one write to the other stream hung every exec, and how
 * 65,536 bytes (one pipe read) the command never wrote reached a client. Upstream should clear
 * `_chunk`/`_chunkcb` (and the stderr pair) before resuming a parked write and resume both sides
 * on a window adjust; no upstream issue names this yet. Until then: one write in flight, and the
 * parked state cleared as soon as it completes, so the handler can only ever see the live one.
 */
export class ChannelOutput {
  readonly stdout: Writable
  readonly stderr: Writable
  readonly #channel: ServerChannel
  readonly #queue: Pending[] = []
  #inFlight = false
  #flushWaiters: Array<() => void> = []

  constructor (channel: ServerChannel) {
    this.#channel = channel
    this.stdout = this.#side(channel)
    this.stderr = this.#side(channel.stderr)
  }

  /** True while the channel can still carry output (the client has not closed it). */
  get open (): boolean {
    return (this.#channel as unknown as ChannelChunkState).outgoing.state === 'open'
  }

  /**
   * Runs `then` once everything already written on either side has been handed to the protocol
   * (sent, within the window). A client that never reads again keeps this waiting until it closes
   * the channel; a channel that is no longer open runs it at once.
   */
  flush (then: () => void): void {
    if (!this.open) { then(); return }
    // Both facades' own buffers first: a write still in a Writable's buffer is not in the queue yet.
    let pending = 2
    const sideDone = (): void => {
      if (--pending > 0) return
      if (!this.#inFlight && this.#queue.length === 0) then()
      else this.#flushWaiters.push(then)
    }
    this.stdout.write(Buffer.alloc(0), sideDone)
    this.stderr.write(Buffer.alloc(0), sideDone)
  }

  #side (sink: Writable): Writable {
    return new Writable({
      highWaterMark: SIDE_HIGH_WATER_BYTES,
      write: (chunk: Buffer, _encoding, done) => {
        if (chunk.length === 0) { done(); return }
        this.#queue.push({ sink, chunk, done })
        this.#next()
      }
    })
  }

  #next (): void {
    if (this.#inFlight) return
    const item = this.#queue.shift()
    if (item === undefined) {
      const waiters = this.#flushWaiters
      this.#flushWaiters = []
      for (const w of waiters) w()
      return
    }
    if (!this.open) {
      // The client closed the channel: ssh2 would drop the write without calling back. Nothing
      // queued can be delivered any more; complete it so the writers are not left waiting.
      item.done()
      this.#next()
      return
    }
    this.#inFlight = true
    // A failed write is the channel's failure, reported by the channel's own 'error' listener;
    // the facade completes either way so its writer is never left waiting on a dead channel.
    item.sink.write(item.chunk, () => {
      this.#clearParkedWrites()
      this.#inFlight = false
      item.done()
      this.#next()
    })
  }

  #clearParkedWrites (): void {
    const ch = this.#channel as unknown as ChannelChunkState
    ch._chunk = undefined
    ch._chunkcb = undefined
    ch._chunkErr = undefined
    ch._chunkcbErr = undefined
  }
}
