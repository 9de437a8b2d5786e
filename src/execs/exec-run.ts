import type { Logger } from 'pino'
import type { GatewayEvents } from '../diagnostics.js'
import { GatewayError } from '../errors.js'
import { decideOutcome, type Outcome } from '../relay/outcome.js'
import { openCommand, type RemoteCommand } from '../relay/remote-command.js'
import type { SshPool } from '../relay/ssh-pool.js'
import { assembleCommand, killScript, type SignalName } from './command.js'
import type { ExecEntry } from './exec-entry.js'
import { RunTimers } from './run-timers.js'
import { StdinFlow, type StdinWrite } from './stdin-flow.js'

// One exec's run: from asking the relay for the command to its outcome. The run owns what lives
// only as long as it does: its timers, its stdin queue, the signals that wait for the start,
// and the remote command itself. It never finishes the entry: its caller does, with run()'s
// result, after its own accounting.

// After a kill is delivered, how long its exit report may take beyond the close wait: the
// sandbox reaps the killed tree and sends the report, a few round trips on a loaded host.
const KILL_REPORT_SLACK_MS = 2000

interface ExecRunOptions {
  pool: SshPool
  closeWaitMs: number
  logger: Logger
  events: GatewayEvents
}

export class ExecRun {
  readonly #entry: ExecEntry
  readonly #opts: ExecRunOptions
  readonly #log: Logger
  readonly #abort = new AbortController()
  // Queued until the command starts, then the command's; bounded either way.
  readonly #stdin = new StdinFlow()
  // The run's only timers; disposed on its way out.
  readonly #timers = new RunTimers()
  #queuedSignals: SignalName[] = []
  // Set once the command has started.
  #command: RemoteCommand<SignalName> | undefined
  #timedOut = false
  // The timeout's kill, read once the command is done: whether the sandbox confirmed it.
  #timeoutKill: Promise<boolean> | undefined

  constructor (entry: ExecEntry, opts: ExecRunOptions) {
    this.#entry = entry
    this.#opts = opts
    this.#log = opts.logger.child({ execId: entry.id, sandboxId: entry.sandboxId })
  }

  // Runs the exec to its outcome. Never rejects.
  async run (): Promise<Outcome> {
    const entry = this.#entry
    const spec = entry.spec
    const log = this.#log
    let outcome: Outcome
    const onFlow = (held: boolean): void => this.#command?.setPaused(held)
    try {
      const command = await openCommand<SignalName>(this.#opts.pool, entry.sandboxId, {
        line: assembleCommand({ command: spec.command, env: spec.env, workdir: spec.workdir, execId: entry.id }),
        pty: spec.tty ? { cols: spec.cols, rows: spec.rows } : undefined,
        signalScript: (signal) => killScript(entry.id, signal),
        closeWaitMs: this.#opts.closeWaitMs,
        logger: log,
        onOutput: (stream, chunk) => {
          this.#opts.events.execBytes({ stream, bytes: chunk.length })
          entry.append(stream, chunk)
        }
      }, this.#abort.signal)
      // abort() may have run while openCommand's answer was on its way here.
      if (this.#abort.signal.aborted) {
        const reason = toGatewayError(this.#abort.signal.reason, log)
        command.abort(reason)
        command.release()
        throw reason
      }
      this.#command = command
      entry.on('flow', onFlow)
      if (entry.flowHeld) command.setPaused(true)
      this.#onStarted(command)
      const end = await command.done
      // The kill's own answer is bounded (RemoteCommand.signal): wait for it rather than read a
      // flag it may not have set yet.
      const killConfirmed = this.#timedOut && end.exit === undefined ? await (this.#timeoutKill ?? false) : false
      outcome = decideOutcome({
        exit: end.exit,
        timedOut: this.#timedOut && (end.exit !== undefined || killConfirmed),
        failure: end.failure
      })
    } catch (err) {
      outcome = { kind: 'failed', error: toGatewayError(err, log) }
    } finally {
      entry.off('flow', onFlow)
      this.#command?.release()
      this.#timers.dispose()
    }
    if (outcome.kind === 'failed') log.warn({ code: outcome.error.code, detail: outcome.error.detail }, 'exec failed')
    else log.info({ exitCode: outcome.exitCode, signal: outcome.signal, timedOut: outcome.timedOut }, 'exec ended')
    return outcome
  }

  // 'paused': stop reading from this writer until onStdinWritable's callback; 'overflow': the
  // bytes were refused (see StdinFlow).
  writeStdin (data: Buffer): StdinWrite {
    if (this.#stdin.ended) return 'accepted'
    const result = this.#stdin.write(data)
    if (result !== 'overflow') this.#opts.events.execBytes({ stream: 'stdin', bytes: data.length })
    return result
  }

  onStdinWritable (resume: () => void): () => void {
    return this.#stdin.onWritable(resume)
  }

  endStdin (): void {
    this.#stdin.end()
  }

  // Only a terminal has a size.
  resize (cols: number, rows: number): void {
    if (this.#entry.spec.tty) this.#command?.resize(cols, rows)
  }

  // Before the start, the signal waits for it.
  signal (signal: SignalName): void {
    const command = this.#command
    if (command !== undefined) void command.signal(signal)
    else this.#queuedSignals.push(signal)
  }

  // DELETE: the run ends within a bound even when no exit report ever comes (a wedged daemon, a
  // lost channel), so that the sandbox's slot is free again.
  remove (): void {
    const command = this.#command
    if (command !== undefined) void this.#killWithinBound(command, 'the exec was deleted and no exit report arrived after the kill')
    else this.#abort.abort(new GatewayError('exec_not_found', `exec ${this.#entry.id} was deleted before it started`))
  }

  // Ends the run from outside (shutdown): its outcome is this error unless an exit report is in.
  abort (error: GatewayError): void {
    this.#abort.abort(error)
    this.#command?.abort(error)
  }

  #onStarted (command: RemoteCommand<SignalName>): void {
    const entry = this.#entry
    entry.markStarted()
    const spec = entry.spec
    if (!spec.interactive && spec.stdin !== undefined) {
      this.#opts.events.execBytes({ stream: 'stdin', bytes: spec.stdin.length })
      command.writeStdin(spec.stdin)
    }
    this.#stdin.start(command)
    if (!spec.interactive) this.#stdin.end()
    for (const s of this.#queuedSignals) void command.signal(s)
    this.#queuedSignals = []
    if (spec.timeoutSeconds > 0) {
      this.#timers.arm('timeout', spec.timeoutSeconds * 1000, () => {
        this.#timedOut = true
        this.#timeoutKill = this.#killWithinBound(command, 'the command was killed on timeout but no exit report arrived')
      })
    }
  }

  // KILL, then never wait on its report without a bound. The bound is armed through the run's
  // timers, so a kill answered after the run ended arms nothing.
  async #killWithinBound (command: RemoteCommand<SignalName>, why: string): Promise<boolean> {
    const confirmed = await command.signal('KILL')
    this.#timers.arm('killBound', this.#opts.closeWaitMs + KILL_REPORT_SLACK_MS, () => {
      command.abort(new GatewayError('relay_unavailable', why))
    })
    return confirmed
  }
}

function toGatewayError (err: unknown, log: Logger): GatewayError {
  if (GatewayError.is(err)) return err
  log.error({ err }, 'unexpected error in exec run')
  return new GatewayError('internal', 'unexpected error while running the exec', { cause: err })
}
