import { writeSync } from 'node:fs'
import { Writable } from 'node:stream'

// VEOF in node-pty's termios: what Ctrl-D at a terminal sends. A terminal has no half-close, so
// this is how the client's EOF reaches a program reading it (in canonical mode).
const EOF_CHAR = Buffer.from([4])
// While the terminal's input queue is full the program is not reading; retries back off to this.
const MAX_RETRY_MS = 64

/**
 * The client's input into the pty master, as a stream the channel is piped into. node-pty's own
 * write() is not used: it retries a full terminal with setImmediate (a busy loop for as long as
 * the program does not read), queues without bound, and keeps writing to the descriptor number
 * after the terminal was closed, when that number may already belong to another terminal or
 * socket. Here the stream's buffer gives the channel backpressure (pipe() stops reading it, so
 * ssh2 stops opening the client's window), a full terminal is retried on a backing-off timer, and
 * every write first checks that the terminal is still open. writeSync never blocks on the
 * non-blocking master, and being synchronous it cannot interleave with the close.
 */
export class PtyInput extends Writable {
  readonly #fd: number
  readonly #isOpen: () => boolean
  #retry: NodeJS.Timeout | undefined
  #retryMs = 1

  constructor (fd: number, isOpen: () => boolean) {
    super()
    this.#fd = fd
    this.#isOpen = isOpen
  }

  override _write (chunk: Buffer, _encoding: BufferEncoding, callback: (err?: Error | null) => void): void {
    this.#writeFrom(chunk, 0, callback)
  }

  override _final (callback: (err?: Error | null) => void): void {
    this.#writeFrom(EOF_CHAR, 0, callback)
  }

  override _destroy (err: Error | null, callback: (err?: Error | null) => void): void {
    clearTimeout(this.#retry)
    this.#retry = undefined
    callback(err)
  }

  #writeFrom (chunk: Buffer, offset: number, callback: (err?: Error | null) => void): void {
    this.#retry = undefined
    if (this.destroyed) return
    if (!this.#isOpen()) {
      callback(Object.assign(new Error('the terminal is closed'), { code: 'EIO' }))
      return
    }
    let written = 0
    try {
      written = writeSync(this.#fd, chunk, offset)
    } catch (err) {
      // EIO: nothing holds the terminal's other side any more.
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') {
        callback(err as Error)
        return
      }
    }
    offset += written
    if (offset >= chunk.length) {
      this.#retryMs = 1
      callback()
      return
    }
    this.#retryMs = written > 0 ? 1 : Math.min(this.#retryMs * 2, MAX_RETRY_MS)
    this.#retry = setTimeout(() => { this.#writeFrom(chunk, offset, callback) }, this.#retryMs)
  }
}
