import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import { startSupervisorProcess } from '../helpers/supervisor-process.js'
import { waitFor } from '../helpers/wait.js'
import { api } from '../helpers/api.js'

// /metrics scraped after real execs through a real supervisor: every family the dashboards and
// alerts rely on is there and moved by what actually happened.

type Samples = Map<string, number>

// Prometheus text format → "name{labels}" → value (labels as printed, in order).
function parse (text: string): Samples {
  const out: Samples = new Map()
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const m = /^(\S+?(?:\{[^}]*\})?) (\S+)$/.exec(line)
    if (m !== null) out.set(m[1]!, Number(m[2]))
  }
  return out
}

async function scrape (url: string, token?: string): Promise<{ status: number, type: string | null, samples: Samples, text: string }> {
  const res = await fetch(`${url}/metrics`, { headers: token === undefined ? {} : { authorization: `Bearer ${token}` } })
  const text = await res.text()
  return { status: res.status, type: res.headers.get('content-type'), samples: parse(text), text }
}

async function run (s: TestSandbox, sandboxId: string, body: unknown): Promise<any> {
  return (await api(s.g.publicUrl, 'POST', `/v1/sandboxes/${sandboxId}/execs?wait=true`, body, { authorization: 'Bearer metrics-token' })).body
}

describe('/metrics after real execs', () => {
  let s: TestSandbox
  beforeAll(async () => {
    s = await startSandbox('embedded', 'm1', { apiTokens: ['metrics-token'], sessionWaitMs: 500, sshKeepaliveIntervalMs: 300, sshKeepaliveCountMax: 2 })
  })
  afterAll(async () => { await s?.close() })

  it('needs the token like every non-public route', async () => {
    expect((await scrape(s.g.publicUrl)).status).toBe(401)
    const ok = await scrape(s.g.publicUrl, 'metrics-token')
    expect(ok.status).toBe(200)
    expect(ok.type).toMatch(/^text\/plain; version=0\.0\.4/)
  })

  it('counts execs by outcome, bytes by stream, sessions, sandboxes, handshakes and relay failures', async () => {
    const before = (await scrape(s.g.publicUrl, 'metrics-token')).samples
    const get = (m: Samples, k: string): number => m.get(k) ?? 0

    expect((await run(s, 'm1', { command: ['sh', '-c', 'printf 12345; printf abc >&2; exit 3'] })).exitCode).toBe(3)
    expect((await run(s, 'm1', { command: ['cat'], stdin: 'seven b' })).stdout).toBe('seven b')
    const none = await run(s, 'm1', { command: ['true'] })
    expect(none.exitCode).toBe(0)

    // A second sandbox whose supervisor dies mid-exec: a relay failure and a failed exec.
    const sup = startSupervisorProcess({ gatewayUrl: s.g.supervisorUrl, sandboxId: 'm2', token: s.g.token('m2') })
    await s.g.waitConnected('m2')
    const dying = run(s, 'm2', { command: ['sleep', '30'] })
    await waitFor(() => s.g.gw.execs.list({ sandboxId: 'm2', status: 'running' }).length === 1, { timeoutMs: 10_000, intervalMs: 20 })
    sup.signal('SIGKILL')
    const failed = await dying
    expect(failed.code).toBe('relay_unavailable')
    await sup.stop()
    await s.g.waitDisconnected('m2')

    const after = (await scrape(s.g.publicUrl, 'metrics-token')).samples
    const delta = (k: string): number => get(after, k) - get(before, k)
    expect(delta('exec_gateway_execs_started_total')).toBe(4)
    expect(delta('exec_gateway_execs_ended_total{outcome="exited",code=""}')).toBe(3)
    expect(delta('exec_gateway_execs_ended_total{outcome="failed",code="relay_unavailable"}')).toBe(1)
    expect(delta('exec_gateway_exec_bytes_total{stream="stdout"}')).toBe(5 + 7)
    expect(delta('exec_gateway_exec_bytes_total{stream="stderr"}')).toBe(3)
    expect(delta('exec_gateway_exec_bytes_total{stream="stdin"}')).toBe(7)
    expect(get(after, 'exec_gateway_relay_failures_total{reason="relay_unavailable"}')).toBeGreaterThanOrEqual(1)
    expect(get(after, 'exec_gateway_active_execs')).toBe(0)
    expect(get(after, 'exec_gateway_supervisor_sessions')).toBe(1)
    expect(get(after, 'exec_gateway_sandboxes{status="connected"}')).toBe(1)
    expect(get(after, 'exec_gateway_sandboxes{status="disconnected"}')).toBe(1)
    // At least one handshake per sandbox, all of them under the ready bound.
    expect(get(after, 'exec_gateway_ssh_handshake_seconds_count{outcome="ok"}')).toBeGreaterThanOrEqual(2)
    expect(get(after, 'exec_gateway_ssh_handshake_seconds_bucket{le="10",outcome="ok"}')).toBe(get(after, 'exec_gateway_ssh_handshake_seconds_count{outcome="ok"}'))
    expect(get(after, 'exec_gateway_relay_open_seconds_count')).toBeGreaterThanOrEqual(2)
    // Process health comes along.
    expect(get(after, 'process_resident_memory_bytes')).toBeGreaterThan(0)
  })

  it('a sandbox that never comes back is counted as sandbox_unavailable', async () => {
    // The dying exec's last reattach try may still be waiting for m2's relay after the exec
    // ended (its bound cut the wait, not the open): that failure is real but not this test's.
    await waitFor(() => s.g.gw.pool.stats('m2').connections === 0, { timeoutMs: 10_000, intervalMs: 20 })
    const before = (await scrape(s.g.publicUrl, 'metrics-token')).samples
    const res = await run(s, 'm2', { command: ['true'] })
    expect(res.code).toBe('sandbox_unavailable')
    const after = (await scrape(s.g.publicUrl, 'metrics-token')).samples
    const k = 'exec_gateway_relay_failures_total{reason="sandbox_unavailable"}'
    expect((after.get(k) ?? 0) - (before.get(k) ?? 0)).toBe(1)
    const e = 'exec_gateway_execs_ended_total{outcome="failed",code="sandbox_unavailable"}'
    expect((after.get(e) ?? 0) - (before.get(e) ?? 0)).toBe(1)
  })

  it('HTTP/2 PING round trips are observed', async () => {
    const g = await startSandbox('embedded', 'm3', { h2PingIntervalMs: 100 })
    try {
      await waitFor(async () => ((await scrape(g.g.publicUrl)).samples.get('exec_gateway_h2_ping_rtt_seconds_count') ?? 0) >= 2, { timeoutMs: 10_000, intervalMs: 100 })
    } finally {
      await g.close()
    }
  })
})
