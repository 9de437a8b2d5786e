// The checks of one reader's events, as they arrive, and the verdict on the final one.
import { StreamCheck } from './expected.js'
import { KNOBS } from './knobs.js'
import { codeStatus, problem, type Observation } from './observation.js'
import type { Plan } from './plans.js'
import { restartedSince } from './world.js'

export type Stream = 'stdout' | 'stderr'
export interface Gap { from: number, to: number }
export type Checks = Record<Stream, StreamCheck>
export const json = (x: unknown): string => JSON.stringify(x).slice(0, 160)

// What a reader must get after the end, from these offsets: one gap up to the oldest byte the
// gateway still holds, for each stream that printed more than it retains past the offset.
export function gapsAfterEnd (rec: { stdoutBytes: number, stderrBytes: number }, from: Record<Stream, number>): Partial<Record<Stream, Gap>> {
  const gaps: Partial<Record<Stream, Gap>> = {}
  for (const s of ['stdout', 'stderr'] as const) {
    const held = (s === 'stdout' ? rec.stdoutBytes : rec.stderrBytes) - KNOBS.retentionBytes
    if (held > from[s]) gaps[s] = { from: from[s], to: held }
  }
  return gaps
}

// The events of one reader, checked as they arrive. `gaps` undefined: a reader attached while
// the exec runs, which never sees a gap; otherwise exactly the gaps listed.
export class EventCheck {
  readonly out: Checks
  final: any
  events = 0
  readonly #obs: Observation
  readonly #gaps: Partial<Record<Stream, Gap>> | undefined
  readonly #gapSeen = { stdout: false, stderr: false }
  #late = false
  // The exec's record may have been rebuilt by a restarted gateway since the exec began.
  readonly #rebuilt = (): boolean => restartedSince(this.#obs.t0)

  constructor (obs: Observation, plan: Plan, from: Record<Stream, number>, gaps: Partial<Record<Stream, Gap>> | undefined) {
    this.#obs = obs
    this.#gaps = gaps
    this.out = { stdout: new StreamCheck(plan.stdout, from.stdout), stderr: new StreamCheck(plan.stderr, from.stderr) }
  }

  feed = (ev: any): void => {
    this.events++
    if (this.final !== undefined) {
      if (!this.#late) problem(this.#obs, `event after the final event: ${json(ev)}`)
      this.#late = true
      return
    }
    if (ev.type === 'stdout' || ev.type === 'stderr') {
      const s = ev.type as Stream
      const want = this.#gaps?.[s]
      if (want !== undefined && !this.#gapSeen[s]) {
        this.#gapSeen[s] = true
        if (!this.#rebuilt()) problem(this.#obs, `${s} data at offset ${ev.offset} without the gap ${json(want)} first`)
      }
      if (ev.offset !== this.out[s].offset) problem(this.#obs, `${s} event at offset ${ev.offset}, expected ${this.out[s].offset}`)
      this.out[s].feed(Buffer.from(String(ev.data), 'utf8'))
    } else if (ev.type === 'gap') {
      const s = ev.stream as Stream
      const want = this.#gaps?.[s]
      // After a restart, a reader after the end gets what the successor holds: what the daemon
      // kept, which need not be what the old gateway retained. It must still start at its offset.
      if (this.#gaps !== undefined && this.#rebuilt() && !this.#gapSeen[s] && ev.from === this.out[s].offset && ev.to >= ev.from) {
        this.#gapSeen[s] = true
        this.out[s].skip(ev.to)
        return
      }
      if (this.#gaps === undefined) problem(this.#obs, `gap event seen by an attached reader: ${json(ev)}`)
      else if (want === undefined || this.#gapSeen[s] || ev.from !== want.from || ev.to !== want.to) problem(this.#obs, `gap ${json(ev)}, want ${want === undefined ? 'none' : json(want)}`)
      else { this.#gapSeen[s] = true; this.out[s].skip(ev.to) }
    } else if (ev.type === 'exit' || ev.type === 'error') {
      this.final = ev
    } else if (ev.type === 'relay') {
      // A kept exec's relay lost and reattached: not final, the bytes go on exactly.
      if (ev.state !== 'lost' && ev.state !== 'restored') problem(this.#obs, `relay event with state ${json(ev.state)}`)
      this.#obs.relayEvents++
    } else if (ev.type !== 'heartbeat') {
      problem(this.#obs, `unexpected event ${json(ev)}`)
    }
  }

  finish (): void {
    for (const s of ['stdout', 'stderr'] as const) {
      const want = this.#gaps?.[s]
      if (want !== undefined && !this.#gapSeen[s] && !this.#rebuilt()) problem(this.#obs, `no gap event for ${s}, want ${json(want)}`)
    }
    this.#obs.bytes += this.out.stdout.offset + this.out.stderr.offset
  }
}

export function judgeExit (obs: Observation, plan: Plan, r: { exitCode: unknown, signal: unknown, timedOut: unknown }, c: Checks): void {
  obs.outcome = 'exit'
  obs.exitCode = typeof r.exitCode === 'number' ? r.exitCode : null
  if (r.exitCode !== plan.exitCode) problem(obs, `exit code ${String(r.exitCode)} (signal ${String(r.signal)}), the script exits ${plan.exitCode}`)
  if (r.signal !== null) problem(obs, `signal ${String(r.signal)} on a command that exits normally`)
  if (r.timedOut !== false) problem(obs, `timedOut ${String(r.timedOut)} without timeoutSeconds`)
  if (!c.stdout.complete()) problem(obs, `stdout: ${c.stdout.describe()}`)
  if (!c.stderr.complete()) problem(obs, `stderr: ${c.stderr.describe()}`)
}

export function judgeError (obs: Observation, e: { code: unknown, status: unknown, detail: unknown }, c: Checks | undefined): void {
  obs.outcome = 'error'
  obs.code = String(e.code)
  obs.detail = String(e.detail ?? '')
  const want = codeStatus(obs.code)
  if (want === undefined) problem(obs, `error ${obs.code} (status ${String(e.status)}) is not an honest liveness outcome: ${obs.detail}`)
  else if (e.status !== want) problem(obs, `error ${obs.code} carries status ${String(e.status)}, the contract says ${want}`)
  if (c !== undefined && !c.stdout.prefixOk()) problem(obs, `stdout of a failed exec is not a prefix of the expected: ${c.stdout.describe()}`)
  if (c !== undefined && !c.stderr.prefixOk()) problem(obs, `stderr of a failed exec is not a prefix of the expected: ${c.stderr.describe()}`)
}
