import type { Logger } from 'pino'
import type { GatewayEvents } from './diagnostics.js'

// Everything a sandbox (or an unauthenticated peer of the supervisor listener) sends that the
// gateway refuses goes through here: counted by reason, published as a lifecycle event (which
// metrics observe), and logged at a rate the sandbox cannot raise. A hostile sandbox can make
// refusals as fast as it can send bytes; a synchronous log line per refusal would turn two
// bytes in into two hundred out and stall the event loop that every other sandbox shares.

export const refusalReasons = [
  // Supervisor listener and session stream.
  'bad_message', // a session line that is not JSON or not a valid message
  'line_too_long', // an unfinished session line over --session-line-max-bytes
  'message_rate', // session messages over --session-messages-per-second
  'session_streams', // more session streams than --max-session-streams-per-sandbox
  'handler_error', // a handler threw on a decoded message: the session is ended
  'unauthenticated', // a stream without a valid token
  'unknown_route', // a stream for a path or method the listener does not serve
  'unclaimed_relay', // a relay stream nobody asked for (or another sandbox's)
  'refused_streams', // a connection closed for too many refused streams
  'auth_timeout', // a connection closed for not authenticating in time
  'connection_limit', // a connection closed because too many are unauthenticated
  'superseded_instance', // a replaced supervisor process trying to take its sandbox back
  'session_backlog', // a supervisor that leaves its session stream unread: the session is ended
  'stream_limit', // more concurrent streams on one connection than --supervisor-max-streams-per-connection
  'frame_flood', // PING or SETTINGS frames over the per-connection budget: the connection is closed
  'sandbox_connections', // a connection closed because its sandbox already holds --max-session-streams-per-sandbox
  'address_penalty', // a connection dropped at once: its address was just closed for abuse (at most a second)
  // The sandbox's SSH daemon.
  'window_overrun', // channel data beyond the window the gateway granted
  'rekey_rate', // key exchanges over --ssh-max-rekeys-per-minute
  'channel_open', // a channel the gateway did not ask for
  'unknown_channel', // a packet for a channel that is not open
  'bad_exit_report', // an exit-signal outside the SSH grammar, or a report on a closed channel
  'duplicate_exit', // a second exit report for one channel (the first stands)
  'protocol_error' // any other SSH protocol violation that ended a connection
] as const

export type RefusalReason = typeof refusalReasons[number]

export interface RefusalsOptions {
  logger: Logger
  // Each refusal is published here, by reason.
  events: GatewayEvents
  // Log lines one key (a sandbox, or all unauthenticated peers together) may cause per minute.
  linesPerMinute: number
}

interface Bucket { tokens: number, at: number, suppressed: Map<RefusalReason, number> }

// Key for refusals that no sandbox can be blamed for (no valid token yet).
const UNAUTHENTICATED = '(unauthenticated)'
const SUMMARY_INTERVAL_MS = 10_000
// Keys remembered at once; beyond it the least recently refused are forgotten (they only lose
// their place in the rate limit, never a count).
const MAX_KEYS = 10_000

export class Refusals {
  readonly #opts: RefusalsOptions
  readonly #counts = new Map<RefusalReason, number>()
  readonly #buckets = new Map<string, Bucket>()
  #summaryTimer: NodeJS.Timeout | undefined

  constructor (opts: RefusalsOptions) {
    this.#opts = opts
  }

  // Counts the refusal, and logs it at warn unless the key used up its lines for now; those
  // that are not logged are summarised (per key and reason) at the next allowed line or within
  // ten seconds. `fields` must hold nothing unbounded: callers pass lengths, not payloads.
  refuse (reason: RefusalReason, key: string | undefined, message: string, fields: Record<string, unknown> = {}): void {
    this.#counts.set(reason, (this.#counts.get(reason) ?? 0) + 1)
    this.#opts.events.refusal({ reason })
    const k = key ?? UNAUTHENTICATED
    const bucket = this.#bucket(k)
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1
      const suppressed = bucket.suppressed.size === 0 ? undefined : Object.fromEntries(bucket.suppressed)
      bucket.suppressed.clear()
      this.#opts.logger.warn({ sandboxId: key, reason, ...fields, ...(suppressed === undefined ? {} : { suppressed }) }, message)
      return
    }
    bucket.suppressed.set(reason, (bucket.suppressed.get(reason) ?? 0) + 1)
    this.#armSummary()
  }

  count (reason: RefusalReason): number { return this.#counts.get(reason) ?? 0 }

  counts (): ReadonlyMap<RefusalReason, number> { return this.#counts }

  close (): void {
    clearInterval(this.#summaryTimer)
    this.#summaryTimer = undefined
    this.#flush()
  }

  #bucket (key: string): Bucket {
    const perMinute = this.#opts.linesPerMinute
    const now = performance.now()
    let b = this.#buckets.get(key)
    if (b === undefined) {
      if (this.#buckets.size >= MAX_KEYS) this.#buckets.delete(this.#buckets.keys().next().value!)
      b = { tokens: perMinute, at: now, suppressed: new Map() }
    } else {
      b.tokens = Math.min(perMinute, b.tokens + (now - b.at) * perMinute / 60_000)
      b.at = now
      // Re-inserted so that the map's order is least recently refused first.
      this.#buckets.delete(key)
    }
    this.#buckets.set(key, b)
    return b
  }

  #armSummary (): void {
    if (this.#summaryTimer !== undefined) return
    this.#summaryTimer = setInterval(() => {
      if (!this.#flush()) { clearInterval(this.#summaryTimer); this.#summaryTimer = undefined }
    }, SUMMARY_INTERVAL_MS)
    this.#summaryTimer.unref()
  }

  // One line per key with suppressed refusals; false when there was nothing to say.
  #flush (): boolean {
    let any = false
    for (const [key, b] of this.#buckets) {
      if (b.suppressed.size === 0) continue
      any = true
      this.#opts.logger.warn({ sandboxId: key === UNAUTHENTICATED ? undefined : key, suppressed: Object.fromEntries(b.suppressed) }, 'refusals not logged one by one (rate limit)')
      b.suppressed.clear()
    }
    return any
  }
}
