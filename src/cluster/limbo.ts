import type { Directory } from './directory.js'
import { incarnationOf } from './reads.js'

// Execs in limbo: still in the running set of a replica process that is gone, rebuilt by no
// replica and ended by none yet. Nobody knows their state until their sandbox reconnects to a
// replica that rebuilds them, or the reaper ends them with 503: to a client that is a 503 to
// retry, never a 404 (which would say the exec was lost).

// The running sets of processes that are gone: not a live replica's, and not this one's.
async function goneSets (dir: Directory): Promise<string[]> {
  const live = new Set((await dir.replicas()).map((r) => incarnationOf(r)))
  live.add(dir.incarnation)
  return (await dir.runningSets()).filter((inc) => !live.has(inc))
}

// Where an exec this process does not hold is, when it is unfinished but nobody here can say
// more: 'leaving' when this process let go of it (a shutdown hands kept execs on to their
// sandbox's next replica, and until that one has rebuilt them the directory still names this
// one), 'elsewhere' when a live replica holds it now (whoever asked here had an older answer),
// 'gone' when the gone process that last ran it still lists it. Undefined when it is none of
// these (unknown, deleted, or ended and reaped: the finished record says so).
export async function limboReplica (dir: Directory, execId: string): Promise<{ replicaId: string, state: 'leaving' | 'elsewhere' | 'gone' } | undefined> {
  const owner = await dir.execOwner(execId)
  if (owner === undefined) return undefined
  // Under this replica's id but not in this process's set: a predecessor's, looked for below.
  const mine = owner.replicaId === dir.replicaId
  if (mine && await dir.isRunningIn(dir.incarnation, execId)) return { replicaId: owner.replicaId, state: 'leaving' }
  if (!mine && await dir.replica(owner.replicaId) !== undefined) return { replicaId: owner.replicaId, state: 'elsewhere' }
  for (const inc of await goneSets(dir)) {
    if (inc.startsWith(`${owner.replicaId}@`) && await dir.isRunningIn(inc, execId)) return { replicaId: owner.replicaId, state: 'gone' }
  }
  return undefined
}

// The records those processes last wrote of their execs, for the cluster's list.
export async function limboRecords (dir: Directory, filter: { sandboxId?: string | undefined, status?: string | undefined }): Promise<Array<Record<string, unknown>>> {
  const out: Array<Record<string, unknown>> = []
  for (const inc of await goneSets(dir)) {
    for (const record of (await dir.runningOf(inc)).values()) {
      if (typeof record !== 'object' || record === null) continue
      const r = record as Record<string, unknown>
      if ((filter.sandboxId === undefined || r.sandboxId === filter.sandboxId) && (filter.status === undefined || r.status === filter.status)) out.push(r)
    }
  }
  return out
}
