import client from 'prom-client'
import { refusalReasons, type Refusals } from './refusals.js'

// Prometheus metrics of one gateway instance (its own registry, so tests can run several).
// Names and labels are part of what operators alert on: change them only with a note.
export class Metrics {
  readonly registry = new client.Registry()
  readonly execsStarted = new client.Counter({ name: 'exec_gateway_execs_started_total', help: 'execs created', registers: [this.registry] })
  readonly execsEnded = new client.Counter({
    name: 'exec_gateway_execs_ended_total',
    help: 'execs ended, by outcome (exited or failed) and error code (empty when exited)',
    labelNames: ['outcome', 'code'] as const,
    registers: [this.registry]
  })
  readonly relayFailures = new client.Counter({
    name: 'exec_gateway_relay_failures_total',
    help: 'relays and SSH connections to sandboxes that failed, by error code (relay_unavailable, relay_open_timeout, sandbox_unavailable, ssh_failed, ...)',
    labelNames: ['reason'] as const,
    registers: [this.registry]
  })
  readonly relayOpen = new client.Histogram({
    name: 'exec_gateway_relay_open_seconds',
    help: 'time for a supervisor to open a relay stream',
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10],
    registers: [this.registry]
  })
  readonly sshHandshake = new client.Histogram({
    name: 'exec_gateway_ssh_handshake_seconds',
    help: 'SSH handshake and authentication over a relay, by outcome',
    labelNames: ['outcome'] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [this.registry]
  })
  readonly h2PingRtt = new client.Histogram({
    name: 'exec_gateway_h2_ping_rtt_seconds',
    help: 'HTTP/2 PING round trip to supervisors',
    buckets: [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5],
    registers: [this.registry]
  })
  readonly bytes = new client.Counter({
    name: 'exec_gateway_exec_bytes_total',
    help: 'bytes relayed for execs: command output received (stdout, stderr) and input sent (stdin)',
    labelNames: ['stream'] as const,
    registers: [this.registry]
  })

  readonly refusals = new client.Counter({
    name: 'exec_gateway_sandbox_refusals_total',
    help: 'messages, streams, connections and SSH packets from sandboxes (or unauthenticated peers) that the gateway refused, by reason',
    labelNames: ['reason'] as const,
    registers: [this.registry]
  })

  constructor (gauges: { activeExecs: () => number, sessions: () => number, sandboxes: () => { connected: number, disconnected: number }, retainedBytes: () => number }, refusals?: Refusals) {
    // Every reason from zero, so that an alert on a rate sees the first refusal.
    for (const reason of refusalReasons) this.refusals.inc({ reason }, 0)
    refusals?.observe((reason) => this.refusals.inc({ reason }))
    new client.Gauge({ name: 'exec_gateway_active_execs', help: 'execs not yet ended', registers: [this.registry], collect () { this.set(gauges.activeExecs()) } })
    new client.Gauge({ name: 'exec_gateway_supervisor_sessions', help: 'connected supervisor sessions', registers: [this.registry], collect () { this.set(gauges.sessions()) } })
    new client.Gauge({ name: 'exec_gateway_retained_bytes', help: 'exec output held for replays and results, across all sandboxes (bounded by --retention-bytes-total)', registers: [this.registry], collect () { this.set(gauges.retainedBytes()) } })
    new client.Gauge({
      name: 'exec_gateway_sandboxes',
      help: 'known sandboxes by status',
      labelNames: ['status'] as const,
      registers: [this.registry],
      collect () {
        const s = gauges.sandboxes()
        this.set({ status: 'connected' }, s.connected)
        this.set({ status: 'disconnected' }, s.disconnected)
      }
    })
    // Process health (CPU, memory, event loop lag, handles) next to the gateway's own numbers.
    client.collectDefaultMetrics({ register: this.registry })
  }

  get contentType (): string { return this.registry.contentType }
  async render (): Promise<string> { return await this.registry.metrics() }
}
