import type { Logger } from 'pino'
import type { ServerChannel, Session } from 'ssh2'
import { decodeKeepMeta, KEEP_ENV, parseControlLine } from '../schemas/keeper.js'
import { ExecRun } from './exec-run.js'
import type { Attachment } from './keeper/attachment.js'
import { answerControl } from './keeper/control.js'
import type { Keeper } from './keeper/keeper.js'
import type { KeptExec } from './keeper/kept-exec.js'
import { PtyRun } from './pty-run.js'
import { ChannelIo } from './run-io.js'
import type { Run } from './run.js'

// Same rule the gateway applies to exec env keys; anything else could not be a shell variable.
const ENV_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/
const DEFAULT_TERM = 'xterm-256color'
// A terminal's size is two unsigned shorts (struct winsize); SSH sends 32-bit numbers.
const MAX_DIMENSION = 0xffff

export interface SessionContext {
  exitDrainMs: number
  logger: Logger
  /** Registers a run with its connection so a dropped connection can abandon (or detach) it. */
  track: (run: Pick<Run, 'abort'>) => () => void
  /** Present when this daemon keeps its execs (docs/keeper-protocol.md). */
  keeper?: Keeper | undefined
}

interface PtyRequest {
  term: string
  cols: number
  rows: number
}

/**
 * Serves one `session` channel: collects `env` and `pty` requests, runs one `exec` (under a
 * pseudo-terminal if one was requested), forwards `signal` and `window-change` requests. Shells
 * and subsystems are refused. ssh2 passes `accept`/`reject` as undefined when the client did not
 * ask for a reply, hence the optional calls.
 */
export function serveSession (session: Session, ctx: SessionContext): void {
  const env: Record<string, string> = {}
  let pty: PtyRequest | undefined
  let run: ExecRun | PtyRun | KeptTarget | undefined

  session.on('error', (err: Error) => { ctx.logger.debug({ err }, 'session error') })
  // ssh2 reports the client's channel close on the session object even when the exec channel
  // itself cannot emit 'close' yet (its readable side still has unconsumed input).
  session.once('close', () => { run?.abort('channel closed') })
  // The client's EOF, which ssh2 reports here before the data it follows has been read.
  session.once('eof', () => { if (run instanceof KeptTarget) run.attachment.eof() })

  session.on('env', (accept, reject, info) => {
    if (!ENV_KEY.test(info.key) || info.val.includes('\0')) {
      reject?.()
      return
    }
    env[info.key] = info.val
    accept?.()
  })
  session.on('pty', (accept, reject, info) => {
    if (run !== undefined) {
      reject?.()
      return
    }
    pty = { term: info.term || DEFAULT_TERM, cols: dimension(info.cols || 80), rows: dimension(info.rows || 24) }
    accept?.()
  })
  session.on('window-change', (accept, reject, info) => {
    if (run instanceof KeptTarget) {
      accept?.()
      if (info.cols !== 0 && info.rows !== 0) run.resize(dimension(info.cols), dimension(info.rows))
      return
    }
    if (pty === undefined) {
      reject?.()
      return
    }
    accept?.()
    // Clients without a size to report send zeros; there is nothing to apply.
    if (info.cols === 0 || info.rows === 0) return
    const cols = dimension(info.cols)
    const rows = dimension(info.rows)
    if (run instanceof PtyRun) run.resize(cols, rows)
    else pty = { ...pty, cols, rows }
  })
  session.on('shell', (_accept, reject) => { reject?.() })
  session.on('subsystem', (_accept, reject) => { reject?.() })
  session.on('sftp', (_accept, reject) => { reject?.() })

  session.on('exec', (accept, reject, info) => {
    if (run !== undefined) {
      reject?.()
      return
    }
    // The keeper's tag is for the daemon, never for the command.
    const keepValue = env[KEEP_ENV]
    delete env[KEEP_ENV]
    const keeper = ctx.keeper
    const control = keeper === undefined ? undefined : parseControlLine(info.command)
    if (keeper !== undefined && control !== undefined) {
      if (control !== 'invalid' && control.op === 'attach') {
        const exec = keeper.get(control.execId)
        // An unknown exec is refused, so the client learns it before it waits for output.
        if (exec === undefined) {
          reject?.()
          return
        }
        const channel = accept()
        if (channel === undefined) return
        run = new KeptTarget(exec, exec.attach(channel, { stdout: control.stdoutOffset, stderr: control.stderrOffset }), ctx)
        return
      }
      const channel = accept()
      if (channel !== undefined) answerControl(channel, control, keeper)
      return
    }
    if (keeper !== undefined && keepValue !== undefined) {
      const meta = decodeKeepMeta(keepValue)
      // An exec id already kept is refused: a retried open must never start a command twice.
      if (meta === undefined || keeper.has(meta.execId)) {
        reject?.()
        return
      }
      const channel = accept()
      if (channel === undefined) return
      const started = keeper.start({
        meta,
        command: info.command,
        env: runEnv(env, pty),
        pty,
        exitDrainMs: ctx.exitDrainMs
      }, channel)
      run = new KeptTarget(started.exec, started.attachment, ctx)
      return
    }
    const channel = accept()
    // undefined when ssh2 has already answered (e.g. the session is ending).
    if (channel === undefined) return
    let untrack = (): void => {}
    const opts = {
      command: info.command,
      exitDrainMs: ctx.exitDrainMs,
      logger: ctx.logger,
      onFinish: () => { untrack() }
    }
    const io = new ChannelIo(channel, (err) => { ctx.logger.debug({ err }, 'exec channel error') })
    run = pty === undefined
      ? new ExecRun(io, { ...opts, env: runEnv(env, pty) })
      : new PtyRun(io, { ...opts, ...pty, env: runEnv(env, pty) })
    untrack = ctx.track(run)
    run.start()
  })

  session.on('signal', (accept, _reject, info) => {
    accept?.()
    run?.signal(info.name)
  })
}

function runEnv (env: Record<string, string>, pty: PtyRequest | undefined): NodeJS.ProcessEnv {
  if (pty === undefined) return { ...process.env, ...env }
  // The daemon's own COLUMNS and LINES describe some other terminal; programs prefer them to
  // the pty's size. The client's env requests may still set them.
  const { COLUMNS: _columns, LINES: _lines, ...inherited } = process.env
  return { ...inherited, ...env, TERM: pty.term }
}

/**
 * A session channel attached to a kept exec (the one that started it, or an `attach`): its
 * signal and window-change requests apply while it is the exec's channel, and its going away
 * only detaches it.
 */
class KeptTarget {
  readonly exec: KeptExec
  readonly attachment: Attachment
  readonly #untrack: () => void

  constructor (exec: KeptExec, attachment: Attachment, ctx: SessionContext) {
    this.exec = exec
    this.attachment = attachment
    this.#untrack = ctx.track(this)
    attachment.channel.once('close', () => { this.#untrack() })
  }

  get #current (): boolean { return this.exec.isAttached(this.attachment.channel as ServerChannel) }

  signal (name: string): void {
    if (this.#current) this.exec.signal(name)
  }

  resize (cols: number, rows: number): void {
    if (this.#current) this.exec.resize(cols, rows)
  }

  abort (): void {
    this.attachment.lost()
    this.#untrack()
  }
}

function dimension (value: number): number {
  return Math.min(value, MAX_DIMENSION)
}
