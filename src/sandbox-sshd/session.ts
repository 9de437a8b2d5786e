import type { Logger } from 'pino'
import type { Session } from 'ssh2'
import { ExecRun } from './exec-run.js'

// Same rule the gateway applies to exec env keys; anything else could not be a shell variable.
const ENV_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/

export interface SessionContext {
  exitDrainMs: number
  logger: Logger
  /** Registers a run with its connection so a dropped connection can abandon it. */
  track: (run: ExecRun) => () => void
}

/**
 * Serves one `session` channel: collects `env` requests, runs one `exec`, forwards `signal`
 * requests. PTYs, shells and subsystems are refused. ssh2 passes `accept`/`reject` as undefined
 * when the client did not ask for a reply, hence the optional calls.
 */
export function serveSession (session: Session, ctx: SessionContext): void {
  const env: Record<string, string> = {}
  let run: ExecRun | undefined

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
  session.on('pty', (_accept, reject) => { reject?.() })
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
    run = new ExecRun(channel, {
      command: info.command,
      env: { ...process.env, ...env },
      exitDrainMs: ctx.exitDrainMs,
      logger: ctx.logger,
      onFinish: () => { untrack() },
    })
    untrack = ctx.track(run)
    run.start()
  })

  session.on('signal', (accept, _reject, info) => {
    accept?.()
    run?.signal(info.name)
  })
}
