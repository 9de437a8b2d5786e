import type { Readable, Writable } from 'node:stream'
import type { ServerChannel } from 'ssh2'
import { ChannelOutput } from './channel-output.js'
import { sendExitReport, type ExitOutcome } from './exit-report.js'

/**
 * Where a run's output goes and its input comes from. A run does not care whether that is the
 * SSH channel that started it (ChannelIo: today's behaviour, as under OpenSSH) or a kept exec's
 * spools (keeper/kept-exec.ts), which outlive any channel.
 */
export interface RunIo {
  /** Writers with backpressure: write() false means wait for 'drain'. A pty uses stdout only. */
  readonly stdout: Writable
  readonly stderr: Writable
  /** The client's data and EOF, for the command's stdin. */
  readonly input: Readable
  /** Runs `then` once everything written so far has been taken (sent, or spooled). */
  flush(then: () => void): void
  /** The command's outcome, after a flush: the exit report. */
  report(outcome: ExitOutcome): void
  /** The client went away before the report: the run is abandoned. Called at most once. */
  onGone(listener: () => void): void
  /** The run is over: drain and drop whatever input still comes. */
  release(): void
}

/** A run wired straight to its channel: the client's going away abandons it. */
export class ChannelIo implements RunIo {
  readonly #channel: ServerChannel
  // Both output streams go through this one writer (see ChannelOutput for the ssh2 bug it avoids).
  readonly #output: ChannelOutput

  constructor (channel: ServerChannel, onError: (err: Error) => void) {
    this.#channel = channel
    this.#output = new ChannelOutput(channel)
    channel.on('error', onError)
    channel.stderr.on('error', onError)
  }

  get stdout (): Writable { return this.#output.stdout }
  get stderr (): Writable { return this.#output.stderr }
  get input (): Readable { return this.#channel }

  flush (then: () => void): void { this.#output.flush(then) }

  report (outcome: ExitOutcome): void { sendExitReport(this.#channel, outcome) }

  onGone (listener: () => void): void { this.#channel.once('close', listener) }

  release (): void {
    // Drain and drop whatever the client still sends, so ssh2 sees the channel's end and
    // completes its close.
    this.#channel.resume()
  }
}
