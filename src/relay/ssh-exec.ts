import type { ClientChannel } from 'ssh2'
import type { Logger } from 'pino'
import { GatewayError } from '../errors.js'
import { exitReportFrom, type ExitReport } from './outcome.js'
import type { SshConnection } from './ssh-connection.js'
import { kExitRejected } from './ssh-guard.js'
import { TIMEOUT_EXIT_MESSAGE } from '../schemas/keeper.js'

// One exec: one channel on an SSH connection. After the exit report the channel close is
// awaited for closeWaitMs in total, then the recorded status stands; a connection that dies
// before the exit report ends the exec with the connection's reason.

export interface SshExecOptions {
  conn: SshConnection
  channel: ClientChannel
  closeWaitMs: number
  logger: Logger
  onStdout: (chunk: Buffer) => void
  onStderr: (chunk: Buffer) => void
}

export interface SshExecEnd {
  exit: ExitReport | undefined
  failure: GatewayError | undefined
  // The exit-signal carried the keeper's timeout marker: a kept exec's daemon killed it on its
  // timeoutSeconds. Meaningful only for kept execs (any other daemon could say it).
  timeoutMarked: boolean
}

export class SshExec {
  readonly #opts: SshExecOptions
  readonly #channel: ClientChannel
  #exit: ExitReport | undefined
  #timeoutMarked = false
  #failure: GatewayError | undefined
  #closeWaitTimer: NodeJS.Timeout | undefined
  // What is left of the close wait, and since when it runs: it runs only while we read.
  #closeWaitLeftMs: number
  #closeWaitSince = 0
  #paused = false
  #finished = false
  #channelClosed = false
  #resolve!: (end: SshExecEnd) => void
  // Writers waiting for the channel to take the stdin it holds; the channel's one 'drain'
  // listener, or the end of the exec, calls them.
  readonly #drainWaiters = new Set<() => void>()
  #cancelRelayDrain: (() => void) | undefined
  readonly #onConnFailure: (err: GatewayError) => void
  readonly done: Promise<SshExecEnd>

  constructor (opts: SshExecOptions) {
    this.#opts = opts
    this.#closeWaitLeftMs = opts.closeWaitMs
    this.#channel = opts.channel
    this.done = new Promise((resolve) => { this.#resolve = resolve })
    const channel = opts.channel
    // Node destroys a duplex once both of its sides have ended, and ssh2's Channel.destroy()
    // sends CHANNEL_CLOSE: after our stdin EOF and the sandbox's EOF, that close would reach
    // sshd before its exit-status, and OpenSSH then drops the status. Rule 5: before the exit
    // report, EOF only. The channel is closed in #finish, after the report.
    const states = channel as unknown as { _readableState: { autoDestroy: boolean }, _writableState: { autoDestroy: boolean } }
    states._readableState.autoDestroy = false
    states._writableState.autoDestroy = false
    channel.on('data', (chunk: Buffer) => { if (!this.#finished) opts.onStdout(chunk) })
    channel.stderr.on('data', (chunk: Buffer) => { if (!this.#finished) opts.onStderr(chunk) })
    // A Readable holds what is pushed before its first read, and 'data' starts that read only on
    // the next tick: a burst that came with the channel's confirmation (a reattach's replay)
    // would reach us stdout first, then stderr, not in the order the daemon sent it.
    channel.read(0)
    channel.stderr.read(0)
    channel.on('error', (err: Error) => opts.logger.debug({ err }, 'ssh channel error'))
    channel.stderr.on('error', (err: Error) => opts.logger.debug({ err }, 'ssh channel stderr error'))
    channel.on('drain', () => this.#wakeDrainWaiters())
    // The guard lets through only the first well-formed report; this is the last word on what
    // becomes an exit (a uint32 status, or a signal name in the SSH grammar) all the same.
    channel.on(kExitRejected, (detail: string) => this.#fail(new GatewayError('ssh_failed', detail)))
    channel.on('exit', (code: unknown, signal?: unknown, _dump?: unknown, message?: unknown) => {
      if (this.#exit !== undefined || this.#finished) return
      const report = exitReportFrom(code, signal)
      if ('invalid' in report) { this.#fail(new GatewayError('ssh_failed', report.invalid)); return }
      this.#exit = report
      this.#timeoutMarked = 'signal' in report && message === TIMEOUT_EXIT_MESSAGE
      // Total bound, not per message: a sandbox that trickles data must not hold the exec open.
      if (!this.#paused) this.#runCloseWait()
    })
    // 'close' comes after the readable side ended; let stderr's last push run first.
    channel.on('close', () => {
      this.#channelClosed = true
      setImmediate(() => this.#onChannelClosed())
    })
    this.#onConnFailure = (err) => this.#fail(err)
    opts.conn.once('failure', this.#onConnFailure)
    if (opts.conn.failure !== undefined) setImmediate(() => this.#fail(opts.conn.failure!))
  }

  get exitReport (): ExitReport | undefined { return this.#exit }

  // False once the channel holds its high-water mark of stdin that the sandbox's window has
  // not taken yet, or the relay holds as much that the supervisor has not read (a daemon that
  // opens its window wide and never reads); onStdinDrain then says when it has. Stdin for a
  // finished exec is dropped: a closed channel would hold it forever.
  writeStdin (data: Buffer): boolean {
    const ch = this.#channel
    if (this.#finished || !ch.writable) return true
    if (!ch.write(data)) return false
    if (!this.#opts.conn.relayBacklogged) return true
    this.#cancelRelayDrain ??= this.#opts.conn.onRelayDrain(() => {
      this.#cancelRelayDrain = undefined
      this.#wakeDrainWaiters()
    })
    return false
  }

  get stdinBuffered (): number { return this.#channel.writableLength }
  get stdinHighWater (): number { return this.#channel.writableHighWaterMark }

  onStdinDrain (cb: () => void): () => void {
    if (this.#finished) {
      let cancelled = false
      queueMicrotask(() => { if (!cancelled) cb() })
      return () => { cancelled = true }
    }
    this.#drainWaiters.add(cb)
    return () => { this.#drainWaiters.delete(cb) }
  }

  // EOF only: a channel close before the exit report would let the sandbox drop the exit status.
  endStdin (): void {
    if (this.#channel.writable) this.#channel.end()
  }

  #wakeDrainWaiters (): void {
    const waiters = [...this.#drainWaiters]
    this.#drainWaiters.clear()
    for (const w of waiters) w()
  }

  // Stops (or restarts) reading the channel: ssh2 then stops adjusting the SSH window, so the
  // sandbox stops sending and the command blocks on its writes.
  // The close wait stands still meanwhile: OpenSSH sends exit-status as soon as the command exits
  // and the output still in its buffers after it, which cannot come while we keep the window shut.
  setPaused (paused: boolean): void {
    if (this.#finished || paused === this.#paused) return
    this.#paused = paused
    const ch = this.#channel
    if (paused) {
      ch.pause(); ch.stderr.pause()
      this.#holdCloseWait()
    } else {
      ch.resume(); ch.stderr.resume()
      if (this.#exit !== undefined) this.#runCloseWait()
    }
  }

  #runCloseWait (): void {
    if (this.#closeWaitTimer !== undefined || this.#finished) return
    this.#closeWaitSince = performance.now()
    this.#closeWaitTimer = setTimeout(() => this.#finish(), this.#closeWaitLeftMs)
  }

  #holdCloseWait (): void {
    if (this.#closeWaitTimer === undefined) return
    clearTimeout(this.#closeWaitTimer)
    this.#closeWaitTimer = undefined
    this.#closeWaitLeftMs = Math.max(0, this.#closeWaitLeftMs - (performance.now() - this.#closeWaitSince))
  }

  resize (cols: number, rows: number): void {
    this.#channel.setWindow(rows, cols, 0, 0)
  }

  // SSH `signal` request to the sandbox's direct child; used when the tag scan found nothing.
  // ssh2's channel.signal() sends nothing once our side has sent EOF (a non-interactive exec's
  // stdin ends at once), although requests are allowed until the close: its protocol sends it.
  signalChannel (signal: string): void {
    const ch = this.#channel as unknown as { outgoing: { id: number, state: string }, _client: { _protocol: { signal: (id: number, name: string) => void } } }
    try {
      if (ch.outgoing.state === 'open' || ch.outgoing.state === 'eof') ch._client._protocol.signal(ch.outgoing.id, signal)
    } catch (err) {
      this.#opts.logger.debug({ err }, 'signal request failed')
    }
  }

  // Ends the exec from outside (shutdown, a kill that was never reported): the outcome is this
  // failure unless an exit report already arrived.
  abort (error: GatewayError): void {
    this.#fail(error)
  }

  #onChannelClosed (): void {
    if (this.#exit === undefined) {
      this.#failure ??= this.#opts.conn.failure ?? new GatewayError('relay_unavailable', 'the SSH channel closed before the command reported an exit status')
    }
    this.#finish()
  }

  #fail (error: GatewayError): void {
    this.#failure ??= error
    this.#finish()
  }

  #finish (): void {
    if (this.#finished) return
    const ch = this.#channel
    // Output already received but held back for a slow reader belongs to the exec: hand it
    // over before the outcome (read() emits 'data' synchronously).
    while (ch.read() !== null) { /* emitted as 'data' */ }
    while (ch.stderr.read() !== null) { /* emitted as 'data' */ }
    this.#finished = true
    clearTimeout(this.#closeWaitTimer)
    this.#opts.conn.off('failure', this.#onConnFailure)
    // The exit report is in (or the exec is given up): free the channel's slot on the
    // connection. Before an exit report only an abort gets here, and then nobody waits for it.
    if (!this.#channelClosed && this.#opts.conn.alive) {
      try { ch.close() } catch { /* connection going away */ }
    }
    // A finished channel never drains: nobody may wait on it.
    this.#cancelRelayDrain?.()
    this.#cancelRelayDrain = undefined
    this.#wakeDrainWaiters()
    this.#resolve({ exit: this.#exit, failure: this.#exit === undefined ? this.#failure : undefined, timeoutMarked: this.#timeoutMarked })
  }
}
