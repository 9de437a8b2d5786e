import { GatewayError, isErrorCode } from '../errors.js'
import { ExecEntry } from '../execs/exec-entry.js'
import type { Outcome } from '../relay/outcome.js'
import type { Exec } from '../schemas/exec.js'
import { DEFAULT_COLS, DEFAULT_ROWS } from '../schemas/exec.js'
import type { FinishedInput, FinishedRecord } from './finished.js'

// A finished exec between its replica and the directory: what the owner writes when the exec
// ends, and the read-only entry any replica rebuilds from it once that replica is gone, so the
// record, the result and the events (the retained tail, a gap before it) answer as they did.

export function finishedInput (entry: ExecEntry): FinishedInput {
  const out = entry.stdout.tail()
  const err = entry.stderr.tail()
  return {
    record: entry.toJSON(),
    stdout: out.data,
    stderr: err.data,
    stdoutOffset: entry.stdout.total - out.data.length,
    stderrOffset: entry.stderr.total - err.data.length,
    stdoutTruncated: out.truncated,
    stderrTruncated: err.truncated
  }
}

// Undefined for a record this version cannot read (it is then treated as unknown).
export function finishedEntry (f: FinishedRecord, retentionBytes: number): ExecEntry | undefined {
  const r = f.record as Partial<Exec> | null
  if (r === null || typeof r !== 'object' || typeof r.id !== 'string' || typeof r.sandboxId !== 'string' || !Array.isArray(r.command)) return undefined
  const outcome = outcomeOf(r)
  if (outcome === undefined) return undefined
  const entry = new ExecEntry(r.id, r.sandboxId, {
    command: r.command,
    env: {},
    workdir: undefined,
    stdin: undefined,
    interactive: r.interactive === true,
    tty: r.tty === true,
    cols: DEFAULT_COLS,
    rows: DEFAULT_ROWS,
    timeoutSeconds: 0
  }, retentionBytes, undefined, date(r.createdAt))
  entry.stdout.skipTo(f.stdoutOffset)
  entry.stderr.skipTo(f.stderrOffset)
  entry.append('stdout', f.stdout)
  entry.append('stderr', f.stderr)
  if (r.startedAt !== null && r.startedAt !== undefined) {
    entry.markStarted()
    entry.startedAt = date(r.startedAt)
  }
  entry.stdinBytes = typeof r.stdinBytes === 'number' ? r.stdinBytes : 0
  entry.finish(outcome)
  entry.endedAt = date(r.endedAt ?? undefined) ?? entry.endedAt
  return entry
}

function outcomeOf (r: Partial<Exec>): Outcome | undefined {
  if (r.status === 'failed') {
    const e = r.error
    if (e === null || e === undefined || !isErrorCode(e.code)) return undefined
    return { kind: 'failed', error: new GatewayError(e.code, e.detail) }
  }
  if (r.status !== 'exited') return undefined
  if (typeof r.signal === 'string') return { kind: 'signaled', exitCode: null, signal: r.signal, timedOut: false }
  if (typeof r.exitCode !== 'number') return undefined
  return { kind: 'exited', exitCode: r.exitCode, signal: null, timedOut: r.timedOut === true }
}

function date (iso: string | undefined): Date | undefined {
  if (iso === undefined) return undefined
  const d = new Date(iso)
  return Number.isNaN(d.getTime()) ? undefined : d
}
