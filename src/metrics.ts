import client from 'prom-client'
import { subscribeGateway, type GatewayEvents } from './diagnostics.js'
import { refusalReasons } from './refusals.js'

// Prometheus metrics of one gateway instance (its own registry, so tests can run several).
// Names and labels are part of what operators alert on: change them only with a note.
// Counters and histograms observe the gateway's lifecycle events (diagnostics.ts); gauges read
// the state they are given when scraped. Nothing in the core calls into this class: it only
// renders what it has seen.

// What the gauges read when scraped.
export interface MetricGauges {
  activeExecs: () => number
  sessions: () => number
  sandboxes: () => { connected: number, disconnected: number }
  retainedBytes: () => number
}

export class Metrics {
  readonly #registry = new client.Registry()
  readonly #unsubscribe: () => void

  constructor (gauges: MetricGauges, events: GatewayEvents) {
    const registers = [this.#registry]
    const execsStarted = new client.Counter({ name: 'exec_gateway_execs_started_total', help: 'execs created', registers })
    const execsEnded = new client.Counter({
      name: 'exec_gateway_execs_ended_total',
      help: 'execs ended, by outcome (exited or failed) and error code (empty when exited)',
      labelNames: ['outcome', 'code'] as const,
      registers
    })
    const relayFailures = new client.Counter({
      name: 'exec_gateway_relay_failures_total',
      help: 'relays and SSH connections to sandboxes that failed, by error code (relay_unavailable, relay_open_timeout, sandbox_unavailable, ssh_failed, ...)',
      labelNames: ['reason'] as const,
      registers
    })
    const relayOpen = new client.Histogram({
      name: 'exec_gateway_relay_open_seconds',
      help: 'time for a supervisor to open a relay stream',
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10],
      registers
    })
    const sshHandshake = new client.Histogram({
      name: 'exec_gateway_ssh_handshake_seconds',
      help: 'SSH handshake and authentication over a relay, by outcome',
      labelNames: ['outcome'] as const,
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers
    })
    const h2PingRtt = new client.Histogram({
      name: 'exec_gateway_h2_ping_rtt_seconds',
      help: 'HTTP/2 PING round trip to supervisors',
      buckets: [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5],
      registers
    })
    const bytes = new client.Counter({
      name: 'exec_gateway_exec_bytes_total',
      help: 'bytes relayed for execs: command output received (stdout, stderr) and input sent (stdin)',
      labelNames: ['stream'] as const,
      registers
    })
    const refusals = new client.Counter({
      name: 'exec_gateway_sandbox_refusals_total',
      help: 'messages, streams, connections and SSH packets from sandboxes (or unauthenticated peers) that the gateway refused, by reason',
      labelNames: ['reason'] as const,
      registers
    })
    // Every reason from zero, so that an alert on a rate sees the first refusal.
    for (const reason of refusalReasons) refusals.inc({ reason }, 0)
    this.#unsubscribe = subscribeGateway(events.id, {
      execCreated: () => execsStarted.inc(),
      execEnded: (m) => execsEnded.inc({ outcome: m.status, code: m.code ?? '' }),
      execBytes: (m) => bytes.inc({ stream: m.stream }, m.bytes),
      relayOpened: (m) => relayOpen.observe(m.seconds),
      sshHandshake: (m) => sshHandshake.observe({ outcome: m.outcome }, m.seconds),
      relayFailed: (m) => relayFailures.inc({ reason: m.reason }),
      pingRtt: (m) => h2PingRtt.observe(m.seconds),
      refusal: (m) => refusals.inc({ reason: m.reason })
    })
    // Gauges read their state when scraped; the registry holds them.
    const gauge = <T extends string>(config: client.GaugeConfiguration<T>): void => { this.#registry.registerMetric(new client.Gauge({ ...config, registers: [] })) }
    gauge({ name: 'exec_gateway_active_execs', help: 'execs not yet ended', collect () { this.set(gauges.activeExecs()) } })
    gauge({ name: 'exec_gateway_supervisor_sessions', help: 'connected supervisor sessions', collect () { this.set(gauges.sessions()) } })
    gauge({ name: 'exec_gateway_retained_bytes', help: 'exec output held for replays and results, across all sandboxes (bounded by --retention-bytes-total)', collect () { this.set(gauges.retainedBytes()) } })
    gauge({
      name: 'exec_gateway_sandboxes',
      help: 'known sandboxes by status',
      labelNames: ['status'] as const,
      collect () {
        const s = gauges.sandboxes()
        this.set({ status: 'connected' }, s.connected)
        this.set({ status: 'disconnected' }, s.disconnected)
      }
    })
    // Process health (CPU, memory, event loop lag, handles) next to the gateway's own numbers.
    client.collectDefaultMetrics({ register: this.#registry })
  }

  get contentType (): string { return this.#registry.contentType }

  async render (): Promise<string> { return await this.#registry.metrics() }

  // Stops observing; the registry still renders what was counted.
  close (): void { this.#unsubscribe() }
}
