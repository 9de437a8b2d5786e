import { constants as osConstants } from 'node:os'
import type { Logger } from 'pino'

/** What every kind of run (pipes or pseudo-terminal) is given by its session. */
export interface RunOptions {
  command: string
  env: NodeJS.ProcessEnv
  exitDrainMs: number
  logger: Logger
  /** Called once, when the run has reported its exit or was abandoned by the client. */
  onFinish: () => void
}

/** What the session and the connection need of a run, whichever way it is wired to its process. */
export interface Run {
  start(): void
  /** Delivers a `signal` request (name without "SIG") to the command's whole process group. */
  signal(name: string): void
  /** The client closed the channel or the connection: stop talking to it, leave the command be. */
  abort(reason: string): void
}

/**
 * Signals the process group led by pid. Both kinds of run make the shell a group leader (its own
 * group, or its own session under a terminal), so background jobs are reached too.
 */
export function signalProcessGroup (pid: number, name: string, log: Logger): void {
  const signal = `SIG${name.replace(/^SIG/, '')}`
  if (!Object.hasOwn(osConstants.signals, signal)) {
    log.debug({ signal: name }, 'ignoring unknown signal')
    return
  }
  try {
    process.kill(-pid, signal)
  } catch (err) {
    // ESRCH: the whole group is already gone, which is what the sender wanted anyway.
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') log.warn({ err, signal }, 'signal failed')
  }
}

export function spawnFailureMessage (err: unknown): string {
  const message = err instanceof Error ? err.message : String(err)
  return `sandbox-sshd: cannot run command: ${message}\n`
}
