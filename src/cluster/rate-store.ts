import type { Directory } from './directory.js'

// The exec rate limit (--exec-rate-limit-per-minute) counted across the cluster: a store for
// @fastify/rate-limit that keeps each token's window in the directory, so N replicas admit the
// limit once, not N times. While Redis does not answer, each replica counts on its own (the
// limit then holds per replica) rather than refusing or admitting everything.

type Incr = (key: string, cb: (err: Error | null, res?: { current: number, ttl: number }) => void, timeWindow: number, max: number) => void

// What @fastify/rate-limit passes to child(): a route's limiter, or a shared one (no route).
interface LimiterParams { groupId?: string, routeInfo: { method?: string, url?: string } }

interface LocalWindow { count: number, until: number }
// Local windows are dropped as they expire; this many at most are held (per-token keys).
const LOCAL_MAX_KEYS = 100_000

export function clusterRateStore (directory: () => Directory): new (options: unknown) => { incr: Incr, child: (params: LimiterParams) => unknown } {
  class ClusterRateStore {
    readonly #prefix: string
    readonly #local = new Map<string, LocalWindow>()

    constructor (_options: unknown, prefix = '') {
      this.#prefix = prefix
    }

    incr (key: string, cb: (err: Error | null, res?: { current: number, ttl: number }) => void, timeWindow: number): void {
      const k = this.#prefix + key
      directory().rateHit(k, timeWindow).then((r) => { cb(null, r) }, () => { cb(null, this.#localHit(k, timeWindow)) })
    }

    // A limiter shared by routes (app.rateLimit()) has no route of its own: its groupId names it.
    child (params: LimiterParams): ClusterRateStore {
      return new ClusterRateStore(undefined, `${params.groupId ?? `${params.routeInfo.method ?? ''}${params.routeInfo.url ?? ''}`}:`)
    }

    #localHit (key: string, windowMs: number): { current: number, ttl: number } {
      const now = Date.now()
      let w = this.#local.get(key)
      if (w === undefined || w.until <= now) {
        if (this.#local.size >= LOCAL_MAX_KEYS) for (const [k, v] of this.#local) if (v.until <= now) this.#local.delete(k)
        w = { count: 0, until: now + windowMs }
        this.#local.set(key, w)
      }
      w.count++
      return { current: w.count, ttl: w.until - now }
    }
  }
  return ClusterRateStore
}
