import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import http2, { type ClientHttp2Session, type ClientHttp2Stream } from 'node:http2'
import pino from 'pino'
import type { TObject } from '@sinclair/typebox'
import { startGateway, type TestGateway } from '../helpers/gateway.js'
import { waitFor } from '../helpers/wait.js'
import { api } from '../helpers/api.js'
import { Supervisor } from '../../src/supervisor/agent.js'
import { SESSION_PATH } from '../../src/relay/protocol.js'
import {
  AcceptedSchema, decode, GatewayMessages, HelloSchema, RejectedSchema, RelayFailedSchema, RelaySchema,
  SupervisorHeartbeatSchema, SupervisorMessages, type Codec
} from '../../src/supervisor-plane/messages.js'

// Every JSON value type in every field of every message type, and lines that are no message at
// all, into the decoder of both directions and then down a real gateway's session stream next
// to an honest sandbox. Before the decoder existed, five of these bytes (`null`) took the gateway
// down; now none may throw, none may end the process, and the honest sandbox keeps working.

const deep = (n: number): string => '['.repeat(n) + ']'.repeat(n)

// As JSON text, so that values JSON.stringify cannot make (a lone surrogate escape, a
// "__proto__" key, nesting deeper than a recursive stringify likes) are in the set too.
const VALUES: readonly string[] = [
  'null', 'true', 'false', '0', '-1', '1', '-0', '0.5', '1e308', '-1e308', '9007199254740993',
  '""', '" "', '"x"', '"\\u0000"', '"\\ud800"', '"é😀"', '"line\\nbreak"', JSON.stringify('a'.repeat(1025)),
  JSON.stringify('a'.repeat(20_000)), '"hello"', '"relay_failed"', '"heartbeat"',
  '[]', '[1,"x",null]', '{}', '{"toString":{}}', '{"valueOf":{}}', '{"toString":"x","valueOf":1}',
  '{"__proto__":{"type":"hello"}}', '{"type":"hello"}', deep(64), deep(5000)
]

const NOT_MESSAGES: readonly (string | Buffer)[] = [
  ...VALUES, 'x', '{', '}{', '{"type":"hello"', 'nul', '\u0000', 'undefined', 'NaN', 'Infinity',
  Buffer.from([0xff, 0xfe, 0xfd]), Buffer.from([0x7b, 0x22, 0xc3, 0x22, 0x7d])
]

// A valid message of each type, then each of its fields replaced by every value (and removed).
function hostileLines (schemas: readonly TObject[]): Buffer[] {
  const out: Buffer[] = []
  for (const schema of schemas) {
    const fields = Object.keys(schema.properties)
    const base: Record<string, string> = {}
    for (const f of fields) base[f] = f === 'type' ? JSON.stringify(schema.properties.type!.const) : '"ok-1"'
    for (const field of fields) {
      const variants = [...VALUES.map((v) => ({ ...base, [field]: v })), Object.fromEntries(Object.entries(base).filter(([k]) => k !== field))]
      for (const v of variants) out.push(Buffer.from('{' + Object.entries(v).map(([k, val]) => `${JSON.stringify(k)}:${val}`).join(',') + '}'))
    }
  }
  for (const n of NOT_MESSAGES) out.push(typeof n === 'string' ? Buffer.from(n) : n)
  return out
}

const SUPERVISOR_SCHEMAS = [HelloSchema, SupervisorHeartbeatSchema, RelayFailedSchema] as const
const GATEWAY_SCHEMAS = [AcceptedSchema, RelaySchema, RejectedSchema] as const

function decodeAll<M> (codec: Codec<M>, lines: Buffer[]): { ok: number, bad: number, whys: Set<string> } {
  let ok = 0
  let bad = 0
  const whys = new Set<string>()
  for (const l of lines) {
    const d = decode(codec, l)
    if (d.ok) ok++
    else { bad++; whys.add(d.why) }
  }
  return { ok, bad, whys }
}

describe('every JSON value in every field, into the decoder', () => {
  it('supervisor → gateway: never throws, and a refusal says why in a bounded phrase', () => {
    const lines = hostileLines(SUPERVISOR_SCHEMAS)
    expect(lines.length).toBeGreaterThan(250)
    const r = decodeAll(SupervisorMessages, lines)
    expect(r.bad).toBeGreaterThan(200)
    for (const why of r.whys) expect(why.length).toBeLessThanOrEqual(100)
  })

  it('gateway → supervisor: never throws, and nothing but a valid message decodes', () => {
    const lines = hostileLines(GATEWAY_SCHEMAS)
    const r = decodeAll(GatewayMessages, lines)
    expect(r.bad).toBeGreaterThan(200)
    for (const l of lines) {
      const d = decode(GatewayMessages, l)
      if (!d.ok || d.msg.type !== 'accepted') continue
      for (const k of ['heartbeatIntervalMs', 'pingIntervalMs', 'pingTimeoutMs'] as const) expect(Number.isInteger(d.msg[k]) && d.msg[k] >= 1).toBe(true)
    }
  })
})

describe('every JSON value in every field, down a real gateway\'s session stream', () => {
  let g: TestGateway
  let honest: Supervisor
  beforeAll(async () => {
    // Budgets wide open, so every line is looked at (the budgets have tests of their own).
    g = await startGateway({ sessionMessagesPerSecond: 1_000_000, sessionLineMaxBytes: 1024 * 1024 })
    honest = new Supervisor({ gatewayUrl: g.supervisorUrl, sandboxId: 'honest', token: g.token('honest'), logger: pino({ level: 'silent' }) })
    await honest.start()
    await g.waitConnected('honest')
  })
  afterAll(async () => {
    await honest?.stop()
    await g?.close()
  })

  async function hostileSession (client: ClientHttp2Session): Promise<ClientHttp2Stream> {
    const req = client.request({ ':method': 'POST', ':path': SESSION_PATH, authorization: `Bearer ${g.token('hostile')}` }, { endStream: false })
    req.on('error', () => {})
    req.resume()
    const status = await new Promise<number>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no response to the session request within 5 s')), 5000)
      req.once('response', (h) => { clearTimeout(t); resolve(Number(h[':status'])) })
    })
    expect(status).toBe(200)
    return req
  }

  async function honestRuns (tag: string): Promise<void> {
    const r = await api(g.publicUrl, 'POST', '/v1/sandboxes/honest/execs?wait=true', { command: ['sh', '-c', 'printf "%s" "$1"; exit 3', 'x', tag] })
    expect(r.status).toBe(200)
    expect(r.body).toMatchObject({ stdout: tag, exitCode: 3 })
  }

  it('before and after hello: the gateway lives, refuses each bad line, and the honest sandbox runs exactly', async () => {
    const lines = hostileLines(SUPERVISOR_SCHEMAS)
    const undecodable = lines.filter((l) => !decode(SupervisorMessages, l).ok && l.toString().trim() !== '').length
    const client = http2.connect(g.supervisorUrl)
    client.on('error', () => {})
    try {
      const refused0 = g.gw.refusals.count('bad_message')
      // Session 1 sees the lines while it waits for its hello (a valid hello among them is
      // taken); session 2 after a hello of its own. Lines go out in uneven chunks.
      const s1 = await hostileSession(client)
      const all = Buffer.concat(lines.flatMap((l) => [l, Buffer.from('\n')]))
      for (let i = 0; i < all.length; i += 7919) s1.write(all.subarray(i, i + 7919))
      await waitFor(() => g.gw.refusals.count('bad_message') - refused0 >= undecodable, { timeoutMs: 10_000, intervalMs: 20, description: 'every undecodable line refused on session 1' })
      await honestRuns('after-session-1')
      s1.close()
      await new Promise((resolve) => s1.once('close', resolve))

      const refused1 = g.gw.refusals.count('bad_message')
      const s2 = await hostileSession(client)
      s2.write('{"type":"hello","instanceId":"hostile-1"}\n')
      await waitFor(() => g.gw.registry.get('hostile')?.session !== undefined, { timeoutMs: 5000, intervalMs: 20 })
      s2.write(all)
      await waitFor(() => g.gw.refusals.count('bad_message') - refused1 >= undecodable, { timeoutMs: 10_000, intervalMs: 20, description: 'every undecodable line refused on session 2' })
      await honestRuns('after-session-2')
      // Bad lines are skipped, not fatal: the hostile session is still the sandbox's.
      expect(s2.closed).toBe(false)
      expect(g.gw.registry.get('hostile')?.session).toBeDefined()
      expect(g.gw.refusals.count('handler_error')).toBe(0)
    } finally {
      client.destroy()
    }
    await g.waitDisconnected('hostile')
    await honestRuns('after-the-hostile-sandbox-left')
  })
})
