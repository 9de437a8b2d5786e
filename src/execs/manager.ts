import { randomBytes } from 'node:crypto'
import type { Logger } from 'pino'
import type { ClientChannel } from 'ssh2'
import { GatewayError } from '../errors.js'
import { SshExec } from '../relay/ssh-exec.js'
import { ExecOpenError, type SshConnection } from '../relay/ssh-connection.js'
import type { Lease, SshPool } from '../relay/ssh-pool.js'
import { decideOutcome, type Outcome } from '../relay/outcome.js'
import type { SessionRegistry } from '../relay/sessions.js'
import { assembleCommand, killScript, shellQuote, type SignalName } from './command.js'
import { ExecEntry } from './exec-entry.js'
import { RetentionBudget } from './retention-budget.js'
import { RunTimers } from './run-timers.js'
import { StdinFlow, type StdinWrite } from './stdin-flow.js'
import type { ValidExec } from './validate.js'

// Exec records and their runs: relay → SSH → outcome. Routes call this; it calls the relay core.

export interface ExecManagerOptions {
  registry: SessionRegistry
  pool: SshPool
  logger: Logger
  retentionBytes: number
  // Output retained across all of one sandbox's execs, and across all sandboxes (see
  // RetentionBudget); unbounded when absent.
  retentionBytesPerSandbox?: number
  retentionBytesTotal?: number
  execTtlS: number
  closeWaitMs: number
  maxPendingRelaysPerSandbox: number
  // Pending + running execs one sandbox may have: one tenant's runaway loop must not take the
  // gateway's memory and the sandbox's sshd down for everyone.
  maxRunningExecsPerSandbox?: number
  onEnd?: (entry: ExecEntry) => void
  // Bytes of command output received and of stdin sent, for metrics.
  onBytes?: (stream: 'stdout' | 'stderr' | 'stdin', n: number) => void
}

// Per-run state that outlives no run: cleared in run()'s finally.
interface RunState {
  abort: AbortController
  // Set once the command's channel is open: the command has started.
  ssh: SshExec | undefined
  conn: SshConnection | undefined
  // Queued until the command starts, then the channel's; bounded either way.
  stdin: StdinFlow
  queuedSignals: SignalName[]
  // The run's only timers; disposed in run()'s finally.
  timers: RunTimers
  timedOut: boolean
  // The timeout's kill, read once the channel is done: whether the sandbox confirmed it.
  timeoutKill: Promise<boolean> | undefined
}

const SIDE_CHANNEL_BOUND_MS = 5000
// Longer command lines are staged as a file first (see SshConnection.stage): ssh2's server
// refuses packets over 35,000 bytes, and the exec request carries the whole line.
export const INLINE_COMMAND_MAX_BYTES = 32_000

// The staged script deletes itself, then runs the line; its `exec` replaces the shell as usual,
// so signals and exit statuses are the same as for a line sent inline.
async function stageCommand (conn: SshConnection, line: string): Promise<string> {
  let path: string
  try {
    path = await conn.stage(Buffer.from(`rm -f -- "$0"\n${line}\n`), SIDE_CHANNEL_BOUND_MS)
  } catch (err) {
    // Nothing ran: the exec may try again on another connection.
    throw new ExecOpenError(GatewayError.is(err) ? err : new GatewayError('ssh_failed', String(err)), true)
  }
  return `exec /bin/sh ${shellQuote(path)}`
}

export class ExecManager {
  readonly #opts: ExecManagerOptions
  readonly #execs = new Map<string, ExecEntry>()
  readonly #runs = new Map<ExecEntry, RunState>()
  readonly #sweeper: NodeJS.Timeout
  readonly #budget: RetentionBudget
  #closing = false

  constructor (opts: ExecManagerOptions) {
    this.#opts = opts
    this.#budget = new RetentionBudget({ perSandbox: opts.retentionBytesPerSandbox ?? Infinity, total: opts.retentionBytesTotal ?? Infinity })
    this.#sweeper = setInterval(() => this.sweep(), Math.min(opts.execTtlS * 1000, 60_000))
    this.#sweeper.unref()
  }

  get (id: string): ExecEntry | undefined { return this.#execs.get(id) }

  list (filter: { sandboxId?: string | undefined, status?: string | undefined } = {}): ExecEntry[] {
    return [...this.#execs.values()].filter((e) =>
      (filter.sandboxId === undefined || e.sandboxId === filter.sandboxId) &&
      (filter.status === undefined || e.status === filter.status))
  }

  get size (): number { return this.#execs.size }
  get running (): number { return this.#runs.size }
  // Output bytes held for replays and results, across all execs.
  get retainedBytes (): number { return this.#budget.retained }
  retainedBytesBy (sandboxId: string): number { return this.#budget.retainedBy(sandboxId) }

  create (sandboxId: string, spec: ValidExec): ExecEntry {
    if (this.#closing) throw new GatewayError('shutting_down', 'the gateway is shutting down')
    const registry = this.#opts.registry
    if (registry.get(sandboxId) === undefined) throw new GatewayError('sandbox_not_found', `no sandbox ${sandboxId} has ever connected`)
    if (registry.pendingCount(sandboxId) >= this.#opts.maxPendingRelaysPerSandbox) {
      throw new GatewayError('too_many_requests', `sandbox ${sandboxId} already has ${this.#opts.maxPendingRelaysPerSandbox} relays waiting to be opened`)
    }
    const cap = this.#opts.maxRunningExecsPerSandbox
    if (cap !== undefined && (registry.get(sandboxId)?.activeExecs ?? 0) >= cap) {
      throw new GatewayError('too_many_requests', `sandbox ${sandboxId} already has ${cap} execs running (--max-running-execs-per-sandbox); retry when one ends`)
    }
    const id = 'ex_' + randomBytes(12).toString('base64url').replace(/[-_]/g, 'x')
    const entry = new ExecEntry(id, sandboxId, spec, this.#opts.retentionBytes, this.#budget)
    this.#execs.set(id, entry)
    const state: RunState = {
      abort: new AbortController(),
      ssh: undefined,
      conn: undefined,
      stdin: new StdinFlow(),
      queuedSignals: [],
      timers: new RunTimers(),
      timedOut: false,
      timeoutKill: undefined
    }
    this.#runs.set(entry, state)
    registry.addActive(sandboxId, 1)
    void this.#run(entry, state)
    return entry
  }

  // Resolves when the exec has its outcome.
  async waitForEnd (entry: ExecEntry): Promise<void> {
    if (entry.finished) return
    await new Promise<void>((resolve) => entry.once('end', () => resolve()))
  }

  // 'paused': stop reading from this writer until onStdinWritable's callback; 'overflow': the
  // bytes were refused (see StdinFlow).
  writeStdin (entry: ExecEntry, data: Buffer): StdinWrite {
    const state = this.#runs.get(entry)
    if (state === undefined || state.stdin.ended) return 'accepted'
    const result = state.stdin.write(data)
    if (result !== 'overflow') this.#opts.onBytes?.('stdin', data.length)
    return result
  }

  // Calls resume once, never synchronously, when a writer told 'paused' may write again (also
  // when the run is over); returns the function that cancels it.
  onStdinWritable (entry: ExecEntry, resume: () => void): () => void {
    const state = this.#runs.get(entry)
    if (state !== undefined) return state.stdin.onWritable(resume)
    let cancelled = false
    queueMicrotask(() => { if (!cancelled) resume() })
    return () => { cancelled = true }
  }

  endStdin (entry: ExecEntry): void {
    this.#runs.get(entry)?.stdin.end()
  }

  resize (entry: ExecEntry, cols: number, rows: number): void {
    if (entry.spec.tty) this.#runs.get(entry)?.ssh?.resize(cols, rows)
  }

  signal (entry: ExecEntry, signal: SignalName): void {
    const state = this.#runs.get(entry)
    if (entry.finished || state === undefined) throw new GatewayError('exec_finished', `exec ${entry.id} has already ended`)
    if (state.ssh !== undefined && state.conn !== undefined) void this.#deliverSignal(entry, state.conn, state.ssh, signal)
    else state.queuedSignals.push(signal)
  }

  // DELETE: kill what runs, forget the record at once. The run, and with it the sandbox's slot,
  // ends within a bound even when no exit report ever comes (a wedged daemon, a lost channel).
  remove (entry: ExecEntry): void {
    this.#execs.delete(entry.id)
    entry.discard()
    const state = this.#runs.get(entry)
    if (state === undefined) return
    if (state.ssh !== undefined && state.conn !== undefined) {
      void this.#killWithinBound(entry, state, state.ssh, 'the exec was deleted and no exit report arrived after the kill')
    } else {
      state.abort.abort(new GatewayError('exec_not_found', `exec ${entry.id} was deleted before it started`))
    }
  }

  sweep (now = Date.now()): void {
    const cutoff = now - this.#opts.execTtlS * 1000
    for (const [id, e] of this.#execs) {
      if (e.endedAt !== undefined && e.endedAt.getTime() <= cutoff) {
        this.#execs.delete(id)
        e.discard()
      }
    }
  }

  // Graceful shutdown: no new execs; running ones get graceMs to end, then are cut off with
  // shutting_down. Always resolves.
  async close (graceMs: number): Promise<void> {
    this.#closing = true
    clearInterval(this.#sweeper)
    const running = [...this.#runs.keys()]
    await Promise.race([Promise.all(running.map((e) => this.waitForEnd(e))), sleep(graceMs)])
    const err = new GatewayError('shutting_down', 'the gateway shut down before the command reported an exit status')
    for (const [entry, state] of this.#runs) {
      state.abort.abort(err)
      state.ssh?.abort(err)
      // A run stuck somewhere we cannot reach still ends for its readers.
      entry.finish({ kind: 'failed', error: err })
    }
  }

  async #run (entry: ExecEntry, state: RunState): Promise<void> {
    const o = this.#opts
    const log = o.logger.child({ execId: entry.id, sandboxId: entry.sandboxId })
    const command = assembleCommand({ command: entry.spec.command, env: entry.spec.env, workdir: entry.spec.workdir, execId: entry.id })
    const pty = entry.spec.tty ? { cols: entry.spec.cols, rows: entry.spec.rows } : undefined
    let lease: Lease | undefined
    let outcome: Outcome
    try {
      let ssh: SshExec | undefined
      for (let attempt = 0; ssh === undefined; attempt++) {
        const conn = (lease = await o.pool.acquire(entry.sandboxId, state.abort.signal, attempt > 0)).conn
        try {
          const line = Buffer.byteLength(command) <= INLINE_COMMAND_MAX_BYTES ? command : await stageCommand(conn, command)
          ssh = await conn.openExec(line, pty, (channel: ClientChannel) => new SshExec({
            conn,
            channel,
            closeWaitMs: o.closeWaitMs,
            logger: log,
            onStdout: (b) => { o.onBytes?.('stdout', b.length); entry.append('stdout', b) },
            onStderr: (b) => { o.onBytes?.('stderr', b.length); entry.append('stderr', b) }
          }))
        } catch (err) {
          lease.release()
          lease = undefined
          if (!(err instanceof ExecOpenError)) throw err
          // Only a command that certainly never started may run on another connection.
          if (err.neverStarted && attempt === 0) { log.debug({ detail: err.error.detail }, 'channel refused; retrying on a fresh connection'); continue }
          throw err.error
        }
      }
      if (state.abort.signal.aborted) { ssh.abort(toGatewayError(state.abort.signal.reason, log)); throw state.abort.signal.reason }
      state.ssh = ssh
      state.conn = lease!.conn
      const onFlow = (held: boolean): void => ssh.setPaused(held)
      entry.on('flow', onFlow)
      if (entry.flowHeld) ssh.setPaused(true)
      this.#onStarted(entry, state, ssh)
      const end = await ssh.done
      entry.off('flow', onFlow)
      // The kill's own answer is bounded (SIDE_CHANNEL_BOUND_MS): wait for it rather than read a
      // flag it may not have set yet.
      const killConfirmed = state.timedOut && end.exit === undefined ? await (state.timeoutKill ?? false) : false
      outcome = decideOutcome({
        exit: end.exit,
        timedOut: state.timedOut && (end.exit !== undefined || killConfirmed),
        failure: end.failure
      })
    } catch (err) {
      outcome = { kind: 'failed', error: toGatewayError(err, log) }
    } finally {
      lease?.release()
      state.timers.dispose()
      this.#runs.delete(entry)
      o.registry.addActive(entry.sandboxId, -1)
    }
    if (outcome.kind === 'failed') log.warn({ code: outcome.error.code, detail: outcome.error.detail }, 'exec failed')
    else log.info({ exitCode: outcome.exitCode, signal: outcome.signal, timedOut: outcome.timedOut }, 'exec ended')
    entry.finish(outcome)
    o.onEnd?.(entry)
  }

  #onStarted (entry: ExecEntry, state: RunState, ssh: SshExec): void {
    entry.markStarted()
    const spec = entry.spec
    if (!spec.interactive && spec.stdin !== undefined) { this.#opts.onBytes?.('stdin', spec.stdin.length); ssh.writeStdin(spec.stdin) }
    state.stdin.start(ssh)
    if (!spec.interactive) state.stdin.end()
    for (const s of state.queuedSignals) void this.#deliverSignal(entry, state.conn!, ssh, s)
    state.queuedSignals = []
    if (spec.timeoutSeconds > 0) {
      state.timers.arm('timeout', spec.timeoutSeconds * 1000, () => {
        state.timedOut = true
        state.timeoutKill = this.#killWithinBound(entry, state, ssh, 'the command was killed on timeout but no exit report arrived')
      })
    }
  }

  // KILL, then never wait on its report without a bound. The bound is armed through the run's
  // timers, so a kill answered after the run ended arms nothing.
  async #killWithinBound (entry: ExecEntry, state: RunState, ssh: SshExec, why: string): Promise<boolean> {
    const confirmed = await this.#deliverSignal(entry, state.conn!, ssh, 'KILL')
    state.timers.arm('killBound', this.#opts.closeWaitMs + 2000, () => {
      ssh.abort(new GatewayError('relay_unavailable', why))
    })
    return confirmed
  }

  // True when the sandbox confirmed it signalled the exec's processes.
  async #deliverSignal (entry: ExecEntry, conn: SshConnection, ssh: SshExec, signal: SignalName): Promise<boolean> {
    const code = await conn.runSide(killScript(entry.id, signal), SIDE_CHANNEL_BOUND_MS)
    if (code === 0) return true
    // Nothing carried the tag (no /proc, or the process is already gone): ask sshd itself.
    ssh.signalChannel(signal)
    return false
  }
}

function toGatewayError (err: unknown, log: Logger): GatewayError {
  if (GatewayError.is(err)) return err
  log.error({ err }, 'unexpected error in exec run')
  return new GatewayError('internal', 'unexpected error while running the exec')
}

async function sleep (ms: number): Promise<void> {
  await new Promise<void>((resolve) => { const t = setTimeout(resolve, ms); t.unref() })
}
