import type { Logger } from 'pino'
import type { ServerChannel } from 'ssh2'
import type { KeepMeta, KeptStatus } from '../../schemas/keeper.js'
import type { Attachment } from './attachment.js'
import { KeepBudget } from './budget.js'
import { KeptExec } from './kept-exec.js'

export interface KeeperOptions {
  /** --keep-bytes-per-exec: per exec and stream. */
  bytesPerExec: number
  /** --keep-total-bytes: across all execs. */
  totalBytes: number
  /** --keep-finished-s: how long a finished exec stays, with its outcome and tail. */
  finishedS: number
  logger: Logger
}

export interface KeptStart {
  meta: KeepMeta
  command: string
  env: NodeJS.ProcessEnv
  pty: { term: string, cols: number, rows: number } | undefined
  exitDrainMs: number
}

// Under pressure on the total, running execs first give up sent history beyond this per stream:
// about what can be in flight to a gateway (ssh2's 2 MiB window and the attachment's 256 KiB),
// which a reattach after a lost relay may need again. Only if that is not enough does it go too.
const HISTORY_FLOOR_BYTES = 2.5 * 1024 * 1024
// How long TERM gets before KILL when the supervisor stops; within SUPERVISOR_STOP_MS with the
// daemon's own close after it.
const KEPT_TERM_GRACE_MS = 2000

/**
 * The execs one embedded daemon keeps, by exec id: what the keeper protocol's control requests
 * act on. It owns the total bound and each finished exec's retention clock.
 */
export class Keeper {
  readonly #opts: KeeperOptions
  readonly #execs = new Map<string, KeptExec>()
  readonly #budget: KeepBudget
  // Finished execs in the order they finished: the oldest is evicted first.
  readonly #finished = new Map<KeptExec, NodeJS.Timeout | undefined>()
  readonly #finishWaiters = new Set<() => void>()

  constructor (opts: KeeperOptions) {
    this.#opts = opts
    this.#budget = new KeepBudget(opts.totalBytes)
    this.#budget.setReclaim(() => { this.#reclaim() })
  }

  get size (): number { return this.#execs.size }
  get usedBytes (): number { return this.#budget.used }

  has (execId: string): boolean { return this.#execs.has(execId) }

  /** Starts a kept exec with `channel` attached from the start. */
  start (spec: KeptStart, channel: ServerChannel): { exec: KeptExec, attachment: Attachment } {
    const exec = new KeptExec({
      ...spec,
      logger: this.#opts.logger,
      bytesPerStream: this.#opts.bytesPerExec,
      budget: this.#budget,
      onFinal: (e) => { this.#onFinal(e) }
    })
    this.#execs.set(exec.id, exec)
    const attachment = exec.attach(channel, { stdout: 0, stderr: 0 })
    exec.start()
    return { exec, attachment }
  }

  get (execId: string): KeptExec | undefined { return this.#execs.get(execId) }

  list (): KeptStatus[] { return [...this.#execs.values()].map((e) => e.status()) }

  /** Kills a running exec's group and drops it; false when unknown. */
  forget (execId: string): boolean {
    const exec = this.#execs.get(execId)
    if (exec === undefined) return false
    this.#drop(exec)
    return true
  }

  /** Ends every running exec's process group: TERM, then KILL after the grace. */
  async shutdown (graceMs = KEPT_TERM_GRACE_MS): Promise<void> {
    const running = (): KeptExec[] => [...this.#execs.values()].filter((e) => !e.finished)
    if (running().length === 0) return
    for (const e of running()) e.signal('TERM')
    await new Promise<void>((resolve) => {
      const timer = setTimeout(done, graceMs)
      const check = (): void => { if (running().length === 0) done() }
      function done (): void {
        clearTimeout(timer)
        resolve()
      }
      this.#finishWaiters.add(check)
      check()
    })
    this.#finishWaiters.clear()
    for (const e of running()) e.signal('KILL')
  }

  /** Drops everything (the daemon is going away); never signals. */
  close (): void {
    for (const timer of this.#finished.values()) clearTimeout(timer)
    this.#finished.clear()
  }

  #onFinal (exec: KeptExec): void {
    const timer = setTimeout(() => { this.#expire(exec) }, this.#opts.finishedS * 1000)
    timer.unref()
    this.#finished.set(exec, timer)
    for (const w of [...this.#finishWaiters]) w()
  }

  #expire (exec: KeptExec): void {
    if (this.#execs.get(exec.id) !== exec) return
    // An exit report that is still on its way is not cut off; the exec goes once it is detached.
    if (exec.attached) {
      const timer = setTimeout(() => { this.#expire(exec) }, 1000)
      timer.unref()
      this.#finished.set(exec, timer)
      return
    }
    this.#opts.logger.debug({ execId: exec.id }, 'finished kept exec expired')
    this.#drop(exec)
  }

  #drop (exec: KeptExec): void {
    clearTimeout(this.#finished.get(exec))
    this.#finished.delete(exec)
    if (this.#execs.get(exec.id) === exec) this.#execs.delete(exec.id)
    exec.forget()
  }

  // Over the total: finished execs go first, oldest first; then sent history beyond the floor;
  // then all sent history. What is still over is unsent output, and its writers wait.
  #reclaim (): void {
    for (const exec of [...this.#finished.keys()]) {
      if (this.#budget.fits()) return
      this.#opts.logger.info({ execId: exec.id, bytes: exec.keptBytes }, 'evicting a finished kept exec: --keep-total-bytes reached')
      this.#drop(exec)
    }
    for (const floor of [HISTORY_FLOOR_BYTES, 0]) {
      for (const exec of this.#execs.values()) {
        if (this.#budget.fits()) return
        exec.trimHistory(floor)
      }
    }
  }
}
