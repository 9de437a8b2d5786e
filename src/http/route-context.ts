import type { FastifyReply, FastifyRequest } from 'fastify'
import type { Encoding } from '../execs/exec-entry.js'
import type { ExecManager } from '../execs/manager.js'
import type { SessionRegistry } from '../relay/sessions.js'
import type { Metrics } from '../metrics.js'
import type { Readiness } from '../schemas/health.js'

// What route plugins get from the gateway: they talk to execs and the registry, never to ssh2.
// Defined here, not in routes/, so that src/ needs nothing from routes/ but registerRoutes.
export interface RouteContext {
  execs: ExecManager
  registry: SessionRegistry
  metrics: Metrics
  heartbeatIntervalMs: number
  // The data dir's token secrets, the signing one first: read tokens are minted with it.
  tokenSecrets: () => readonly Buffer[]
  // Exec creations per token (per client address without tokens) per minute; 0 = unlimited.
  execRateLimitPerMinute: number
  // 'ready' once both listeners are up (and the embedded sandbox with them); 'draining' from
  // the first step of shutdown. /readyz answers from it, for load balancers.
  readiness: () => Readiness
  // Cluster mode: the new exec is recorded as this replica's before the client hears of it, so
  // a request for it on any replica that follows the answer finds it.
  recordExec?: ((execId: string, sandboxId: string) => Promise<void>) | undefined
  // Cluster mode: a ?wait=true whose exec moved to another replica gets its answer from there.
  waitElsewhere?: ((execId: string, encoding: Encoding, request: FastifyRequest, reply: FastifyReply) => Promise<FastifyReply>) | undefined
  // Cluster mode: another replica took this sandbox (internal route): let go of it now.
  sandboxMoved?: ((sandboxId: string) => Promise<void>) | undefined
  // The internal listener: its own routes (routes/internal.ts) as well.
  internal?: boolean | undefined
}
