import type { IncomingHttpHeaders, IncomingMessage, OutgoingHttpHeaders } from 'node:http'
import { replicaAuthHeader, type ReplicaSecret } from './replica-auth.js'

// The headers of a request forwarded to its owner replica, and of the answer coming back: the
// one place that decides what crosses a hop (HTTP and WebSocket alike).

// Set on every forwarded request to the name of the replica that forwarded it. A request that
// carries it is served where it lands or refused, never forwarded again: two replicas that
// briefly disagree on an owner must not bounce a request between them.
export const FORWARDED_BY_HEADER = 'x-exec-gateway-forwarded-by'

// Set by a replica on its 503 to a forwarded new exec when the sandbox has another owner by
// now (it moved while the request was on its way): nothing was created, and the forwarding
// replica asks the directory again instead of passing the 503 on.
export const NOT_OWNER_HEADER = 'x-exec-gateway-not-owner'

// Set, to the exec's id, on a replica's 503 to a forwarded ?wait=true whose exec moved on with
// its sandbox: the forwarding replica waits for the exec where it is now. The replica the exec
// left may be draining and about to exit, so it must not stand in the middle of that wait.
export const EXEC_MOVED_HEADER = 'x-exec-gateway-exec-moved'

// RFC 9110 §7.6.1, plus the headers that name a connection's own framing.
const HOP_BY_HOP = new Set([
  'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization', 'proxy-connection',
  'te', 'trailer', 'transfer-encoding', 'upgrade', 'http2-settings'
])

export interface ForwardIdentity {
  replicaId: string
  secret: ReplicaSecret
}

export function isForwarded (headers: IncomingHttpHeaders): boolean {
  return headers[FORWARDED_BY_HEADER] !== undefined
}

// Hop-by-hop headers, and any a Connection header names, are dropped.
export function endToEndHeaders (headers: IncomingHttpHeaders, drop: readonly string[] = []): OutgoingHttpHeaders {
  const named = new Set(String(headers.connection ?? '').toLowerCase().split(',').map((s) => s.trim()).filter((s) => s !== ''))
  const out: OutgoingHttpHeaders = {}
  for (const [name, value] of Object.entries(headers)) {
    if (value === undefined || HOP_BY_HOP.has(name) || named.has(name) || drop.includes(name)) continue
    out[name] = value
  }
  return out
}

// What the owner receives: the client's end-to-end headers without Host (the owner's address is
// the target's), the client's address appended to X-Forwarded-For, the replica auth and the
// forwarded-by marker.
export function forwardRequestHeaders (req: IncomingMessage, who: ForwardIdentity, drop: readonly string[] = []): OutgoingHttpHeaders {
  const out = endToEndHeaders(req.headers, ['host', 'x-forwarded-for', ...drop])
  const prior = req.headers['x-forwarded-for']
  const client = req.socket.remoteAddress ?? 'unknown'
  out['x-forwarded-for'] = prior === undefined ? client : `${String(prior)}, ${client}`
  return { ...out, ...replicaAuthHeader(who.secret), [FORWARDED_BY_HEADER]: who.replicaId }
}

// The problem a replica answers with when the owner cannot be reached (or the request was
// already forwarded once). The code is proposed for src/errors.ts; until it is there, callers
// pass their own builder (forward-http's `unavailable` option) and this one is the default.
export interface ForwardProblem {
  type: string
  title: string
  status: number
  detail: string
  code: string
}

export function replicaUnavailable (detail: string): ForwardProblem {
  return { type: 'https://exec-gateway.dev/problems/replica-unavailable', title: 'Replica unavailable', status: 503, detail, code: 'replica_unavailable' }
}
