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

// RFC 4254 §6.10: a signal name is sent without "SIG" (TERM, KILL, USR1), or is a local
// extension "name@domain" (OpenSSH sends "SIG@openssh.com" for a signal it has no standard
// name for); RFC 4250 §4.6.1 caps names at 64 characters. A name outside this is not
// a signal but a string the sandbox wants stored: it reaches no record.
const STANDARD_SIGNAL = /^[A-Z][A-Z0-9]{0,31}$/
const EXTENSION_SIGNAL = /^[A-Za-z0-9][A-Za-z0-9+_.-]{0,40}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?)*$/
const SSH_SIGNAL_NAME_MAX = 64

export function isSshSignalName (name: unknown): name is string {
  if (typeof name !== 'string' || name.length === 0 || name.length > SSH_SIGNAL_NAME_MAX) return false
  return STANDARD_SIGNAL.test(name) || EXTENSION_SIGNAL.test(name)
}

// SSH carries exit statuses as uint32.
export function isSshExitStatus (code: unknown): code is number {
  return typeof code === 'number' && Number.isInteger(code) && code >= 0 && code <= 0xffff_ffff
}

// ssh2's ('exit', code, signal) as an ExitReport, or why it is none: only a uint32 status or a
// signal name in the grammar is an exit; anything else (NaN, a bare undefined) never becomes
// an exit code.
export function exitReportFrom (code: unknown, signal: unknown): ExitReport | { invalid: string } {
  if (isSshExitStatus(code)) return { code }
  if (code !== null && code !== undefined) return { invalid: 'the sandbox reported an exit status that is not a uint32' }
  if (typeof signal !== 'string') return { invalid: 'the sandbox reported an exit with neither a status nor a signal' }
  const name = normalizeSignalName(signal)
  if (!isSshSignalName(name)) return { invalid: 'the sandbox reported an exit signal outside the SSH grammar' }
  return { signal: name }
}
