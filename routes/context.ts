import type { ExecManager } from '../src/execs/manager.js'
import type { SessionRegistry } from '../src/relay/sessions.js'
import type { Metrics } from '../src/metrics.js'
import type { WebSocket } from 'ws'

// What route plugins get from the gateway: they talk to execs and the registry, never to ssh2.
export interface RouteContext {
  execs: ExecManager
  registry: SessionRegistry
  metrics: Metrics
  heartbeatIntervalMs: number
  // Exec creations per token (per client address without tokens) per minute; 0 = unlimited.
  execRateLimitPerMinute: number
  // Open WebSockets, closed with 1001 on shutdown.
  sockets: Set<WebSocket>
  // 'ready' once both listeners are up (and the embedded sandbox with them); 'draining' from
  // the first step of shutdown. /readyz answers from it, for load balancers.
  readiness: () => Readiness
}

export type Readiness = 'starting' | 'ready' | 'draining'
