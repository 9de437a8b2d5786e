// src/relay/outcome.ts: the one place that decides how an exec ended. An exit code is never
// inferred from a closed stream.
import { describe, expect, it } from 'vitest'
import { TIMEOUT_EXIT_CODE, decideOutcome, exitReportFrom, isSshExitStatus, isSshSignalName, normalizeSignalName } from '../../src/relay/outcome.js'
import { GatewayError } from '../../src/errors.js'

describe('decideOutcome', () => {
  it('an exit status is an exit', () => {
    expect(decideOutcome({ exit: { code: 0 }, timedOut: false, failure: undefined }))
      .toEqual({ kind: 'exited', exitCode: 0, signal: null, timedOut: false })
    expect(decideOutcome({ exit: { code: 137 }, timedOut: false, failure: undefined }))
      .toEqual({ kind: 'exited', exitCode: 137, signal: null, timedOut: false })
    expect(decideOutcome({ exit: { code: 255 }, timedOut: false, failure: undefined }))
      .toEqual({ kind: 'exited', exitCode: 255, signal: null, timedOut: false })
  })

  it('a recorded exit code wins over a later relay failure', () => {
    const failure = new GatewayError('relay_unavailable', 'relay reset after exit-status')
    expect(decideOutcome({ exit: { code: 3 }, timedOut: false, failure }))
      .toEqual({ kind: 'exited', exitCode: 3, signal: null, timedOut: false })
    expect(decideOutcome({ exit: { code: 0 }, timedOut: false, failure: new GatewayError('ssh_failed', 'x') }))
      .toEqual({ kind: 'exited', exitCode: 0, signal: null, timedOut: false })
  })

  it('an exit signal is reported as a signal, with no exit code', () => {
    expect(decideOutcome({ exit: { signal: 'KILL' }, timedOut: false, failure: undefined }))
      .toEqual({ kind: 'signaled', exitCode: null, signal: 'KILL', timedOut: false })
    expect(decideOutcome({ exit: { signal: 'TERM' }, timedOut: false, failure: new GatewayError('relay_unavailable', 'x') }))
      .toEqual({ kind: 'signaled', exitCode: null, signal: 'TERM', timedOut: false })
  })

  it('timed out: 124 and timedOut true, whatever exit was recorded', () => {
    expect(TIMEOUT_EXIT_CODE).toBe(124)
    const want = { kind: 'exited', exitCode: 124, signal: null, timedOut: true }
    expect(decideOutcome({ exit: undefined, timedOut: true, failure: undefined })).toEqual(want)
    expect(decideOutcome({ exit: { code: 0 }, timedOut: true, failure: undefined })).toEqual(want)
    expect(decideOutcome({ exit: { code: 143 }, timedOut: true, failure: undefined })).toEqual(want)
    expect(decideOutcome({ exit: { signal: 'KILL' }, timedOut: true, failure: undefined })).toEqual(want)
    expect(decideOutcome({ exit: { code: 1 }, timedOut: true, failure: new GatewayError('relay_unavailable', 'x') })).toEqual(want)
  })

  it('no exit: failed with the given failure, never an exit code', () => {
    const failure = new GatewayError('relay_open_timeout', 'the supervisor did not open the relay within 10000 ms')
    const o = decideOutcome({ exit: undefined, timedOut: false, failure })
    expect(o.kind).toBe('failed')
    if (o.kind !== 'failed') throw new Error('unreachable')
    expect(o.error).toBe(failure)
    expect(o.error.status).toBe(504)
    expect('exitCode' in o).toBe(false)
    expect('signal' in o).toBe(false)
  })

  it('no exit and no failure: relay_unavailable with a detail, never exit code 0 or 1', () => {
    const o = decideOutcome({ exit: undefined, timedOut: false, failure: undefined })
    expect(o.kind).toBe('failed')
    if (o.kind !== 'failed') throw new Error('unreachable')
    expect(GatewayError.is(o.error)).toBe(true)
    expect(o.error.code).toBe('relay_unavailable')
    expect(o.error.status).toBe(503)
    expect(o.error.detail.length).toBeGreaterThan(0)
    expect(o.error.toProblem()).toMatchObject({ code: 'relay_unavailable', status: 503 })
    expect('exitCode' in o).toBe(false)
  })

  it('every failure code keeps its own status', () => {
    for (const [code, status] of [['ssh_failed', 502], ['sandbox_unavailable', 503], ['relay_unavailable', 503], ['shutting_down', 503]] as const) {
      const o = decideOutcome({ exit: undefined, timedOut: false, failure: new GatewayError(code, 'why') })
      expect(o).toMatchObject({ kind: 'failed', error: { code, status, detail: 'why' } })
    }
  })
})

describe('normalizeSignalName', () => {
  it('drops the SIG prefix', () => {
    expect(normalizeSignalName('SIGKILL')).toBe('KILL')
    expect(normalizeSignalName('SIGTERM')).toBe('TERM')
    expect(normalizeSignalName('SIGUSR1')).toBe('USR1')
  })

  it('leaves names without it alone', () => {
    expect(normalizeSignalName('KILL')).toBe('KILL')
    expect(normalizeSignalName('HUP')).toBe('HUP')
    expect(normalizeSignalName('')).toBe('')
  })
})

describe('isSshSignalName (RFC 4254 §6.10)', () => {
  it('takes the standard names without "SIG", and local extensions name@domain', () => {
    for (const name of ['ABRT', 'ALRM', 'FPE', 'HUP', 'ILL', 'INT', 'KILL', 'PIPE', 'QUIT', 'SEGV', 'TERM', 'USR1', 'USR2', 'SIG@openssh.com', 'RTMIN+3@example.org', 'A'.repeat(32)]) {
      expect(isSshSignalName(name), name).toBe(true)
    }
  })

  it('refuses anything else: markup, controls, spaces, lower case, bare or empty parts, over 64 characters, non-strings', () => {
    for (const name of ['<img src=x onerror=alert(1)>', 'KILL\n{"level":60}', '\u001b[31mKILL', 'TERM\u202e', 'SIG KILL', 'kill', '', '@', 'x@', '@openssh.com', 'a@b@c', 'x@-bad.com', 'A'.repeat(33), `${'a'.repeat(40)}@${'b'.repeat(30)}.com`, 'KILL,TERM']) {
      expect(isSshSignalName(name), JSON.stringify(name)).toBe(false)
    }
    for (const v of [undefined, null, 9, {}, ['KILL']]) expect(isSshSignalName(v)).toBe(false)
  })
})

describe('exitReportFrom (what ssh2 emitted, as an exit)', () => {
  it('keeps every uint32 exit status', () => {
    for (const code of [0, 1, 124, 255, 256, 2 ** 31, 0xffff_ffff]) {
      expect(isSshExitStatus(code)).toBe(true)
      expect(exitReportFrom(code, undefined)).toEqual({ code })
    }
  })

  it('takes a signal (ssh2 prefixes "SIG") only inside the grammar', () => {
    expect(exitReportFrom(null, 'SIGKILL')).toEqual({ signal: 'KILL' })
    expect(exitReportFrom(undefined, 'SIGSIG@openssh.com')).toEqual({ signal: 'SIG@openssh.com' })
    expect(exitReportFrom(null, 'SIG<img src=x onerror=alert(1)>')).toEqual({ invalid: 'the sandbox reported an exit signal outside the SSH grammar' })
  })

  it('never makes an exit code of anything else', () => {
    for (const code of [NaN, -1, 1.5, 2 ** 32, Infinity, '0', true]) {
      expect(isSshExitStatus(code)).toBe(false)
      expect(exitReportFrom(code, 'SIGKILL')).toEqual({ invalid: 'the sandbox reported an exit status that is not a uint32' })
    }
    expect(exitReportFrom(undefined, undefined)).toEqual({ invalid: 'the sandbox reported an exit with neither a status nor a signal' })
    expect(exitReportFrom(null, null)).toEqual({ invalid: 'the sandbox reported an exit with neither a status nor a signal' })
  })
})
