import type { Logger } from 'pino'
import type { Session } from 'ssh2'
import { ExecRun } from './exec-run.js'
import { PtyRun } from './pty-run.js'
import type { Run } from './run.js'

// Same rule the gateway applies to exec env keys; anything else could not be a shell variable.
const ENV_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/
const DEFAULT_TERM = 'xterm-256color'
// A terminal's size is two unsigned shorts (struct winsize); SSH sends 32-bit numbers.
const MAX_DIMENSION = 0xffff

export interface SessionContext {
  exitDrainMs: number
  logger: Logger
  /** Registers a run with its connection so a dropped connection can abandon it. */
  track: (run: Run) => () => void
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
  let run: ExecRun | PtyRun | undefined

  session.on('error', (err: Error) => { ctx.logger.debug({ err }, 'session error') })
  // ssh2 reports the client's channel close on the session object even when the exec channel
  // itself cannot emit 'close' yet (its readable side still has unconsumed input).
  session.once('close', () => { run?.abort('channel closed') })

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
    if (pty === undefined) {
      run = new ExecRun(channel, { ...opts, env: { ...process.env, ...env } })
    } else {
      // The daemon's own COLUMNS and LINES describe some other terminal; programs prefer them to
      // the pty's size. The client's env requests may still set them.
      const { COLUMNS: _columns, LINES: _lines, ...inherited } = process.env
      run = new PtyRun(channel, { ...opts, ...pty, env: { ...inherited, ...env, TERM: pty.term } })
    }
    untrack = ctx.track(run)
    run.start()
  })

  session.on('signal', (accept, _reject, info) => {
    accept?.()
    run?.signal(info.name)
  })
}

function dimension (value: number): number {
  return Math.min(value, MAX_DIMENSION)
}
