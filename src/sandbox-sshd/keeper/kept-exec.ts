import { PassThrough, Writable } from 'node:stream'
import type { Logger } from 'pino'
import type { ServerChannel } from 'ssh2'
import { TIMEOUT_EXIT_MESSAGE, type KeepMeta, type KeptStatus } from '../../schemas/keeper.js'
import type { ExitOutcome } from '../exit-report.js'
import { ExecRun } from '../exec-run.js'
import { PtyRun } from '../pty-run.js'
import type { RunIo } from '../run-io.js'
import { Attachment, type AttachSource, type Offsets, type StreamName } from './attachment.js'
import type { KeepBudget } from './budget.js'
import { Spool } from './spool.js'

export interface KeptExecOptions {
  meta: KeepMeta
  command: string
  env: NodeJS.ProcessEnv
  pty: { term: string, cols: number, rows: number } | undefined
  exitDrainMs: number
  logger: Logger
  /** --keep-bytes-per-exec: what one stream may keep (unsent output and sent history). */
  bytesPerStream: number
  budget: KeepBudget
  /** The output is final and the outcome known (the keeper starts the retention clock). */
  onFinal: (exec: KeptExec) => void
}

// What the command's side of stdin buffers before the channel is paused (and its window shut).
const STDIN_HIGH_WATER_BYTES = 64 * 1024
// What a stream's writer buffers before the run's pump pauses the pipe.
const SINK_HIGH_WATER_BYTES = 64 * 1024
// A stream stops taking output once this share of its bound is unsent, so at least the rest is
// history. A gateway that dies loses what it had taken and its readers had not: its journal
// beyond them, and the kernel buffers of their sockets, several MiB on a fast link. A quarter
// keeps 6 MiB of history at the default bound.
const UNSENT_SHARE = 4

/**
 * An exec the daemon keeps, whatever becomes of the channel that started it: the run writes into
 * two spools instead of a channel, and whichever channel is attached is fed from them. Output
 * that no channel has taken is never dropped: while a stream holds a quarter of its bound unsent (or
 * the daemon's total is used up), its writer waits and the run stops reading the command's pipe,
 * so the command blocks. Output already handed to a channel stays as history up to the bound,
 * so a reattach from the offsets the gateway actually received replays what was in flight.
 */
export class KeptExec implements RunIo, AttachSource {
  readonly meta: KeepMeta
  readonly startedAt = new Date().toISOString()
  readonly stdout: Writable
  readonly stderr: Writable
  readonly input = new PassThrough({ highWaterMark: STDIN_HIGH_WATER_BYTES })
  readonly #opts: KeptExecOptions
  readonly #log: Logger
  readonly #spools: Record<StreamName, Spool> = { stdout: new Spool(), stderr: new Spool() }
  // What was handed to the attached channel, or to the last one while none is.
  #sentUpTo: Offsets = { stdout: 0, stderr: 0 }
  readonly #held: Partial<Record<StreamName, () => void>> = {}
  #seq = 0
  #run: ExecRun | PtyRun | undefined
  #att: Attachment | undefined
  #outcome: ExitOutcome | undefined
  #endedAt: string | undefined
  #timedOut = false
  #timeout: NodeJS.Timeout | undefined
  #stdinReceived = 0
  #stdinEof = false
  #forgotten = false

  constructor (opts: KeptExecOptions) {
    this.meta = opts.meta
    this.#opts = opts
    this.#log = opts.logger.child({ execId: opts.meta.execId })
    this.stdout = this.#sink('stdout')
    this.stderr = this.#sink('stderr')
    this.input.on('drain', () => { this.#att?.resumeInput() })
  }

  get id (): string { return this.meta.execId }
  get finished (): boolean { return this.#outcome !== undefined }
  get attached (): boolean { return this.#att !== undefined }
  get keptBytes (): number { return this.#spools.stdout.keptBytes + this.#spools.stderr.keptBytes }

  start (): void {
    const o = this.#opts
    const runOpts = { command: o.command, env: o.env, exitDrainMs: o.exitDrainMs, logger: this.#log, onFinish: () => {} }
    this.#run = o.pty === undefined ? new ExecRun(this, runOpts) : new PtyRun(this, { ...runOpts, ...o.pty })
    if (this.meta.timeoutSeconds > 0) {
      // The daemon's own clock: it fires whether or not a gateway is connected.
      this.#timeout = setTimeout(() => {
        this.#timeout = undefined
        if (this.finished) return
        this.#log.info({ timeoutSeconds: this.meta.timeoutSeconds }, 'kept exec timed out; killing its process group')
        this.#timedOut = true
        this.#run?.signal('KILL')
      }, this.meta.timeoutSeconds * 1000)
    }
    this.#run.start()
  }

  /** A channel becomes this exec's: replay from the offsets (clamped to what is kept), then live. */
  attach (channel: ServerChannel, from: Offsets): Attachment {
    const clamp = (stream: StreamName): number => {
      const s = this.#spools[stream]
      return Math.min(Math.max(from[stream], s.base), s.end)
    }
    const att = new Attachment(channel, { stdout: clamp('stdout'), stderr: clamp('stderr') }, this, (err) => {
      this.#log.debug({ err }, 'kept exec channel error')
    })
    const old = this.#att
    this.#att = att
    this.#sentUpTo = att.sentUpTo
    old?.close()
    att.pump()
    this.#releaseHeld()
    return att
  }

  /** Cuts the attached channel off: from now on stdinReceived stays as it is until the next attach. */
  detach (): void {
    const att = this.#att
    this.#att = undefined
    att?.close()
  }

  isAttached (channel: ServerChannel): boolean { return this.#att?.channel === channel }

  signal (name: string): void {
    if (!this.finished) this.#run?.signal(name)
  }

  resize (cols: number, rows: number): void {
    if (this.#run instanceof PtyRun) this.#run.resize(cols, rows)
  }

  /** Kills the group if it still runs and drops everything; the keeper forgets the exec. */
  forget (): void {
    if (this.#forgotten) return
    this.#forgotten = true
    clearTimeout(this.#timeout)
    this.#timeout = undefined
    this.detach()
    if (!this.finished) this.#run?.signal('KILL')
    this.#run?.abort('forgotten')
    this.#opts.budget.unwait(this)
    this.#opts.budget.free(this.#spools.stdout.clear() + this.#spools.stderr.clear())
    // Whatever the run's writers still wait for will never be kept; let them finish.
    this.#releaseHeld(true)
  }

  status (): KeptStatus {
    const outcome = this.#outcome
    return {
      meta: this.meta,
      state: outcome === undefined ? 'running' : 'exited',
      startedAt: this.startedAt,
      ...(this.#endedAt === undefined ? {} : { endedAt: this.#endedAt }),
      ...(outcome === undefined ? {} : { exit: outcome }),
      timedOut: this.#timedOut,
      stdout: { base: this.#spools.stdout.base, end: this.#spools.stdout.end },
      stderr: { base: this.#spools.stderr.base, end: this.#spools.stderr.end },
      stdinReceived: this.#stdinReceived,
      stdinEof: this.#stdinEof,
      attached: this.#att !== undefined
    }
  }

  /** Gives up sent history beyond `floor` bytes per stream (the keeper is short of room). */
  trimHistory (floor: number): void {
    let freed = 0
    for (const stream of ['stdout', 'stderr'] as const) {
      const spool = this.#spools[stream]
      const upTo = this.#sentUpTo[stream]
      freed += spool.trim(spool.end - upTo + floor, upTo)
    }
    this.#opts.budget.free(freed)
  }

  // RunIo: the run's side.

  flush (then: () => void): void {
    let pending = 2
    const done = (): void => { if (--pending === 0) then() }
    this.stdout.write(Buffer.alloc(0), done)
    this.stderr.write(Buffer.alloc(0), done)
  }

  report (outcome: ExitOutcome): void {
    if (this.#outcome !== undefined) return
    this.#outcome = outcome
    this.#endedAt = new Date().toISOString()
    clearTimeout(this.#timeout)
    this.#timeout = undefined
    this.#log.debug({ ...outcome, timedOut: this.#timedOut }, 'kept exec ended')
    this.#att?.pump()
    this.#opts.onFinal(this)
  }

  // A kept run is never abandoned by a client; only forget() or the daemon's shutdown end it.
  onGone (): void {}

  release (): void { this.input.resume() }

  // AttachSource: the attached channel's side.

  next (from: Offsets): { stream: StreamName, data: Buffer } | undefined {
    const out = this.#spools.stdout.pieceAt(from.stdout)
    const err = this.#spools.stderr.pieceAt(from.stderr)
    if (out === undefined && err === undefined) return undefined
    if (err === undefined || (out !== undefined && out.seq < err.seq)) return { stream: 'stdout', data: out!.data }
    return { stream: 'stderr', data: err.data }
  }

  final (): { outcome: ExitOutcome, message: string } | undefined {
    const outcome = this.#outcome
    if (outcome === undefined) return undefined
    return { outcome, message: this.#timedOut && 'signal' in outcome ? TIMEOUT_EXIT_MESSAGE : '' }
  }

  sent (): void {
    let freed = 0
    for (const stream of ['stdout', 'stderr'] as const) {
      freed += this.#spools[stream].trim(this.#opts.bytesPerStream, this.#sentUpTo[stream])
    }
    this.#opts.budget.free(freed)
    this.#releaseHeld()
  }

  takeInput (chunk: Buffer): boolean {
    if (this.#stdinEof) return true
    this.#stdinReceived += chunk.length
    return this.input.write(chunk)
  }

  endInput (): void {
    if (this.#stdinEof) return
    this.#stdinEof = true
    this.input.end()
  }

  gone (att: Attachment): void {
    if (this.#att === att) this.#att = undefined
  }

  // The budget woke us: there may be room again.
  retry (): void { this.#releaseHeld() }

  #sink (stream: StreamName): Writable {
    return new Writable({
      highWaterMark: SINK_HIGH_WATER_BYTES,
      write: (chunk: Buffer, _encoding, done) => {
        if (this.#forgotten) { done(); return }
        if (chunk.length > 0) {
          const spool = this.#spools[stream]
          spool.append(this.#seq++, chunk)
          this.#opts.budget.add(chunk.length)
          this.#opts.budget.free(spool.trim(this.#opts.bytesPerStream, this.#sentUpTo[stream]))
          this.#att?.pump()
        }
        this.#held[stream] = done
        this.#releaseHeld()
      }
    })
  }

  #mayTake (stream: StreamName): boolean {
    const unsent = this.#spools[stream].end - this.#sentUpTo[stream]
    return unsent < this.#opts.bytesPerStream / UNSENT_SHARE && this.#opts.budget.fits()
  }

  #releaseHeld (force = false): void {
    for (const stream of ['stdout', 'stderr'] as const) {
      const done = this.#held[stream]
      if (done === undefined) continue
      if (!force && !this.#mayTake(stream)) {
        this.#opts.budget.wait(this)
        continue
      }
      this.#held[stream] = undefined
      done()
    }
  }
}
