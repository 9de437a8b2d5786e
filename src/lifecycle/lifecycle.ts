import type { Logger } from 'pino'
import type { Readiness } from '../schemas/health.js'

// The gateway's one lifecycle state, and the one shutdown sequence that moves it. Nothing else
// keeps a "closing" flag for the gateway: /readyz reports the readiness ('ready' once both
// listeners are up, 'draining' from the first phase of shutdown on), the public listener
// refuses requests once the shutdown reaches it, and listen() only turns 'ready' while starting.

// The shutdown, in order. Each phase begins when the one before has ended, and every phase is
// bounded (its step's own bound, or lifecycle/bounds.ts), so the whole is.
export const SHUTDOWN_PHASES = [
  // /readyz turns 503: load balancers stop sending new work.
  'draining',
  // No new execs; running ones get --shutdown-grace-ms to end, then end with shutting_down.
  'execs',
  // Relays still being opened fail, pooled SSH connections close.
  'relays',
  // Supervisor sessions are told to end; waiters for a session or a relay fail.
  'sessions',
  // The embedded supervisor of the local sandbox (and its SSH daemon) stops.
  'local-supervisor',
  // Cluster mode: the sandboxes this replica held are given up in the directory and its
  // heartbeat goes, so other replicas stop forwarding here (bounded by the directory's calls).
  'cluster',
  // Both listeners, side by side. Public: requests are answered 503 shutting_down, WebSockets
  // are closed with 1001 within a bound, connections are closed. Supervisor: GOAWAY to every
  // connection, and what has not gone within a bound is cut. Last but for the observers, so
  // that the results of the execs ended above have time to reach their callers.
  'listeners',
  // Observers last, so that everything above is still counted: refusals flush their summary,
  // metrics unsubscribe.
  'observers'
] as const

export type ShutdownPhase = typeof SHUTDOWN_PHASES[number]

// One step per phase; a phase with nothing to do says so with a no-op.
export type ShutdownSteps = Record<ShutdownPhase, () => unknown>

export class Lifecycle {
  #ready = false
  // The phase under way (or the last one, once done); undefined before shutdown.
  #phase: ShutdownPhase | undefined
  #shutdown: Promise<void> | undefined

  get readiness (): Readiness {
    if (this.#phase !== undefined) return 'draining'
    return this.#ready ? 'ready' : 'starting'
  }

  get shuttingDown (): boolean { return this.#phase !== undefined }

  // True once the shutdown has begun `phase` (or gone past it).
  reached (phase: ShutdownPhase): boolean {
    return this.#phase !== undefined && SHUTDOWN_PHASES.indexOf(this.#phase) >= SHUTDOWN_PHASES.indexOf(phase)
  }

  // Listening: ready, unless shutdown began while starting.
  markReady (): void {
    if (this.#phase === undefined) this.#ready = true
  }

  // Runs every phase in order, once: a second call gets the first call's promise. A step that
  // throws is logged and the sequence goes on, so shutdown always resolves.
  async shutdown (steps: ShutdownSteps, log: Logger): Promise<void> {
    this.#shutdown ??= this.#run(steps, log)
    await this.#shutdown
  }

  async #run (steps: ShutdownSteps, log: Logger): Promise<void> {
    for (const phase of SHUTDOWN_PHASES) {
      this.#phase = phase
      const started = performance.now()
      try {
        await steps[phase]()
      } catch (err) {
        log.error({ err, phase }, 'shutdown phase failed; going on with the next')
      }
      log.debug({ phase, ms: Math.round(performance.now() - started) }, 'shutdown phase done')
    }
  }
}
