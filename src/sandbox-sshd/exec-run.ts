import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process'
import { homedir } from 'node:os'
import type { Logger } from 'pino'
import { exitOutcome, type ExitOutcome } from './exit-report.js'
import { OutputPump } from './output-pump.js'
import type { RunIo } from './run-io.js'
import { signalProcessGroup, spawnFailureMessage, type Run, type RunOptions } from './run.js'

// After the child exits its pipes may still hold its last output (up to one pipe buffer, 64 KiB
// by default, 1 MiB at most without root, plus our stream's read buffer). While a pump is paused
// because the client is slow, that tail may be unread: the exitDrainMs bound is for background
// grandchildren, not for slow clients, so the deadline is deferred until the channel drains. Once
// a pump has read more than this since the exit, the rest is a grandchild's and is not waited for.
const CHILD_TAIL_BYTES = 2 * 1024 * 1024

/**
 * One `exec` request: `/bin/sh -c <command>` in its own process group, wired to its io (the
 * channel, or a kept exec's spools). Every terminal path (report sent, spawn failure, client
 * gone) ends in #finish, which runs once. The child is never killed by this class: like OpenSSH,
 * a client that goes away leaves the command running with its stdin closed and its output pipes
 * gone.
 */
export class ExecRun implements Run {
  readonly #io: RunIo
  readonly #opts: RunOptions
  readonly #log: Logger
  #child: ChildProcessWithoutNullStreams | undefined
  #pumps: OutputPump[] = []
  #outcome: ExitOutcome | undefined
  #drainTimer: NodeJS.Timeout | undefined
  #waitingForClient = false
  #reporting = false
  #finished = false

  constructor (io: RunIo, opts: RunOptions) {
    this.#io = io
    this.#opts = opts
    this.#log = opts.logger
  }

  start (): void {
    const io = this.#io
    io.onGone(() => { this.abort('channel closed') })

    let child: ChildProcessWithoutNullStreams
    try {
      child = spawn('/bin/sh', ['-c', this.#opts.command], {
        cwd: homedir(),
        env: this.#opts.env,
        // Own process group (sh is its leader, pgid = pid) so a signal request reaches the
        // whole tree, background jobs included.
        detached: true,
        stdio: 'pipe'
      })
    } catch (err) {
      // Synchronous failures: invalid arguments such as a NUL byte in the command or env.
      this.#failSpawn(err)
      return
    }
    this.#child = child
    const onPipeError = (err: Error): void => { this.#log.debug({ err }, 'child pipe error') }
    child.stdout.on('error', onPipeError)
    child.stderr.on('error', onPipeError)
    child.on('error', (err) => {
      if (child.pid === undefined) this.#failSpawn(err)
      else this.#log.warn({ err }, 'child process error')
    })
    if (child.pid === undefined) return // the 'error' event follows on the next tick
    this.#log.debug({ pid: child.pid }, 'exec started')

    child.stdin.on('error', (err: NodeJS.ErrnoException) => {
      // The command need not read its stdin; EPIPE just means it closed it or exited.
      if (err.code !== 'EPIPE' && err.code !== 'ECONNRESET') this.#log.debug({ err }, 'child stdin error')
      // Keep accepting the client's input (and dropping it) so it is never stuck on a full window.
      io.input.unpipe(child.stdin)
      io.input.resume()
    })
    // pipe() also ends the child's stdin when the client sends EOF.
    io.input.pipe(child.stdin)

    const onChange = (): void => { this.#onPumpChange() }
    this.#pumps = [
      new OutputPump(child.stdout, io.stdout, onChange),
      new OutputPump(child.stderr, io.stderr, onChange)
    ]
    // 'exit', not 'close': 'close' waits for the pipes, which a background grandchild can hold
    // open for as long as it lives.
    child.once('exit', (code, signal) => { this.#onExit(code, signal) })
  }

  signal (name: string): void {
    const pid = this.#child?.pid
    if (pid === undefined || this.#finished) return
    signalProcessGroup(pid, name, this.#log)
  }

  abort (reason: string): void {
    if (this.#finished) return
    this.#log.debug({ reason, pid: this.#child?.pid }, 'exec abandoned by client')
    this.#finish()
  }

  #onExit (code: number | null, signal: NodeJS.Signals | null): void {
    this.#outcome = exitOutcome(code, signal)
    this.#log.debug({ pid: this.#child?.pid, ...this.#outcome }, 'exec exited')
    if (this.#finished) return
    for (const pump of this.#pumps) pump.markChildExited()
    this.#armDrainTimer()
    this.#onPumpChange()
  }

  #armDrainTimer (): void {
    clearTimeout(this.#drainTimer)
    this.#drainTimer = setTimeout(() => { this.#onDrainDeadline() }, this.#opts.exitDrainMs)
  }

  #onDrainDeadline (): void {
    this.#drainTimer = undefined
    if (this.#pumps.some(isHoldingChildTail)) {
      this.#waitingForClient = true
      return
    }
    this.#report()
  }

  #onPumpChange (): void {
    if (this.#outcome === undefined || this.#reporting || this.#finished) return
    if (this.#pumps.every((pump) => pump.ended)) {
      this.#report()
    } else if (this.#waitingForClient && !this.#pumps.some(isHoldingChildTail)) {
      // The client caught up: give the tail one more exitDrainMs to arrive.
      this.#waitingForClient = false
      this.#armDrainTimer()
    }
  }

  #report (): void {
    if (this.#reporting || this.#finished || this.#outcome === undefined) return
    this.#reporting = true
    clearTimeout(this.#drainTimer)
    this.#drainTimer = undefined
    const outcome = this.#outcome
    // Stop reading before EOF goes out so nothing can be written after it. A grandchild that
    // still holds the pipes gets EPIPE from now on; it is not killed.
    for (const pump of this.#pumps) pump.stop()
    this.#io.flush(() => {
      if (this.#finished) return
      this.#io.report(outcome)
      this.#finish()
    })
  }

  #failSpawn (err: unknown): void {
    if (this.#reporting || this.#finished) return
    this.#reporting = true
    this.#log.warn({ err }, 'exec spawn failed')
    const child = this.#child
    if (child !== undefined) {
      child.stdin.destroy()
      child.stdout.destroy()
      child.stderr.destroy()
    }
    this.#io.stderr.write(spawnFailureMessage(err))
    // 127 is what a shell reports for a command it could not run.
    this.#io.flush(() => {
      if (this.#finished) return
      this.#io.report({ code: 127 })
      this.#finish()
    })
  }

  #finish (): void {
    if (this.#finished) return
    this.#finished = true
    clearTimeout(this.#drainTimer)
    this.#drainTimer = undefined
    for (const pump of this.#pumps) pump.stop()
    const child = this.#child
    if (child !== undefined) {
      this.#io.input.unpipe(child.stdin)
      child.stdin.destroy()
    }
    this.#io.release()
    this.#opts.onFinish()
  }
}

function isHoldingChildTail (pump: OutputPump): boolean {
  return !pump.ended && pump.blocked && pump.bytesAfterExit < CHILD_TAIL_BYTES
}
