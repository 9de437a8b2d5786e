import client from 'prom-client'

// Prometheus metrics of one gateway instance (its own registry, so tests can run several).
export class Metrics {
  readonly registry = new client.Registry()
  readonly execsStarted = new client.Counter({ name: 'exec_gateway_execs_started_total', help: 'execs created', registers: [this.registry] })
  readonly execsEnded = new client.Counter({ name: 'exec_gateway_execs_ended_total', help: 'execs ended, by outcome', labelNames: ['outcome', 'code'] as const, registers: [this.registry] })
  readonly h2PingRtt = new client.Histogram({ name: 'exec_gateway_h2_ping_rtt_seconds', help: 'HTTP/2 PING round trip to supervisors', buckets: [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5], registers: [this.registry] })

  constructor (gauges: { activeExecs: () => number, sessions: () => number }) {
    new client.Gauge({ name: 'exec_gateway_active_execs', help: 'execs not yet ended', registers: [this.registry], collect () { this.set(gauges.activeExecs()) } })
    new client.Gauge({ name: 'exec_gateway_supervisor_sessions', help: 'connected supervisor sessions', registers: [this.registry], collect () { this.set(gauges.sessions()) } })
  }

  get contentType (): string { return this.registry.contentType }
  async render (): Promise<string> { return await this.registry.metrics() }
}
