import { afterEach, describe, expect, it } from 'vitest'
import pino from 'pino'
import { SessionRegistry } from '../../src/relay/sessions.js'
import { Refusals, type RefusalReason } from '../../src/refusals.js'
import { GatewayEvents } from '../../src/diagnostics.js'
import { TokenBucket } from '../../src/supervisor-plane/budget.js'
import { SEND_BACKLOG_MAX_BYTES, SessionMachine, type SessionOptions, type SessionRegistryPort } from '../../src/supervisor-plane/session.js'
import { decode, GatewayMessages, type GatewayMessage } from '../../src/supervisor-plane/messages.js'
import { GatewayError } from '../../src/errors.js'

// The session state machine with no HTTP/2 at all: bytes (or decoded messages) in, lines and
// ends out through callbacks. Every refusal is seen through a real Refusals.

const silent = pino({ level: 'silent' })

interface Rig {
  m: SessionMachine
  sent: GatewayMessage[]
  ended: () => number
  revoked: () => number
  refusals: Refusals
  registry: SessionRegistry
  setPending: (n: number) => void
  setTokenRefusal: (r: string | undefined) => void
}

const machines: SessionMachine[] = []
afterEach(() => { for (const m of machines.splice(0)) m.closed() })

function rig (over: Partial<SessionOptions> = {}, registry = new SessionRegistry({ sessionWaitMs: 1000, relayOpenTimeoutMs: 1000, maxPendingRelaysPerSandbox: 8, logger: silent })): Rig {
  const sent: GatewayMessage[] = []
  let ends = 0
  let revokes = 0
  let pending = 0
  let tokenRefusal: string | undefined
  const refusals = new Refusals({ logger: silent, events: new GatewayEvents(), linesPerMinute: 60 })
  const m = new SessionMachine({
    sandboxId: 'sb',
    registry,
    refuse: (reason, key, message, fields) => refusals.refuse(reason, key, message, fields),
    logger: silent,
    info: () => {},
    heartbeatIntervalMs: 60_000,
    pingIntervalMs: 20_000,
    pingTimeoutMs: 10_000,
    gatewayPublicKey: 'ssh-ed25519 AAAA gw',
    lineMaxBytes: 4096,
    messages: new TokenBucket(1000, 1000),
    tokenRefusal: () => tokenRefusal,
    onRevoked: () => { revokes++ },
    transport: {
      write: (line) => {
        const d = decode(GatewayMessages, Buffer.from(line.trimEnd()))
        if (!d.ok) throw new Error(`the machine wrote a line a supervisor cannot decode: ${d.why}`)
        sent.push(d.msg)
        return true
      },
      pendingBytes: () => pending,
      end: () => { ends++ }
    },
    ...over
  })
  machines.push(m)
  return { m, sent, ended: () => ends, revoked: () => revokes, refusals, registry, setPending: (n) => { pending = n }, setTokenRefusal: (r) => { tokenRefusal = r } }
}

const bytes = (...lines: unknown[]): Buffer => Buffer.from(lines.map((l) => (typeof l === 'string' ? l : JSON.stringify(l)) + '\n').join(''))

function counts (r: Refusals): Partial<Record<RefusalReason, number>> {
  return Object.fromEntries(r.counts())
}

describe('SessionMachine', () => {
  it('hello → accepted: answers with the session bounds and registers with the registry', () => {
    const r = rig()
    expect(r.m.state).toBe('awaiting_hello')
    r.m.push(bytes({ type: 'hello', instanceId: 'i-1', sshUser: 'runner', sshHostKey: 'ssh-ed25519 AAAA' }))
    expect(r.m.state).toBe('accepted')
    expect(r.sent).toEqual([{ type: 'accepted', sessionId: r.m.id, heartbeatIntervalMs: 60_000, pingIntervalMs: 20_000, pingTimeoutMs: 10_000, gatewayPublicKey: 'ssh-ed25519 AAAA gw' }])
    expect(r.registry.get('sb')).toMatchObject({ session: r.m, sshUser: 'runner', sshHostKey: 'ssh-ed25519 AAAA' })
    expect(r.m.instanceId).toBe('i-1')
    r.m.closed()
    expect(r.registry.get('sb')?.session).toBeUndefined()
    expect(r.ended()).toBe(0)
  })

  it('a bad line is refused and skipped; the session and the lines after it go on', () => {
    const r = rig()
    r.m.push(bytes('null', '{"type":"relay_failed","relayId":"r","reason":{"toString":{}}}', '', '   ', { type: 'hello' }, 'x'))
    expect(r.m.state).toBe('accepted')
    expect(counts(r.refusals)).toEqual({ bad_message: 3 })
    expect(r.ended()).toBe(0)
  })

  it('relay_failed reaches the waiting exec, with its reason bounded', async () => {
    const r = rig()
    r.m.push(bytes({ type: 'hello' }))
    const relay = r.registry.openRelay('sb')
    await new Promise((resolve) => setImmediate(resolve))
    const ask = r.sent.find((m) => m.type === 'relay')
    expect(ask).toBeDefined()
    r.m.push(bytes({ type: 'relay_failed', relayId: (ask as { relayId: string }).relayId, reason: 'r'.repeat(1024) }))
    const err = await relay.catch((e: unknown) => e)
    expect(err).toBeInstanceOf(GatewayError)
    expect((err as GatewayError).code).toBe('relay_unavailable')
    expect((err as GatewayError).message.length).toBeLessThan(1200)
  })

  it('relay_failed before hello, and a second hello, are refused without ending the session', () => {
    const r = rig()
    r.m.push(bytes({ type: 'relay_failed', relayId: 'r1', reason: 'x' }, { type: 'hello' }, { type: 'hello' }))
    expect(r.m.state).toBe('accepted')
    expect(counts(r.refusals)).toEqual({ bad_message: 2 })
  })

  it('a line over the bound ends the session (line_too_long), unfinished or not', () => {
    for (const chunk of [Buffer.alloc(4097, 0xff), Buffer.from('x'.repeat(5000) + '\n')]) {
      const r = rig()
      r.m.push(chunk)
      expect(r.m.state).toBe('ended')
      expect(r.ended()).toBe(1)
      expect(counts(r.refusals)).toEqual({ line_too_long: 1 })
      r.m.push(bytes({ type: 'hello' }))
      expect(r.sent).toEqual([])
    }
  })

  it('messages over the rate end the session (message_rate), and the bucket is the one it was given', () => {
    const bucket = new TokenBucket(10, 0.001)
    const r = rig({ messages: bucket })
    r.m.push(bytes(...Array.from({ length: 10 }, () => ({ type: 'heartbeat' }))))
    expect(r.m.state).toBe('awaiting_hello')
    r.m.push(bytes({ type: 'heartbeat' }, { type: 'hello' }))
    expect(r.m.state).toBe('ended')
    expect(counts(r.refusals)).toEqual({ message_rate: 1 })
    // A second session of the sandbox with the same bucket gets nothing new.
    const again = rig({ messages: bucket })
    again.m.push(bytes({ type: 'hello' }))
    expect(again.m.state).toBe('ended')
  })

  it('a handler that throws ends that session (handler_error) and nothing throws out of push', () => {
    const throwing: SessionRegistryPort = {
      mayRegister: () => true,
      register: () => { throw new TypeError('Cannot read properties of null (reading \'type\')') },
      unregister: () => {},
      touch: () => {},
      failRelay: () => {}
    }
    const r = rig({ registry: throwing })
    expect(() => r.m.push(bytes({ type: 'hello' }, { type: 'heartbeat' }))).not.toThrow()
    expect(r.m.state).toBe('ended')
    expect(r.ended()).toBe(1)
    expect(counts(r.refusals)).toEqual({ handler_error: 1 })
    // A thrown non-Error is reported as safely.
    const odd = rig({ registry: { ...throwing, register: () => { throw Object.create(null) } } })
    expect(() => odd.m.receive({ type: 'hello' })).not.toThrow()
    expect(odd.m.state).toBe('ended')
  })

  it('a superseded process is told so and ended (superseded_instance)', () => {
    const registry = new SessionRegistry({ sessionWaitMs: 1000, relayOpenTimeoutMs: 1000, maxPendingRelaysPerSandbox: 8, logger: silent })
    const old = rig({}, registry)
    old.m.push(bytes({ type: 'hello', instanceId: 'old' }))
    const neu = rig({}, registry)
    neu.m.push(bytes({ type: 'hello', instanceId: 'new' }))
    expect(old.sent.map((m) => m.type)).toEqual(['accepted', 'superseded'])
    expect(old.m.state).toBe('ended')
    old.m.closed()
    const back = rig({}, registry)
    back.m.push(bytes({ type: 'hello', instanceId: 'old' }))
    expect(back.sent).toEqual([{ type: 'rejected', reason: 'superseded: a newer supervisor process serves this sandbox' }])
    expect(back.m.state).toBe('ended')
    expect(counts(back.refusals)).toEqual({ superseded_instance: 1 })
    expect(registry.get('sb')?.session).toBe(neu.m)
  })

  it('a peer that leaves its stream unread is ended (session_backlog) instead of buffering forever', () => {
    const r = rig()
    r.m.push(bytes({ type: 'hello' }))
    r.setPending(SEND_BACKLOG_MAX_BYTES + 1)
    expect(r.m.send({ type: 'heartbeat' })).toBe(false)
    expect(r.m.state).toBe('ended')
    expect(counts(r.refusals)).toEqual({ session_backlog: 1 })
  })

  it('a token no longer accepted: rejected is said, the session ends and the connection is revoked', () => {
    const r = rig()
    r.m.push(bytes({ type: 'hello' }))
    expect(r.m.checkToken()).toBe(false)
    r.setTokenRefusal('token expired')
    expect(r.m.checkToken()).toBe(true)
    expect(r.sent.at(-1)).toEqual({ type: 'rejected', reason: 'supervisor token no longer accepted: token expired' })
    expect(r.m.state).toBe('ended')
    expect(r.revoked()).toBe(1)
    expect(r.m.checkToken()).toBe(false)
  })

  it('heartbeats at its interval until it ends', async () => {
    const r = rig({ heartbeatIntervalMs: 20 })
    await new Promise((resolve) => setTimeout(resolve, 130))
    const beats = r.sent.filter((m) => m.type === 'heartbeat').length
    expect(beats).toBeGreaterThanOrEqual(3)
    r.m.close('test')
    expect(r.ended()).toBe(1)
    await new Promise((resolve) => setTimeout(resolve, 60))
    expect(r.sent.filter((m) => m.type === 'heartbeat').length).toBe(beats)
  })
})
