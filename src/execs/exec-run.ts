import type { Logger } from 'pino'
import type { GatewayEvents } from '../diagnostics.js'
import { GatewayError } from '../errors.js'
import { decideOutcome, type Outcome } from '../relay/outcome.js'
import { openCommand, type AttachSpec, type RemoteCommand } from '../relay/remote-command.js'
import { encodeKeepMeta, KEEPER_PROTOCOL_VERSION, type KeepMeta, type KeptStatus } from '../schemas/keeper.js'
import type { SshPool } from '../relay/ssh-pool.js'
import type { TreeSignals } from '../relay/tree-signals.js'
import { assembleCommand, type SignalName } from './command.js'
import type { ExecEntry } from './exec-entry.js'
import { reattach, ReattachFatal, DEFAULT_REATTACH_TIMEOUT_MS, toGatewayError } from './reattach.js'
import { RunTimers } from './run-timers.js'
import { StdinFlow, type StdinWrite } from './stdin-flow.js'

// One exec's run: from asking the relay for the command to its outcome. The run owns what lives
// only as long as it does: its timers, its stdin queue, the signals that wait for the start,
// and the remote command itself. It never finishes the entry: its caller does, with run()'s
// result, after its own accounting.

// After a kill is delivered, how long its exit report may take beyond the close wait: the
// sandbox reaps the killed tree and sends the report, a few round trips on a loaded host.
const KILL_REPORT_SLACK_MS = 2000

// A kept exec's own timeout is the daemon's (it fires with no gateway connected); the
// gateway's timer is a backstop behind it, for a daemon that does not keep its word.
const KEPT_TIMEOUT_BACKSTOP_MS = 5000
// Room for the env request's framing below ssh2's server packet cap (35,000 bytes).
const KEEP_ENV_MAX_BYTES = 30_000

interface ExecRunOptions {
  pool: SshPool
  // The sandboxes' process scans (killScript), shared by every exec's signals.
  treeSignals: TreeSignals
  closeWaitMs: number
  logger: Logger
  events: GatewayEvents
  // How long a kept exec whose relay was lost may take to be reattached (§5 rule 4).
  reattachTimeoutMs?: number | undefined
  // The run of an exec rebuilt after a gateway restart from what its daemon keeps: it attaches
  // instead of opening, from the entry's offsets.
  adopt?: KeptStatus | undefined
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
  // Set while a command is attached: from the start (or an attach) to its end.
  #command: RemoteCommand<SignalName> | undefined
  // The sandbox's daemon keeps this exec: a lost relay is reattached, not the end.
  #kept = false
  #timedOut = false
  // The timeout's kill, read once the command is done: whether the sandbox confirmed it.
  #timeoutKill: Promise<boolean> | undefined
  // The run itself ended the relay's part: DELETE, or a kill whose report never came.
  #removed = false
  #gaveUp = false
  // The terminal's last size asked for: a reattached channel gets it again.
  #size: { cols: number, rows: number } | undefined

  constructor (entry: ExecEntry, opts: ExecRunOptions) {
    this.#entry = entry
    this.#opts = opts
    this.#log = opts.logger.child({ execId: entry.id, sandboxId: entry.sandboxId })
    // The record's stdin offset: the request's stdin is taken with it; an exec rebuilt after a
    // restart has what its daemon received (the rest went down with the old gateway).
    const spec = entry.spec
    if (opts.adopt !== undefined) entry.stdinBytes = opts.adopt.stdinReceived
    else if (!spec.interactive && spec.stdin !== undefined) entry.stdinBytes = spec.stdin.length
  }

  get kept (): boolean { return this.#kept }

  // Runs the exec to its outcome. Never rejects.
  async run (): Promise<Outcome> {
    const entry = this.#entry
    const log = this.#log
    let outcome: Outcome
    const onFlow = (held: boolean): void => this.#command?.setPaused(held)
    entry.on('flow', onFlow)
    try {
      let command = this.#opts.adopt === undefined ? await this.#open() : await this.#adopt(this.#opts.adopt)
      for (;;) {
        const end = await command.done
        this.#command = undefined
        if (!this.#mayReattach(end)) {
          // The kill's own answer is bounded (RemoteCommand.signal): wait for it rather than
          // read a flag it may not have set yet.
          const killConfirmed = this.#timedOut && end.exit === undefined ? await (this.#timeoutKill ?? false) : false
          command.release()
          outcome = decideOutcome({
            exit: end.exit,
            timedOut: (this.#timedOut && (end.exit !== undefined || killConfirmed)) || (this.#kept && end.timeoutMarked),
            failure: end.failure
          })
          break
        }
        command.release()
        log.info({ detail: end.failure?.detail }, 'relay of a kept exec lost; reattaching')
        this.#stdin.detach()
        entry.relayLost()
        command = await this.#reattach(end.failure)
        entry.relayRestored()
        log.info('kept exec reattached')
      }
    } catch (err) {
      outcome = { kind: 'failed', error: toGatewayError(err, log) }
    } finally {
      entry.off('flow', onFlow)
      this.#command?.release()
      this.#command = undefined
      this.#timers.dispose()
    }
    if (outcome.kind === 'failed') log.warn({ code: outcome.error.code, detail: outcome.error.detail }, 'exec failed')
    else log.info({ exitCode: outcome.exitCode, signal: outcome.signal, timedOut: outcome.timedOut }, 'exec ended')
    return outcome
  }

  #outputSpec (): AttachSpec {
    const entry = this.#entry
    return {
      closeWaitMs: this.#opts.closeWaitMs,
      logger: this.#log,
      onOutput: (stream, chunk) => {
        this.#opts.events.execBytes({ stream, bytes: chunk.length })
        entry.append(stream, chunk)
      }
    }
  }

  async #open (): Promise<RemoteCommand<SignalName>> {
    const entry = this.#entry
    const spec = entry.spec
    const registry = this.#opts.pool.registry
    let command: RemoteCommand<SignalName>
    try {
      command = await openCommand<SignalName>(this.#opts.pool, entry.sandboxId, {
        line: assembleCommand({ command: spec.command, env: spec.env, workdir: spec.workdir, execId: entry.id }),
        pty: spec.tty ? { cols: spec.cols, rows: spec.rows } : undefined,
        signalTree: { signals: this.#opts.treeSignals, sandboxId: entry.sandboxId, member: entry.id },
        keep: () => {
          if (!registry.keepsExecs(entry.sandboxId)) return undefined
          const meta = this.#keepMeta()
          // The env request carries the whole meta in one SSH packet, which ssh2's server caps
          // near 35,000 bytes: a longer command runs unkept (today's rule 4) rather than not at all.
          if (encodeKeepMeta(meta).length > KEEP_ENV_MAX_BYTES) {
            this.#log.info('command line too long for the keeper meta; running the exec unkept')
            return undefined
          }
          this.#keep()
          return meta
        },
        ...this.#outputSpec()
      }, this.#abort.signal)
    } catch (err) {
      // A relay lost under a kept exec's request may have started it (the daemon keeps it, or
      // does not know it): only the daemon can say which, so ask it as after any other loss.
      if (!this.#kept || this.#abort.signal.aborted || !GatewayError.is(err) || err.code !== 'relay_unavailable') throw err
      this.#log.info({ detail: err.detail }, 'relay lost while a kept exec was starting; reattaching')
      entry.relayLost()
      const reattached = await this.#reattach(err)
      entry.relayRestored()
      this.#onStarted(reattached)
      return reattached
    }
    // abort() may have run while openCommand's answer was on its way here.
    if (this.#abort.signal.aborted) {
      const reason = toGatewayError(this.#abort.signal.reason, this.#log)
      command.abort(reason)
      command.release()
      throw reason
    }
    this.#use(command)
    if (!this.#kept && !spec.interactive && spec.stdin !== undefined) {
      this.#opts.events.execBytes({ stream: 'stdin', bytes: spec.stdin.length })
      command.writeStdin(spec.stdin)
    }
    this.#stdin.start(command)
    if (!spec.interactive) this.#stdin.end()
    this.#onStarted(command)
    return command
  }

  // The exec is to be kept: its stdin, spec bytes and EOF included, goes through the flow from
  // now on, whose ledger can resend what a lost relay took with it.
  #keep (): void {
    if (this.#kept) return
    this.#kept = true
    this.#entry.kept = true
    this.#stdin.keepLedger()
    const spec = this.#entry.spec
    if (spec.interactive) return
    if (spec.stdin !== undefined) {
      this.#opts.events.execBytes({ stream: 'stdin', bytes: spec.stdin.length })
      this.#stdin.write(spec.stdin)
    }
    this.#stdin.end()
  }

  // An exec rebuilt after a restart: nothing of the old gateway's stdin is left to resend, and
  // a non-interactive exec's stdin was to end after its spec's bytes, which only the old
  // gateway had: EOF.
  async #adopt (kept: KeptStatus): Promise<RemoteCommand<SignalName>> {
    this.#kept = true
    this.#entry.kept = true
    this.#stdin.adopt(kept.stdinReceived)
    if (!kept.meta.interactive) this.#stdin.end()
    this.#armTimeout(kept.meta.timeoutSeconds, Date.parse(kept.startedAt))
    return await this.#reattach(undefined)
  }

  #keepMeta (): KeepMeta {
    const entry = this.#entry
    const spec = entry.spec
    return {
      v: KEEPER_PROTOCOL_VERSION,
      execId: entry.id,
      command: spec.command,
      tty: spec.tty,
      interactive: spec.interactive,
      cols: spec.cols,
      rows: spec.rows,
      timeoutSeconds: spec.timeoutSeconds,
      createdAt: entry.createdAt.toISOString()
    }
  }

  #use (command: RemoteCommand<SignalName>): void {
    this.#command = command
    if (this.#entry.flowHeld) command.setPaused(true)
  }

  // Only a relay lost under a kept exec, and not by the run's own doing, is worth a reattach.
  #mayReattach (end: { exit: unknown, failure: GatewayError | undefined }): boolean {
    if (!this.#kept || end.exit !== undefined) return false
    if (this.#abort.signal.aborted || this.#removed || this.#gaveUp || this.#timedOut) return false
    return end.failure?.code === 'relay_unavailable'
  }

  async #reattach (cause: GatewayError | undefined): Promise<RemoteCommand<SignalName>> {
    return await reattach({
      entry: this.#entry,
      pool: this.#opts.pool,
      log: this.#log,
      abort: this.#abort.signal,
      timeoutMs: this.#opts.reattachTimeoutMs ?? DEFAULT_REATTACH_TIMEOUT_MS,
      output: () => this.#outputSpec(),
      attached: (command, status) => this.#attached(command, status)
    }, cause)
  }

  // The new channel is the command's: stdin the daemon did not receive, then the queue, then
  // the signals that waited.
  #attached (command: RemoteCommand<SignalName>, status: KeptStatus): RemoteCommand<SignalName> {
    const refused = this.#stdin.reattach(command, status.stdinReceived, status.stdinEof)
    if (refused !== undefined) {
      const error = new GatewayError('relay_unavailable', `exec ${this.#entry.id} could not be reattached: ${refused}`)
      command.abort(error)
      command.release()
      throw new ReattachFatal(error)
    }
    this.#use(command)
    if (this.#size !== undefined) command.resize(this.#size.cols, this.#size.rows)
    const queued = this.#queuedSignals
    this.#queuedSignals = []
    for (const s of queued) void command.signal(s)
    return command
  }

  // 'paused': stop reading from this writer until onStdinWritable's callback; 'overflow': the
  // bytes were refused (see StdinFlow).
  writeStdin (data: Buffer): StdinWrite {
    if (this.#stdin.ended) return 'accepted'
    const result = this.#stdin.write(data)
    if (result !== 'overflow') {
      this.#opts.events.execBytes({ stream: 'stdin', bytes: data.length })
      this.#entry.stdinBytes += data.length
    }
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
    if (!this.#entry.spec.tty) return
    this.#size = { cols, rows }
    this.#command?.resize(cols, rows)
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
    this.#removed = true
    const command = this.#command
    if (command !== undefined) void this.#killWithinBound(command, 'the exec was deleted and no exit report arrived after the kill')
    else if (this.#kept) this.#abort.abort(new GatewayError('exec_not_found', `exec ${this.#entry.id} was deleted while its relay was being reattached`))
    else this.#abort.abort(new GatewayError('exec_not_found', `exec ${this.#entry.id} was deleted before it started`))
  }

  // Ends the run from outside (shutdown): its outcome is this error unless an exit report is in.
  abort (error: GatewayError): void {
    this.#abort.abort(error)
    this.#command?.abort(error)
  }

  // The command's stdin is already the flow's (start or reattach).
  #onStarted (command: RemoteCommand<SignalName>): void {
    const entry = this.#entry
    entry.markStarted()
    const spec = entry.spec
    for (const s of this.#queuedSignals) void command.signal(s)
    this.#queuedSignals = []
    this.#armTimeout(spec.timeoutSeconds, Date.now())
  }

  // For a kept exec the daemon's own timeout fires first; this is its backstop.
  #armTimeout (timeoutSeconds: number, startedAtMs: number): void {
    if (timeoutSeconds <= 0) return
    const due = timeoutSeconds * 1000 + (this.#kept ? KEPT_TIMEOUT_BACKSTOP_MS : 0) - (Date.now() - startedAtMs)
    this.#timers.arm('timeout', Math.max(0, due), () => {
      this.#timedOut = true
      const command = this.#command
      if (command !== undefined) this.#timeoutKill = this.#killWithinBound(command, 'the command was killed on timeout but no exit report arrived')
      else this.#queuedSignals.push('KILL')
    })
  }

  // KILL, then never wait on its report without a bound. The bound is armed through the run's
  // timers, so a kill answered after the run ended arms nothing.
  async #killWithinBound (command: RemoteCommand<SignalName>, why: string): Promise<boolean> {
    const confirmed = await command.signal('KILL')
    this.#timers.arm('killBound', this.#opts.closeWaitMs + KILL_REPORT_SLACK_MS, () => {
      this.#gaveUp = true
      command.abort(new GatewayError('relay_unavailable', why))
    })
    return confirmed
  }
}
