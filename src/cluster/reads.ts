import type { DirectoryKeys } from './keys.js'
import { parseOwner, type OwnerRecord, type OwnerView } from './owners.js'
import type { RedisCall } from './redis-client.js'

// The directory's whole-cluster reads. SCAN, not KEYS: it never blocks Redis for the whole
// keyspace; each step is one bounded round trip, and values are read in batches of the same size.

type Call = <T>(op: string, run: RedisCall<T>) => Promise<T>

export interface ReplicaInfo {
  replicaId: string
  internalUrl: string
  publicUrl: string
  startedAt: string
}

// A replica process: its id and when it started (a restart under the same id is a new one).
export function incarnationOf (r: Pick<ReplicaInfo, 'replicaId' | 'startedAt'>): string {
  return `${r.replicaId}@${r.startedAt}`
}

const BATCH = 500

async function scanKeys (call: Call, op: string, pattern: string): Promise<string[]> {
  const keys = new Set<string>()
  let cursor = '0'
  do {
    const step = cursor
    const res = await call(op, (c) => c.scan(step, { MATCH: pattern, COUNT: BATCH }))
    // SCAN may return a key more than once.
    for (const k of res.keys) keys.add(k)
    cursor = res.cursor
  } while (cursor !== '0')
  return [...keys]
}

async function mGetAll (call: Call, op: string, keys: string[]): Promise<Array<string | null>> {
  const out: Array<string | null> = []
  for (let i = 0; i < keys.length; i += BATCH) {
    const batch = keys.slice(i, i + BATCH)
    out.push(...await call(op, (c) => c.mGet(batch)))
  }
  return out
}

export async function readRunningSets (call: Call, keys: DirectoryKeys): Promise<string[]> {
  return (await scanKeys(call, 'runningSets', keys.runningPattern)).map((k) => keys.incarnationOf(k))
}

export async function readReplicas (call: Call, keys: DirectoryKeys): Promise<ReplicaInfo[]> {
  const values = await mGetAll(call, 'replicas', await scanKeys(call, 'replicas', keys.replicaPattern))
  // A heartbeat that expired between SCAN and MGET reads as null: that replica is gone.
  const out = values.filter((v) => v !== null).map((v) => JSON.parse(v) as ReplicaInfo)
  return out.sort((a, b) => a.replicaId.localeCompare(b.replicaId))
}

export async function readOwners (call: Call, keys: DirectoryKeys): Promise<OwnerView[]> {
  const ownerKeys = await scanKeys(call, 'owners', keys.ownerPattern)
  const records: OwnerRecord[] = []
  for (let i = 0; i < ownerKeys.length; i += BATCH) {
    const batch = ownerKeys.slice(i, i + BATCH)
    const hashes = await call('owners', (c) => {
      const m = c.multi()
      for (const k of batch) m.hGetAll(k)
      return m.execAsPipeline()
    })
    for (const h of hashes) {
      const record = parseOwner(h as unknown as Record<string, string>)
      if (record !== undefined) records.push(record)
    }
  }
  const replicaIds = [...new Set(records.map((r) => r.replicaId))]
  const beats = await mGetAll(call, 'owners', replicaIds.map((id) => keys.replica(id)))
  const live = new Set(replicaIds.filter((_id, j) => beats[j] !== null))
  return records.map((r) => ({ ...r, replicaLive: live.has(r.replicaId) })).sort((a, b) => a.sandboxId.localeCompare(b.sandboxId))
}
