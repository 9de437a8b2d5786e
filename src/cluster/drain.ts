import { setTimeout as sleep } from 'node:timers/promises'
import type { Logger } from 'pino'
import type { SessionRegistry, SupervisorSession } from '../relay/sessions.js'

// SIGTERM of a replica in cluster mode, before any exec is touched: /readyz already says
// draining, so the load balancer stops sending new connections here; once it has noticed, each
// supervisor is told to move. It opens its new session through the load balancer (landing on
// another replica, which rebuilds its kept execs) before it leaves this one; this replica's
// claim check then hands those execs over. Resolves when every session that can move has gone,
// or at the bound.

export interface DrainOptions {
  registry: SessionRegistry
  logger: Logger
  // How long the load balancer may take to see /readyz 503 (HAProxy's checks: under a second).
  balancerWaitMs: number
  boundMs: number
  // Sessions that cannot go elsewhere (the in-process local sandbox's).
  stays: (session: SupervisorSession) => boolean
}

// Moves are spread, so a replica with thousands of supervisors does not send them all to the
// others at once; a supervisor still here after MOVE_AGAIN_MS is told again.
const MOVE_SPACING_MS = 20
const MOVE_AGAIN_MS = 2000
const POLL_MS = 100

export async function drainSessions (o: DrainOptions): Promise<void> {
  o.registry.stopAccepting()
  const deadline = performance.now() + o.boundMs
  await sleep(Math.min(o.balancerWaitMs, o.boundMs))
  const told = new Map<SupervisorSession, number>()
  for (;;) {
    const left = o.registry.sessions().filter((s) => !o.stays(s))
    if (left.length === 0) {
      o.logger.info('every supervisor moved to another replica')
      return
    }
    if (performance.now() >= deadline) {
      o.logger.warn({ sandboxes: left.map((s) => s.sandboxId).slice(0, 20), count: left.length }, 'supervisors still here at the end of the drain; their execs end with this replica')
      return
    }
    for (const s of left) {
      const at = told.get(s)
      if (at !== undefined && performance.now() - at < MOVE_AGAIN_MS) continue
      told.set(s, performance.now())
      s.send({ type: 'move' })
      await sleep(MOVE_SPACING_MS)
    }
    await sleep(POLL_MS)
  }
}
