import type { Logger } from 'pino'
import type { GatewayEvents } from '../diagnostics.js'
import type { SessionRegistry } from '../relay/sessions.js'
import type { SshPool } from '../relay/ssh-pool.js'
import type { KeptStatus } from '../schemas/keeper.js'
import type { ExecEntry } from './exec-entry.js'

// What an ExecManager is built with: its parts, its bounds, and the hooks cluster mode and
// tests plug in.

export interface ExecManagerOptions {
  registry: SessionRegistry
  pool: SshPool
  logger: Logger
  // Lifecycle events (created, ended, bytes): metrics subscribe to them.
  events: GatewayEvents
  retentionBytes: number
  // Output retained across all of one sandbox's execs, and across all sandboxes (see
  // RetentionBudget); unbounded when absent.
  retentionBytesPerSandbox?: number
  retentionBytesTotal?: number
  execTtlS: number
  closeWaitMs: number
  // Pending + running execs one sandbox may have: one tenant's runaway loop must not take the
  // gateway's memory and the sandbox's sshd down for everyone.
  maxRunningExecsPerSandbox?: number
  // How long a kept exec whose relay was lost may take to be reattached (§5 rule 4).
  reattachTimeoutMs?: number
  // During this long after the gateway starts, a request for an exec id it does not know waits
  // for the supervisors to report what their daemons keep (--session-wait-ms).
  sessionWaitMs?: number
  // Cluster mode: an exec this replica does not know may be one another replica ran and that
  // has finished (the directory keeps it); a read-only entry for it, or undefined.
  remoteLookup?: (execId: string) => Promise<ExecEntry | undefined>
  // Cluster mode: waits until the replica that held the sandbox has let go of its execs.
  beforeAdopt?: (sandboxId: string) => Promise<void>
  // ... and is told once they are rebuilt here.
  afterAdopt?: (sandboxId: string, execIds: string[]) => Promise<void>
  // Cluster mode: of these kept execs, those the cluster has already ended (a replica reported
  // their end, or the reaper ended them with 503 when their sandbox was away past the bound):
  // they are not rebuilt, since a second, later end would contradict the one clients were told.
  settled?: (execIds: string[]) => Promise<ReadonlySet<string>>
  // Cluster mode: a deleted exec is forgotten there too.
  forgetRemote?: (execId: string) => void
  // Cluster mode: at shutdown the execs the sandbox's daemon keeps are let go of without an
  // outcome (readers are told to reconnect), at once: another replica rebuilds them when their
  // sandbox reconnects there, or the cluster ends them with 503. This replica's shutting_down
  // would be a second, made-up end.
  handOffKeptOnClose?: boolean
  // The keeper's list and forget; the real ones unless a test injects its own.
  listKept?: (sandboxId: string, signal: AbortSignal) => Promise<KeptStatus[]>
  forgetKept?: (sandboxId: string, execId: string, signal: AbortSignal) => Promise<boolean>
}
