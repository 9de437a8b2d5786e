import { createHmac, hkdfSync, timingSafeEqual } from 'node:crypto'
import type { IncomingHttpHeaders } from 'node:http'
import type { GatewayIdentity } from '../data-dir.js'

// Replicas authenticate each other with a key derived from the data dir's token secret, which
// every replica shares: the token secret itself never leaves the process, and a leaked replica
// key cannot sign supervisor tokens. During a token secret rotation replicas may briefly hold
// different current secrets, so every accepted secret yields an accepted key.

export const REPLICA_AUTH_HEADER = 'x-exec-gateway-replica-auth'

const LABEL = 'exec-gateway replica auth v1'
const SCHEME = 'egw-replica '

export interface ReplicaSecret {
  // Sent on requests to other replicas.
  readonly current: Buffer
  // Accepted from other replicas (the current key first).
  readonly accepted: readonly Buffer[]
}

function derive (tokenSecret: Buffer): Buffer {
  return Buffer.from(hkdfSync('sha256', tokenSecret, Buffer.alloc(0), LABEL, 32))
}

export function deriveReplicaSecret (identity: Pick<GatewayIdentity, 'tokenSecret' | 'tokenSecrets'>): ReplicaSecret {
  const current = derive(identity.tokenSecret)
  const accepted = [current, ...identity.tokenSecrets.filter((s) => !s.equals(identity.tokenSecret)).map(derive)]
  return { current, accepted }
}

export function replicaAuthHeader (secret: ReplicaSecret): Record<string, string> {
  return { [REPLICA_AUTH_HEADER]: SCHEME + secret.current.toString('base64url') }
}

// Compared as HMACs of equal length, so neither the length nor the content of a wrong value
// shows in the timing.
export function verifyReplicaAuth (secret: ReplicaSecret, headers: IncomingHttpHeaders): boolean {
  const given = headers[REPLICA_AUTH_HEADER]
  if (typeof given !== 'string') return false
  const g = createHmac('sha256', LABEL).update(given).digest()
  let ok = false
  for (const key of secret.accepted) {
    const w = createHmac('sha256', LABEL).update(SCHEME + key.toString('base64url')).digest()
    if (timingSafeEqual(g, w)) ok = true
  }
  return ok
}
