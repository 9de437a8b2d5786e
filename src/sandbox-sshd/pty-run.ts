import { closeSync, constants as fsConstants, openSync } from 'node:fs'
import { homedir } from 'node:os'
import type { ReadStream } from 'node:tty'
import { spawn as spawnPty, type IDisposable, type IPty } from 'node-pty'
import type { Logger } from 'pino'
import { exitOutcomeOfNumbers, type ExitOutcome } from './exit-report.js'
import { PtyInput } from './pty-input.js'
import type { RunIo } from './run-io.js'
import { signalProcessGroup, spawnFailureMessage, type Run, type RunOptions } from './run.js'

export interface PtyRunOptions extends RunOptions {
  term: string
  cols: number
  rows: number
}

// How often the child is checked for having exited; node-pty says so only once its read stream
// has closed, and that is what this run must arrange (see the class comment).
const EXIT_POLL_MS = 20
// What remains in the terminal when the child exits is at most the kernel's buffers (tens of KiB)
// and the read stream's; beyond this much output after the exit, the rest is a grandchild's and
// the client's pace applies again (node-pty's 200 ms then ends it).
const TAIL_BYTES = 1024 * 1024

// What node-pty's UnixTerminal (lib/unixTerminal.js, 1.1.0) has beyond its typings and this
// module relies on: the master's descriptor, the slave's path, the tty.ReadStream on the master.
interface UnixTerminalInternals {
  readonly fd: number
  readonly ptsName: string
  readonly _socket: ReadStream
}

/**
 * One `exec` request on a session with a pty: `/bin/sh -c <command>` as the session leader of a
 * new terminal (node-pty's forkpty), its output (stdout and stderr merged by the terminal, as
 * under OpenSSH) forwarded as channel data, the client's data and EOF as terminal input.
 *
 * Getting all of the output before the exit report takes three workarounds:
 * - Node 20's libuv ends a read stream early when the slave side hangs up: after a short read it
 *   takes POLLHUP for EOF although the terminal still holds output (libuv/libuv#4992), so the
 *   last KiBs of a command that exits right after writing them were lost. This run holds the
 *   slave open itself until the child is gone and a whole event-loop turn has read nothing.
 * - node-pty reports the exit only when its read stream closes, and closes it itself 200 ms after
 *   the exit, unread output or not. That is this path's exitDrainMs: a background process that
 *   keeps the terminal open delays the report by 200 ms at most.
 * - A paused stream reads nothing, so while the client is slow the child is checked, and once it
 *   is gone the terminal is read regardless of the client (up to TAIL_BYTES).
 *
 * Nothing is signalled by this class except on request. When the client goes away the terminal is
 * closed, as OpenSSH does: the kernel then hangs it up (SIGHUP to its foreground process group),
 * the terminal's equivalent of the pipe path's EPIPE; a command that ignores SIGHUP keeps running.
 */
export class PtyRun implements Run {
  readonly #io: RunIo
  readonly #opts: PtyRunOptions
  readonly #log: Logger
  #pty: IPty | undefined
  #socket: ReadStream | undefined
  #slave: number | undefined
  #input: PtyInput | undefined
  #subscriptions: IDisposable[] = []
  #exitPoll: NodeJS.Timeout | undefined
  #quietCheck: NodeJS.Immediate | undefined
  #readSinceCheck = false
  #blocked = false
  #childGone = false
  #bytesAfterExit = 0
  #reporting = false
  #finished = false

  constructor (io: RunIo, opts: PtyRunOptions) {
    this.#io = io
    this.#opts = opts
    this.#log = opts.logger
  }

  start (): void {
    const io = this.#io
    io.onGone(() => { this.abort('channel closed') })

    const { command, term, cols, rows, env } = this.#opts
    // node-pty hands these to C as strings: a NUL would silently cut the command short.
    if (command.includes('\0') || term.includes('\0')) {
      this.#failSpawn(new Error('the command or terminal name contains a NUL byte'))
      return
    }
    let pty: IPty
    try {
      // encoding null: raw bytes; a decoder would mangle output that is not UTF-8.
      pty = spawnPty('/bin/sh', ['-c', command], { name: term, cols, rows, cwd: homedir(), env, encoding: null })
    } catch (err) {
      this.#failSpawn(err)
      return
    }
    const internals = pty as unknown as UnixTerminalInternals
    const socket = internals._socket
    this.#pty = pty
    this.#socket = socket
    // Synchronously after the spawn: the loop has not polled the master yet, so no hang-up can
    // have been seen. O_NOCTTY: the daemon must not acquire the terminal.
    try {
      this.#slave = openSync(internals.ptsName, fsConstants.O_RDWR | fsConstants.O_NOCTTY)
    } catch (err) {
      this.#log.warn({ err }, 'cannot hold the pty slave open; output at exit may be cut short')
    }
    // node-pty rethrows read errors other than EAGAIN and EIO unless someone else listens too.
    socket.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code !== 'EIO') this.#log.debug({ err }, 'pty read error')
    })
    this.#log.debug({ pid: pty.pid, cols, rows }, 'pty exec started')
    this.#subscriptions.push(
      // With encoding null node-pty passes Buffers, whatever its typings say.
      pty.onData((chunk) => { this.#onData(chunk as unknown as Buffer) }),
      pty.onExit(({ exitCode, signal }) => { this.#onExit(exitCode, signal ?? 0) })
    )
    this.#exitPoll = setInterval(this.#watchChild, EXIT_POLL_MS)

    const input = new PtyInput(internals.fd, () => !socket.destroyed)
    this.#input = input
    input.on('error', (err: NodeJS.ErrnoException) => {
      // EIO: the terminal is closed; the client's input has nowhere to go.
      if (err.code !== 'EIO') this.#log.debug({ err }, 'pty input error')
      // Keep accepting the client's input (and dropping it) so it is never stuck on a full window.
      io.input.unpipe(input)
      io.input.resume()
    })
    io.input.pipe(input)
  }

  signal (name: string): void {
    const pid = this.#pty?.pid
    if (pid === undefined || this.#finished) return
    signalProcessGroup(pid, name, this.#log)
  }

  /** A `window-change` request. */
  resize (cols: number, rows: number): void {
    const pty = this.#pty
    if (cols === 0 || rows === 0 || pty === undefined || this.#finished) return
    // Once the read stream is closed, so is the descriptor node-pty would resize; its number may
    // already belong to another terminal.
    if (this.#socket?.destroyed === true) return
    try {
      pty.resize(cols, rows)
    } catch (err) {
      this.#log.debug({ err, cols, rows }, 'pty resize failed')
    }
  }

  abort (reason: string): void {
    if (this.#finished) return
    this.#log.debug({ reason, pid: this.#pty?.pid }, 'pty exec abandoned by client')
    this.#finish()
  }

  #onData (chunk: Buffer): void {
    if (this.#finished) return
    this.#readSinceCheck = true
    if (this.#childGone) this.#bytesAfterExit += chunk.length
    if (this.#io.stdout.write(chunk) || this.#blocked) return
    if (this.#childGone && this.#bytesAfterExit < TAIL_BYTES) return
    this.#blocked = true
    this.#pty?.pause()
    this.#io.stdout.once('drain', this.#onDrain)
  }

  readonly #onDrain = (): void => {
    if (!this.#finished) this.#unblock()
  }

  #unblock (): void {
    this.#io.stdout.removeListener('drain', this.#onDrain)
    if (!this.#blocked) return
    this.#blocked = false
    this.#pty?.resume()
  }

  readonly #watchChild = (): void => {
    if (!this.#childGone) {
      const pid = this.#pty?.pid
      if (pid === undefined || isAlive(pid)) return
      this.#childGone = true
      this.#unblock()
    }
    if (this.#slave === undefined) {
      this.#stopWatching()
      return
    }
    // Timers run before the loop polls for I/O and immediates after it; a terminal with output
    // left is readable then (the kernel flushes its pending buffers when polled), so an
    // immediate that finds nothing read since this tick knows the terminal is drained.
    if (this.#blocked || this.#quietCheck !== undefined) return
    this.#readSinceCheck = false
    this.#quietCheck = setImmediate(() => {
      this.#quietCheck = undefined
      if (!this.#readSinceCheck && !this.#blocked) this.#releaseSlave()
    })
  }

  /** Lets the terminal hang up once nothing but the child's own leftovers would be read. */
  #releaseSlave (): void {
    this.#stopWatching()
    const slave = this.#slave
    this.#slave = undefined
    if (slave === undefined) return
    try {
      closeSync(slave)
    } catch (err) {
      this.#log.debug({ err }, 'closing the pty slave failed')
    }
  }

  #stopWatching (): void {
    clearInterval(this.#exitPoll)
    this.#exitPoll = undefined
    clearImmediate(this.#quietCheck)
    this.#quietCheck = undefined
  }

  #onExit (exitCode: number, signal: number): void {
    const outcome = exitOutcomeOfNumbers(exitCode, signal)
    this.#log.debug({ pid: this.#pty?.pid, ...outcome }, 'pty exec exited')
    this.#report(outcome)
  }

  #failSpawn (err: unknown): void {
    if (this.#reporting || this.#finished) return
    this.#log.warn({ err }, 'pty exec spawn failed')
    // A terminal has one output stream; the message goes where the command's errors would.
    this.#io.stdout.write(spawnFailureMessage(err))
    // 127 is what a shell reports for a command it could not run.
    this.#report({ code: 127 })
  }

  #report (outcome: ExitOutcome): void {
    if (this.#reporting || this.#finished) return
    this.#reporting = true
    this.#unblock()
    this.#io.flush(() => {
      if (this.#finished) return
      this.#io.report(outcome)
      this.#finish()
    })
  }

  #finish (): void {
    if (this.#finished) return
    this.#finished = true
    this.#unblock()
    this.#releaseSlave()
    for (const subscription of this.#subscriptions) subscription.dispose()
    this.#subscriptions = []
    const input = this.#input
    if (input !== undefined) {
      this.#io.input.unpipe(input)
      input.destroy()
    }
    // Closes our side of the terminal (a no-op once node-pty has); never signals anything. Not
    // node-pty's kill() or destroy(), which send SIGHUP to the shell themselves.
    this.#socket?.destroy()
    this.#io.release()
    this.#opts.onFinish()
  }
}

// A reaped child's pid answers ESRCH; node-pty reaps its child as soon as it exits.
function isAlive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}
