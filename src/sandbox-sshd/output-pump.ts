import type { Readable, Writable } from 'node:stream'

/**
 * Moves one child pipe (stdout or stderr) into one side of the SSH channel, pausing the pipe
 * while the channel's buffer is full so a slow client slows the command down instead of growing
 * memory. Hand-rolled rather than `pipe()` because the exit logic needs to know whether the pump
 * is waiting on the client (`blocked`) and how much it read after the child exited.
 */
export class OutputPump {
  readonly #source: Readable
  readonly #sink: Writable
  readonly #onChange: () => void
  #ended = false
  #blocked = false
  #stopped = false
  #childExited = false
  #bytesAfterExit = 0

  /** onChange runs whenever `ended` or `blocked` changes, for whoever waits on the pump. */
  constructor (source: Readable, sink: Writable, onChange: () => void) {
    this.#source = source
    this.#sink = sink
    this.#onChange = onChange
    source.on('data', this.#onData)
    source.once('end', this.#onEnd)
    // A read error on our end of a pipe means no more output will come from it.
    source.on('error', this.#onEnd)
    source.once('close', this.#onEnd)
  }

  /** The pipe reached EOF (or failed, or was stopped): nothing more will be forwarded. */
  get ended (): boolean { return this.#ended }
  /** Paused because the channel has not taken the previous output yet. */
  get blocked (): boolean { return this.#blocked }
  get bytesAfterExit (): number { return this.#bytesAfterExit }

  markChildExited (): void { this.#childExited = true }

  /** Stops forwarding and closes our end of the pipe; a process still holding it gets EPIPE. */
  stop (): void {
    if (this.#stopped) return
    this.#stopped = true
    this.#sink.removeListener('drain', this.#onDrain)
    this.#source.removeListener('data', this.#onData)
    this.#source.destroy()
    this.#onEnd()
  }

  readonly #onData = (chunk: Buffer): void => {
    if (this.#stopped) return
    if (this.#childExited) this.#bytesAfterExit += chunk.length
    if (!this.#sink.write(chunk)) {
      this.#blocked = true
      this.#source.pause()
      this.#sink.once('drain', this.#onDrain)
      this.#onChange()
    }
  }

  readonly #onDrain = (): void => {
    if (this.#stopped) return
    this.#blocked = false
    this.#source.resume()
    this.#onChange()
  }

  readonly #onEnd = (): void => {
    if (this.#ended) return
    this.#ended = true
    this.#blocked = false
    this.#sink.removeListener('drain', this.#onDrain)
    this.#onChange()
  }
}
