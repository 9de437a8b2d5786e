import { randomBytes } from 'node:crypto'
import type { Logger } from 'pino'
import type { GatewayEvents } from '../diagnostics.js'
import { GatewayError } from '../errors.js'
import { closeWithin } from '../lifecycle/close-within.js'
import type { Outcome } from '../relay/outcome.js'
import type { SessionRegistry } from '../relay/sessions.js'
import type { SshPool } from '../relay/ssh-pool.js'
import type { SignalName } from './command.js'
import { ExecEntry } from './exec-entry.js'
import { ExecRun } from './exec-run.js'
import { RetentionBudget } from './retention-budget.js'
import type { StdinWrite } from './stdin-flow.js'
import type { ValidExec } from './validate.js'

// Exec records: admission, their runs, the sweep of finished records, and what all of them hold
// (retained output, each sandbox's slots). Routes call this; each exec's run (ExecRun) asks the
// relay for its command.

export interface ExecManagerOptions {
  registry: SessionRegistry
  pool: SshPool
  logger: Logger
  // Lifecycle events (created, ended, bytes): metrics subscribe to them.
  events: GatewayEvents
  retentionBytes: number
  // Output retained across all of one sandbox's execs, and across all sandboxes (see
  // RetentionBudget); unbounded when absent.
  retentionBytesPerSandbox?: number
  retentionBytesTotal?: number
  execTtlS: number
  closeWaitMs: number
  // Pending + running execs one sandbox may have: one tenant's runaway loop must not take the
  // gateway's memory and the sandbox's sshd down for everyone.
  maxRunningExecsPerSandbox?: number
}

export class ExecManager {
  readonly #opts: ExecManagerOptions
  readonly #execs = new Map<string, ExecEntry>()
  readonly #runs = new Map<ExecEntry, ExecRun>()
  // Per sandbox, the execs whose run has not ended (pending or running): its slots in use.
  readonly #active = new Map<string, number>()
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
  // Execs of this sandbox whose run has not ended (pending or running).
  activeIn (sandboxId: string): number { return this.#active.get(sandboxId) ?? 0 }
  // Output bytes held for replays and results, across all execs.
  get retainedBytes (): number { return this.#budget.retained }
  retainedBytesBy (sandboxId: string): number { return this.#budget.retainedBy(sandboxId) }

  create (sandboxId: string, spec: ValidExec): ExecEntry {
    if (this.#closing) throw new GatewayError('shutting_down', 'the gateway is shutting down')
    const o = this.#opts
    if (o.registry.get(sandboxId) === undefined) throw new GatewayError('sandbox_not_found', `no sandbox ${sandboxId} has ever connected`)
    // The relay layer's cap, asked at the door too: a sandbox at it is a plain 429, no record.
    o.registry.assertRelayRoom(sandboxId)
    const cap = o.maxRunningExecsPerSandbox
    if (cap !== undefined && this.activeIn(sandboxId) >= cap) {
      throw new GatewayError('too_many_requests', `sandbox ${sandboxId} already has ${cap} execs running (--max-running-execs-per-sandbox); retry when one ends`)
    }
    const id = 'ex_' + randomBytes(12).toString('base64url').replace(/[-_]/g, 'x')
    const entry = new ExecEntry(id, sandboxId, spec, o.retentionBytes, this.#budget)
    this.#execs.set(id, entry)
    const run = new ExecRun(entry, { pool: o.pool, closeWaitMs: o.closeWaitMs, logger: o.logger, events: o.events })
    this.#runs.set(entry, run)
    this.#addActive(sandboxId, 1)
    o.events.execCreated({ execId: id, sandboxId })
    void run.run().then((outcome) => this.#ended(entry, outcome))
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
    return this.#runs.get(entry)?.writeStdin(data) ?? 'accepted'
  }

  // Calls resume once, never synchronously, when a writer told 'paused' may write again (also
  // when the run is over); returns the function that cancels it.
  onStdinWritable (entry: ExecEntry, resume: () => void): () => void {
    const run = this.#runs.get(entry)
    if (run !== undefined) return run.onStdinWritable(resume)
    let cancelled = false
    queueMicrotask(() => { if (!cancelled) resume() })
    return () => { cancelled = true }
  }

  endStdin (entry: ExecEntry): void {
    this.#runs.get(entry)?.endStdin()
  }

  resize (entry: ExecEntry, cols: number, rows: number): void {
    this.#runs.get(entry)?.resize(cols, rows)
  }

  signal (entry: ExecEntry, signal: SignalName): void {
    const run = this.#runs.get(entry)
    if (entry.finished || run === undefined) throw new GatewayError('exec_finished', `exec ${entry.id} has already ended`)
    run.signal(signal)
  }

  // DELETE: kill what runs, forget the record at once. The run, and with it the sandbox's slot,
  // ends within a bound even when no exit report ever comes (see ExecRun.remove).
  remove (entry: ExecEntry): void {
    this.#execs.delete(entry.id)
    entry.discard()
    this.#runs.get(entry)?.remove()
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
    const err = new GatewayError('shutting_down', 'the gateway shut down before the command reported an exit status')
    const cutOff = (): void => {
      for (const [entry, run] of this.#runs) {
        run.abort(err)
        // A run stuck somewhere we cannot reach still ends for its readers.
        entry.finish({ kind: 'failed', error: err })
      }
    }
    // Even when every exec ended in the grace, a run that has not wound down yet is cut off.
    if (await closeWithin(graceMs, async () => await Promise.all(running.map((e) => this.waitForEnd(e))), cutOff) === 'polite') cutOff()
  }

  // The slot is free before the end is told: whoever it wakes sees the sandbox without this exec.
  #ended (entry: ExecEntry, outcome: Outcome): void {
    this.#runs.delete(entry)
    this.#addActive(entry.sandboxId, -1)
    entry.finish(outcome)
    const error = entry.error
    this.#opts.events.execEnded({ execId: entry.id, sandboxId: entry.sandboxId, status: error === undefined ? 'exited' : 'failed', code: error?.code })
  }

  #addActive (sandboxId: string, delta: number): void {
    const n = this.activeIn(sandboxId) + delta
    if (n > 0) this.#active.set(sandboxId, n)
    else this.#active.delete(sandboxId)
  }
}
