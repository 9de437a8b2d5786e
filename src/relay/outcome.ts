import { GatewayError } from '../errors.js'

// The one place that decides how an exec ended. Only an SSH exit-status or exit-signal is an
// exit; a closed, reset or wedged relay is never turned into a made-up exit code.

export type ExitReport = { code: number } | { signal: string }

export type Outcome =
  | { kind: 'exited', exitCode: number, signal: null, timedOut: boolean }
  | { kind: 'signaled', exitCode: null, signal: string, timedOut: false }
  | { kind: 'failed', error: GatewayError }

export const TIMEOUT_EXIT_CODE = 124

export interface OutcomeInput {
  exit: ExitReport | undefined
  // The gateway killed the process because timeoutSeconds expired, and the kill was confirmed
  // (an exit report arrived, or the sandbox reported the processes signalled).
  timedOut: boolean
  failure: GatewayError | undefined
}

export function decideOutcome ({ exit, timedOut, failure }: OutcomeInput): Outcome {
  if (timedOut) return { kind: 'exited', exitCode: TIMEOUT_EXIT_CODE, signal: null, timedOut: true }
  if (exit !== undefined) {
    if ('code' in exit) return { kind: 'exited', exitCode: exit.code, signal: null, timedOut: false }
    return { kind: 'signaled', exitCode: null, signal: exit.signal, timedOut: false }
  }
  return {
    kind: 'failed',
    error: failure ?? new GatewayError('relay_unavailable', 'the relay closed before the command reported an exit status')
  }
}

// ssh2 reports exit-signal names as "SIGKILL"; the contract (and RFC 4254) say "KILL".
export function normalizeSignalName (name: string): string {
  return name.startsWith('SIG') ? name.slice(3) : name
}
