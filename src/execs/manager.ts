import { randomBytes } from 'node:crypto'
import { EventEmitter } from 'node:events'
import { GatewayError } from '../errors.js'
import { closeWithin } from '../lifecycle/close-within.js'
import { forgetKept, listKept } from '../relay/keeper-client.js'
import type { Outcome } from '../relay/outcome.js'
import { SIDE_CHANNEL_BOUND_MS } from '../relay/remote-command.js'
import { TreeSignals } from '../relay/tree-signals.js'
import type { KeptStatus } from '../schemas/keeper.js'
import { killScript, type SignalName } from './command.js'
import { ExecEntry } from './exec-entry.js'
import { ExecRun } from './exec-run.js'
import { keptEntry, validDate } from './kept-entry.js'
import type { ExecManagerOptions } from './manager-options.js'
import { RetentionBudget } from './retention-budget.js'
import type { StdinWrite } from './stdin-flow.js'
import type { ValidExec } from './validate.js'

// Exec records: admission, their runs, the sweep of finished records, and what all of them hold
// (retained output, each sandbox's slots). Routes call this; each exec's run (ExecRun) asks the
// relay for its command.

// A list is a few round trips; a sandbox that cannot answer in this long is asked again, a
// few times, then left alone (its execs stay unknown and answer 404).
const LIST_BOUND_MS = 10_000
const LIST_ATTEMPTS = 3
const LIST_RETRY_DELAY_MS = 1000
// How long a rebuilt finished exec may take to replay its tail and exit before it is shown anyway.
const FINISHED_REPLAY_BOUND_MS = 10_000
const FORGET_BOUND_MS = 5000
// A mass DELETE arrives as many requests within milliseconds of each other; the first kill of
// a batch waits this long for the others, so that they share one scan of the sandbox's /proc.
const KILL_BATCH_WINDOW_MS = 5
// Exec ids per scan (each a line on the script's stdin); beyond it the next batch.
const KILL_BATCH_MAX = 4096

export class ExecManager {
  readonly #opts: ExecManagerOptions
  readonly #execs = new Map<string, ExecEntry>()
  readonly #runs = new Map<ExecEntry, ExecRun>()
  // Per sandbox, the execs whose run has not ended (pending or running): its slots in use.
  readonly #active = new Map<string, number>()
  readonly #sweeper: NodeJS.Timeout
  readonly #budget: RetentionBudget
  // Until then, an unknown id may still be reported by a supervisor that has not connected yet.
  readonly #lookupUntil: number
  // Rebuilt execs, with when their daemon said they ended (finish() would stamp now).
  readonly #adoptedEnds = new Map<ExecEntry, string | undefined>()
  readonly #adoptions = new AbortController()
  // Runs aborted because their sandbox moved to another replica: their entries never end here.
  readonly #movingAway = new Set<ExecEntry>()
  // The process scans of execs whose daemon does not keep them: one per batch of signals.
  readonly #treeSignals = new TreeSignals({ script: (signal) => killScript(signal as SignalName), boundMs: SIDE_CHANNEL_BOUND_MS, windowMs: KILL_BATCH_WINDOW_MS, maxBatch: KILL_BATCH_MAX })
  #closing = false

  constructor (opts: ExecManagerOptions) {
    this.#opts = opts
    this.#budget = new RetentionBudget({ perSandbox: opts.retentionBytesPerSandbox ?? Infinity, total: opts.retentionBytesTotal ?? Infinity })
    this.#sweeper = setInterval(() => this.sweep(), Math.min(opts.execTtlS * 1000, 60_000))
    this.#sweeper.unref()
    this.#lookupUntil = Date.now() + (opts.sessionWaitMs ?? 0)
    opts.registry.onRegistered((sandboxId, info) => {
      if (info.keepsExecs && !this.#closing) void this.#adoptFrom(sandboxId)
    })
  }

  get (id: string): ExecEntry | undefined { return this.#execs.get(id) }

  // get(), and also a rebuilt finished exec whose replay is not over yet (not listed, but its
  // end is coming here).
  held (id: string): ExecEntry | undefined {
    const known = this.#execs.get(id)
    if (known !== undefined || !this.#replaying.has(id)) return known
    for (const entry of this.#runs.keys()) if (entry.id === id) return entry
    return undefined
  }

  // get(), but right after the gateway starts an id it does not know yet may be one a
  // supervisor is about to report: wait for it, or for the window to end.
  async lookup (id: string): Promise<ExecEntry | undefined> {
    const known = this.#execs.get(id)
    if (known !== undefined) return known
    // A finished exec being rebuilt here shows once its replay has delivered its end (show()
    // runs by FINISHED_REPLAY_BOUND_MS at the latest): until then it is no other replica's.
    const replaying = this.#replaying.has(id)
    const left = replaying ? FINISHED_REPLAY_BOUND_MS : this.#lookupUntil - Date.now()
    if (left > 0) {
      await new Promise<void>((resolve) => {
        const done = (): void => {
          clearTimeout(timer)
          this.#adopted.off(id, done)
          resolve()
        }
        const timer = setTimeout(done, left)
        this.#adopted.once(id, done)
      })
    }
    // Not reported here: cluster mode asks the directory (an exec another replica finished, or
    // one whose replica is gone).
    return this.#execs.get(id) ?? await this.#opts.remoteLookup?.(id)
  }

  readonly #adopted = new EventEmitter().setMaxListeners(0)
  // Finished execs rebuilt but not shown yet (their tail and exit are being replayed).
  readonly #replaying = new Set<string>()

  // What a (re)connected supervisor's daemon keeps: every exec this gateway does not know is
  // rebuilt and its run attaches to it. Known ids are left alone; their runs reattach by themselves.
  async #adoptFrom (sandboxId: string): Promise<void> {
    const o = this.#opts
    const list = o.listKept ?? (async (id: string, signal: AbortSignal) => await listKept(o.pool, id, signal))
    await o.beforeAdopt?.(sandboxId)
    for (let attempt = 1; attempt <= LIST_ATTEMPTS; attempt++) {
      try {
        const signal = AbortSignal.any([this.#adoptions.signal, AbortSignal.timeout(LIST_BOUND_MS)])
        const kept = await list(sandboxId, signal)
        const settled = await o.settled?.(kept.map((status) => status.meta.execId)) ?? new Set<string>()
        for (const status of kept) if (settled.has(status.meta.execId) && status.state === 'running') this.#stopSettled(sandboxId, status.meta.execId)
        const adopted = kept.filter((status) => !settled.has(status.meta.execId) && this.#adopt(sandboxId, status))
        await o.afterAdopt?.(sandboxId, adopted.map((s) => s.meta.execId))
        return
      } catch (err) {
        if (this.#closing) return
        o.logger.warn({ sandboxId, attempt, err: (err as Error).message }, 'could not list the execs the sandbox keeps')
        if (attempt < LIST_ATTEMPTS) await new Promise((resolve) => setTimeout(resolve, LIST_RETRY_DELAY_MS).unref())
      }
    }
  }

  // Its clients were told it ended: the command still running in the sandbox is killed.
  #stopSettled (sandboxId: string, execId: string): void {
    this.#opts.logger.warn({ sandboxId, execId }, 'the sandbox still runs an exec the cluster has already ended; it is stopped, not rebuilt')
    this.#forgetInSandbox(sandboxId, execId, 'could not stop an exec the cluster has already ended')
  }

  // False when the exec is known here already (its run reattaches by itself).
  #adopt (sandboxId: string, status: KeptStatus): boolean {
    const meta = status.meta
    if (this.#closing || this.#execs.has(meta.execId) || this.#replaying.has(meta.execId)) return false
    const o = this.#opts
    const entry = keptEntry(sandboxId, status, o.retentionBytes, this.#budget)
    this.#adoptedEnds.set(entry, status.endedAt)
    // Finished ones too: the attach replays the tail and delivers the exit report, so their
    // outcome comes the normal way. Until it has, such a record would say `running` with no
    // bytes; it is shown once it has ended (or, should the replay stall, after a bound).
    this.#start(entry, status)
    o.logger.info({ execId: entry.id, sandboxId, state: status.state }, 'exec rebuilt from what the sandbox keeps')
    const show = (): void => {
      clearTimeout(timer)
      entry.off('end', show)
      this.#replaying.delete(entry.id)
      if (this.#execs.has(entry.id)) return
      this.#execs.set(entry.id, entry)
      this.#adopted.emit(entry.id)
    }
    let timer: NodeJS.Timeout | undefined
    if (status.state === 'exited' && !entry.finished) {
      this.#replaying.add(entry.id)
      timer = setTimeout(show, FINISHED_REPLAY_BOUND_MS)
      timer.unref()
      entry.once('end', show)
    } else {
      show()
    }
    return true
  }

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
    // No relay check here: an exec waits in the pool's queue for a connection (see SshPool),
    // and only the running-exec cap refuses.
    const cap = o.maxRunningExecsPerSandbox
    if (cap !== undefined && this.activeIn(sandboxId) >= cap) {
      throw new GatewayError('too_many_requests', `sandbox ${sandboxId} already has ${cap} execs running (--max-running-execs-per-sandbox); retry when one ends`)
    }
    const id = 'ex_' + randomBytes(12).toString('base64url').replace(/[-_]/g, 'x')
    const entry = new ExecEntry(id, sandboxId, spec, o.retentionBytes, this.#budget)
    this.#execs.set(id, entry)
    this.#start(entry, undefined)
    return entry
  }

  #start (entry: ExecEntry, adopt: KeptStatus | undefined): void {
    const o = this.#opts
    const run = new ExecRun(entry, { pool: o.pool, treeSignals: this.#treeSignals, closeWaitMs: o.closeWaitMs, logger: o.logger, events: o.events, reattachTimeoutMs: o.reattachTimeoutMs, adopt })
    this.#runs.set(entry, run)
    this.#addActive(entry.sandboxId, 1)
    o.events.execCreated({ execId: entry.id, sandboxId: entry.sandboxId })
    void run.run().then((outcome) => this.#ended(entry, outcome))
  }

  // Resolves when the exec has its outcome, or has moved to another replica (movedAway).
  async waitForEnd (entry: ExecEntry): Promise<void> {
    if (entry.finished || entry.movedAway) return
    await new Promise<void>((resolve) => {
      const done = (): void => {
        entry.off('end', done)
        entry.off('moved', done)
        resolve()
      }
      entry.once('end', done)
      entry.once('moved', done)
    })
  }

  // The kept execs of this sandbox whose runs are here (cluster mode hands them over).
  keptIn (sandboxId: string): string[] {
    const out: string[] = []
    for (const [entry, run] of this.#runs) if (entry.sandboxId === sandboxId && run.kept && !this.#movingAway.has(entry)) out.push(entry.id)
    return out
  }

  // Cluster mode: another replica holds the sandbox's session now, and rebuilds its kept execs
  // from the daemon. Their runs here stop without an outcome (the daemon goes on; the new owner
  // reports the true end) and their records go; readers are told to reconnect. Execs the daemon
  // does not keep are left to end as their relay does. Returns the ids of those that moved.
  handOver (sandboxId: string, only?: ReadonlySet<string>): string[] {
    const moved: string[] = []
    for (const [entry, run] of this.#runs) {
      if (entry.sandboxId !== sandboxId || !run.kept || this.#movingAway.has(entry)) continue
      if (only !== undefined && !only.has(entry.id)) continue
      this.#movingAway.add(entry)
      run.abort(new GatewayError('relay_unavailable', `the sandbox ${sandboxId} moved to another replica`))
      moved.push(entry.id)
    }
    return moved
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
    const run = this.#runs.get(entry)
    run?.remove()
    // The daemon's forget detaches the exec's channel: asked before the kill's exit report is
    // in, it would turn that report into a lost relay. The run ends within its kill bound, and
    // its connection slot, free then, carries the forget.
    if (run === undefined) this.#forget(entry)
    else void this.waitForEnd(entry).then(() => { this.#forget(entry) })
    this.#opts.forgetRemote?.(entry.id)
  }

  // So that a restarted gateway does not rebuild it. Best effort: a daemon that cannot be asked
  // drops the record itself after --keep-finished-s.
  #forget (entry: ExecEntry): void {
    if (this.#opts.forgetKept === undefined && !this.#opts.registry.keepsExecs(entry.sandboxId)) return
    this.#forgetInSandbox(entry.sandboxId, entry.id, 'could not ask the sandbox to forget a deleted exec')
  }

  // The daemon kills the exec if it runs and drops it; bounded, and only logged when it fails.
  #forgetInSandbox (sandboxId: string, execId: string, failure: string): void {
    const o = this.#opts
    const forget = o.forgetKept ?? (async (id: string, exec: string, signal: AbortSignal) => await forgetKept(o.pool, id, exec, signal))
    forget(sandboxId, execId, AbortSignal.timeout(FORGET_BOUND_MS)).catch((err: Error) => {
      o.logger.warn({ execId, sandboxId, err: err.message }, failure)
    })
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
    this.#adoptions.abort()
    clearInterval(this.#sweeper)
    if (this.#opts.handOffKeptOnClose === true) {
      for (const [entry, run] of this.#runs) {
        if (!run.kept || this.#movingAway.has(entry)) continue
        this.#movingAway.add(entry)
        run.abort(new GatewayError('relay_unavailable', 'this replica shut down; the exec goes on in its sandbox'))
      }
    }
    const running = [...this.#runs.keys()]
    const err = new GatewayError('shutting_down', 'the gateway shut down before the command reported an exit status')
    const cutOff = (): void => {
      for (const [entry, run] of this.#runs) {
        run.abort(err)
        // A run stuck somewhere we cannot reach still ends for its readers.
        if (this.#movingAway.has(entry)) entry.moveAway()
        else entry.finish({ kind: 'failed', error: err })
      }
    }
    // Even when every exec ended in the grace, a run that has not wound down yet is cut off.
    if (await closeWithin(graceMs, async () => await Promise.all(running.map((e) => this.waitForEnd(e))), cutOff) === 'polite') cutOff()
    this.#treeSignals.close()
  }

  // The slot is free before the end is told: whoever it wakes sees the sandbox without this exec.
  #ended (entry: ExecEntry, outcome: Outcome): void {
    this.#runs.delete(entry)
    this.#addActive(entry.sandboxId, -1)
    if (this.#movingAway.delete(entry)) {
      if (this.#execs.get(entry.id) === entry) this.#execs.delete(entry.id)
      entry.moveAway()
      this.#opts.logger.info({ execId: entry.id, sandboxId: entry.sandboxId }, 'exec moved to another replica with its sandbox')
      return
    }
    entry.finish(outcome)
    if (this.#adoptedEnds.has(entry)) {
      entry.endedAt = validDate(this.#adoptedEnds.get(entry)) ?? entry.endedAt
      this.#adoptedEnds.delete(entry)
    }
    const error = entry.error
    this.#opts.events.execEnded({ execId: entry.id, sandboxId: entry.sandboxId, status: error === undefined ? 'exited' : 'failed', code: error?.code })
  }

  #addActive (sandboxId: string, delta: number): void {
    const n = this.activeIn(sandboxId) + delta
    if (n > 0) this.#active.set(sandboxId, n)
    else this.#active.delete(sandboxId)
  }
}
