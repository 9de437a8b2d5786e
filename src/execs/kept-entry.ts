import type { KeptStatus } from '../schemas/keeper.js'
import { ExecEntry } from './exec-entry.js'
import type { RetentionBudget } from './retention-budget.js'
import type { ValidExec } from './validate.js'

// The record of an exec rebuilt from what a sandbox's daemon keeps (a restarted gateway, or a
// sandbox that moved to this replica): its spec and times as the daemon wrote them, started, and
// with the output the daemon no longer has marked as gone.
export function keptEntry (sandboxId: string, status: KeptStatus, retentionBytes: number, budget: RetentionBudget): ExecEntry {
  const meta = status.meta
  const spec: ValidExec = {
    command: meta.command,
    env: {},
    workdir: undefined,
    stdin: undefined,
    interactive: meta.interactive,
    tty: meta.tty,
    cols: meta.cols,
    rows: meta.rows,
    timeoutSeconds: meta.timeoutSeconds
  }
  const entry = new ExecEntry(meta.execId, sandboxId, spec, retentionBytes, budget, validDate(meta.createdAt))
  // What the daemon no longer has is gone: readers from 0 are told of a gap up to its base.
  entry.stdout.skipTo(status.stdout.base)
  entry.stderr.skipTo(status.stderr.base)
  entry.markStarted()
  entry.startedAt = validDate(status.startedAt) ?? entry.startedAt
  return entry
}

// A time the daemon reported, if it is one.
export function validDate (iso: string | undefined): Date | undefined {
  if (iso === undefined) return undefined
  const d = new Date(iso)
  return Number.isNaN(d.getTime()) ? undefined : d
}
