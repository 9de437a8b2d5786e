import { afterEach, describe, expect, it } from 'vitest'
import http2, { type Http2Session, type ServerHttp2Stream } from 'node:http2'
import type { AddressInfo } from 'node:net'
import pino from 'pino'
import { Supervisor } from '../../src/supervisor/agent.js'
import { SESSION_PATH } from '../../src/relay/protocol.js'
import { decode, LineSplitter, SupervisorMessages, type SupervisorMessage } from '../../src/supervisor-plane/messages.js'
import { sleep, waitFor } from '../helpers/wait.js'

// The real supervisor agent against a scripted gateway: it decodes what the gateway says with
// the same decoder the gateway uses, so a value it cannot use never reaches its timers, and a
// repeated "accepted" replaces its heartbeat instead of adding a second one.

interface FakeGateway {
  url: string
  received: SupervisorMessage[]
  pings: () => number
  say: (line: string) => void
  close: () => Promise<void>
}

async function fakeGateway (): Promise<FakeGateway> {
  const received: SupervisorMessage[] = []
  let stream: ServerHttp2Stream | undefined
  let pings = 0
  const sessions = new Set<Http2Session>()
  const server = http2.createServer()
  server.on('session', (s) => { sessions.add(s); s.on('ping', () => { pings++ }); s.on('error', () => {}) })
  server.on('stream', (st, headers) => {
    st.on('error', () => {})
    if (headers[':path'] !== SESSION_PATH) { st.close(http2.constants.NGHTTP2_REFUSED_STREAM); return }
    stream = st
    st.respond({ ':status': 200 })
    const lines = new LineSplitter(64 * 1024)
    st.on('data', (c: Buffer) => lines.push(c, (l) => {
      const d = decode(SupervisorMessages, l)
      if (d.ok) received.push(d.msg)
      return 'go on'
    }, () => {}))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    received,
    pings: () => pings,
    say: (line) => { stream?.write(line + '\n') },
    close: async () => {
      for (const s of sessions) s.destroy()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

const accepted = (over: Record<string, unknown> = {}): string => JSON.stringify({
  type: 'accepted', sessionId: 's-1', heartbeatIntervalMs: 100, pingIntervalMs: 10_000, pingTimeoutMs: 10_000, gatewayPublicKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl gw', ...over
})

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => { for (const c of cleanups.splice(0).reverse()) await c() })

async function start (): Promise<{ gw: FakeGateway, sup: Supervisor }> {
  const gw = await fakeGateway()
  cleanups.push(gw.close)
  const sup = new Supervisor({ gatewayUrl: gw.url, sandboxId: 'sb', token: 'egw1.c2I.0.x', logger: pino({ level: 'silent' }) })
  await sup.start()
  cleanups.push(async () => { await sup.stop() })
  await waitFor(() => gw.received.some((m) => m.type === 'hello'), { timeoutMs: 5000, intervalMs: 10 })
  return { gw, sup }
}

const heartbeats = (gw: FakeGateway): number => gw.received.filter((m) => m.type === 'heartbeat').length

describe('supervisor agent, decoding what the gateway says', () => {
  it('its hello passes the gateway\'s own schema', async () => {
    const { gw } = await start()
    const hello = gw.received.find((m) => m.type === 'hello')
    expect(hello).toMatchObject({ type: 'hello', instanceId: expect.any(String), sshHostKey: expect.stringMatching(/^ssh-ed25519 /) })
  })

  it('a second "accepted" replaces the heartbeat instead of adding one', async () => {
    const { gw } = await start()
    gw.say(accepted())
    gw.say(accepted())
    gw.say(accepted())
    await sleep(40)
    const before = heartbeats(gw)
    await sleep(1000)
    // One 100 ms heartbeat gives about 10 in a second; three stacked ones would give 30.
    const n = heartbeats(gw) - before
    expect(n).toBeGreaterThanOrEqual(6)
    expect(n).toBeLessThanOrEqual(13)
  })

  it('unusable intervals are refused at the decoder, and an announced 1 ms PING interval is clamped', async () => {
    const { gw } = await start()
    for (const bad of ['"soon"', '0', '-5', '1e308', 'null', '{"toString":{}}', '[]']) {
      gw.say(accepted().replace('"pingIntervalMs":10000', `"pingIntervalMs":${bad}`))
      gw.say(accepted().replace('"heartbeatIntervalMs":100', `"heartbeatIntervalMs":${bad}`))
    }
    for (const line of ['null', '5', '"x"', '[]', '{"type":"relay","relayId":{"toString":{}}}', '{"type":"rejected","reason":null}', 'not json']) gw.say(line)
    await sleep(300)
    expect(heartbeats(gw)).toBe(0)
    gw.say(accepted({ pingIntervalMs: 1, pingTimeoutMs: 1 }))
    await sleep(1000)
    // The supervisor PINGs only after silence; clamped to ≥ 50 ms, a second holds at most ~20.
    expect(gw.pings()).toBeLessThanOrEqual(25)
    expect(heartbeats(gw)).toBeGreaterThanOrEqual(5)
  })
})
