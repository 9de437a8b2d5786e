// src/relay/outcome.ts: the one place that decides how an exec ended. An exit code is never
// inferred from a closed stream.
import { describe, expect, it } from 'vitest'
import { TIMEOUT_EXIT_CODE, decideOutcome, normalizeSignalName } from '../../src/relay/outcome.js'
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
