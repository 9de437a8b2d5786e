// Which outcomes each fault may honestly cause, by the daemon behind the sandbox (docs/api.md §5
// rule 4). The embedded daemon keeps its execs: a connection reset, a stop or blackhole short
// enough for the reattach, and a gateway restart must all end with the true exit. Only its
// supervisor's death (SIGKILL: the daemon dies with it) is an honest 503. OpenSSH keeps nothing:
// any relay loss is an honest 503, and a gateway restart loses its execs.
import { KEPT_AFTER_MS, SHORT_FAULT_MS } from './knobs.js'
import type { Fault } from './world.js'

export type Daemon = 'embedded' | 'openssh'
// What may end an exec besides its true exit, which every fault allows (the exec may end
// before the fault bites, or the fault may be bridged).
export interface Allowed { 503: boolean, lost: boolean }

// startedAt: when the exec started on its sandbox, as the gateway said (for a gateway restart
// or a replica fault, just before it); undefined when it had not started.
export function allowedBy (f: Fault, daemon: Daemon, startedAt: number | undefined, sandbox: string): Allowed {
  if (f.kind === 'replica-kill' || f.kind === 'replica-restart') return byReplicaFault(f, daemon, startedAt, sandbox)
  if (daemon === 'openssh') return { 503: f.kind !== 'gateway-restart', lost: f.kind === 'gateway-restart' }
  // The daemon keeps an exec from its start; one not started yet had nothing to keep.
  const unkept = startedAt === undefined || startedAt > f.start - KEPT_AFTER_MS
  switch (f.kind) {
    case 'kill': return { 503: true, lost: false }
    case 'stop':
    case 'blackhole': return { 503: unkept || f.durationMs > SHORT_FAULT_MS, lost: false }
    case 'gateway-restart': return { 503: false, lost: unkept }
    default: return { 503: unkept, lost: false }
  }
}

// Cluster mode. A replica fault touches only the sandboxes the replica held (others: true only,
// though their readers and POSTs through it are cut and resume). Killed: the new owner rebuilds
// the embedded daemon's kept execs, so only unstarted ones may be lost (or 503 while the sandbox
// moves); OpenSSH execs died with it. Drained: kept execs move and go on; OpenSSH execs end true
// within the grace, else 503 shutting_down / relay_unavailable; a POST that landed while the
// sandbox was moving, before its command started, may end 503 sandbox_unavailable.
// Any sandbox: a POST that landed on the faulted replica and was cut before it reached the
// sandbox's owner created nothing, so an exec that had not started may be lost.
function byReplicaFault (f: Fault, daemon: Daemon, startedAt: number | undefined, sandbox: string): Allowed {
  const unkept = startedAt === undefined || startedAt > f.start - KEPT_AFTER_MS
  if (f.sandboxes?.includes(sandbox) !== true) return { 503: false, lost: unkept }
  if (daemon === 'openssh') return { 503: true, lost: f.kind === 'replica-kill' || unkept }
  return { 503: unkept, lost: unkept }
}

// What the table shows as expected for a fault kind on a daemon.
export function expectedText (kind: Fault['kind'] | 'none', daemon: Daemon): string {
  if (kind === 'none') return 'true'
  if (kind === 'replica-kill') return daemon === 'openssh' ? 'true|503 (held)|lost (held; unstarted)' : 'true|503 (held, unstarted)|lost (unstarted)'
  if (kind === 'replica-restart') return daemon === 'openssh' ? 'true|503 (held)|lost (unstarted)' : 'true|503 (held, unstarted)|lost (unstarted)'
  if (daemon === 'openssh') return kind === 'gateway-restart' ? 'true|lost' : 'true|503'
  if (kind === 'kill') return 'true|503'
  if (kind === 'stop' || kind === 'blackhole') return `true (≤${SHORT_FAULT_MS} ms)|503`
  if (kind === 'gateway-restart') return 'true|lost (unstarted)'
  return 'true|503 (unstarted)'
}

// An exit status could not have reached the gateway through this fault while the command was
// still sleeping: its relay died with a SIGKILLed supervisor, or (OpenSSH, nothing kept) its
// connection was reset or its gateway SIGKILLed.
export const cutsTheRelay = (f: Fault, daemon: Daemon, sandbox: string): boolean =>
  f.kind === 'kill' || (daemon === 'openssh' && (f.kind === 'reset' || f.kind === 'gateway-restart' || (f.kind === 'replica-kill' && f.sandboxes?.includes(sandbox) === true)))

// A fault the gateway had to detect and act on: an exit through it that lasted longer than the
// detection bound means the relay was not cut. On the embedded daemon a stop or blackhole is
// bridged by the reattach instead, so an exit through it is expected.
export const mustCut = (f: Fault, daemon: Daemon): boolean =>
  daemon === 'openssh' && (f.kind === 'stop' || f.kind === 'blackhole' || f.kind === 'wedge')
