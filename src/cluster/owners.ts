import type { RedisArgument } from 'redis'

// Sandbox owner records: the shapes the scripts in scripts.ts read and write, and the parsing
// of their replies. One record per sandbox names the replica holding its supervisor session.

export interface Registration {
  sandboxId: string
  replicaId: string
  // The supervisor process; undefined for one that does not say (it always wins).
  instanceId: string | undefined
  sessionId: string
}

interface OwnerRef {
  replicaId: string
  sessionId: string
  fence: number
  instanceId: string | undefined
}

export interface OwnerRecord extends Registration {
  fence: number
  registeredAt: string
}

export interface OwnerView extends OwnerRecord {
  // The owner replica's heartbeat key exists. A record whose replica is not live is kept all
  // the same: only a registration replaces it (a Redis outage must never reap a sandbox).
  replicaLive: boolean
}

export type RegisterResult =
  | { ok: true, fence: number, previous: OwnerRef | undefined }
  | { ok: false, reason: 'superseded', owner: OwnerRef }

// What a replica remembers of its own registration, to put it back after Redis lost it.
export interface HeldRegistration extends OwnerRecord {
  // The processes this registration's sandbox had superseded: member, score pairs.
  superseded: string[]
}

export type RestoreOutcome = 'kept' | 'restored' | 'lost' | 'stale'

function str (v: unknown): string {
  return typeof v === 'string' ? v : ''
}

function ref (replicaId: unknown, sessionId: unknown, fence: unknown, instanceId: unknown): OwnerRef | undefined {
  if (str(fence) === '') return undefined
  return { replicaId: str(replicaId), sessionId: str(sessionId), fence: Number(fence), instanceId: str(instanceId) === '' ? undefined : str(instanceId) }
}

export function registerArgs (r: Registration, registeredAt: string, cap: number): RedisArgument[] {
  return [r.sandboxId, r.replicaId, r.instanceId ?? '', r.sessionId, registeredAt, String(cap)]
}

export function parseRegister (reply: unknown): { result: RegisterResult, superseded: string[] } {
  if (!Array.isArray(reply)) throw new TypeError(`unexpected register reply: ${String(reply)}`)
  const [status, a, b, c, d, e] = reply as unknown[]
  if (status === 'refused') {
    const owner = ref(b, c, d, e)
    if (owner === undefined) throw new TypeError('a refused registration came without an owner')
    return { result: { ok: false, reason: 'superseded', owner }, superseded: [] }
  }
  return {
    result: { ok: true, fence: Number(a), previous: ref(b, c, d, e) },
    superseded: (reply as unknown[]).slice(6).map(str)
  }
}

export function restoreArgs (h: HeldRegistration, cap: number): RedisArgument[] {
  return [h.sandboxId, h.replicaId, h.instanceId ?? '', h.sessionId, h.registeredAt, String(h.fence), String(cap), ...h.superseded]
}

export function parseOwner (hash: Record<string, string>): OwnerRecord | undefined {
  if (hash.fence === undefined || hash.sandboxId === undefined) return undefined
  return {
    sandboxId: hash.sandboxId,
    replicaId: hash.replicaId ?? '',
    instanceId: hash.instanceId === undefined || hash.instanceId === '' ? undefined : hash.instanceId,
    sessionId: hash.sessionId ?? '',
    fence: Number(hash.fence),
    registeredAt: hash.registeredAt ?? ''
  }
}
