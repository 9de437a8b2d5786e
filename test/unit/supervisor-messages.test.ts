import { describe, expect, it } from 'vitest'
import {
  decode, GatewayMessages, LineSplitter, SupervisorMessages, type Codec, type LineVerdict
} from '../../src/supervisor-plane/messages.js'
import { KeyedBuckets, TokenBucket } from '../../src/supervisor-plane/budget.js'

// The wire decoder and the byte-line splitter on their own: what they accept, what they refuse
// and why, and that the splitter counts bytes, keeps chunks as they came and stops at its bound.

const line = (s: string): Buffer => Buffer.from(s)

describe('decode', () => {
  it('takes every message of both directions as the peers send them', () => {
    const hello = { type: 'hello', instanceId: '0b7c6a8e-3f0e-4a35-9d2e-1a2b3c4d5e6f', sshHostKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA== höst', sshUser: 'runner' }
    for (const [codec, msg] of [
      [SupervisorMessages, hello],
      [SupervisorMessages, { type: 'hello' }],
      [SupervisorMessages, { type: 'heartbeat' }],
      [SupervisorMessages, { type: 'relay_failed', relayId: '0b7c6a8e-3f0e-4a35-9d2e-1a2b3c4d5e6f', reason: 'cannot reach the SSH daemon' }],
      [GatewayMessages, { type: 'accepted', sessionId: 's1', heartbeatIntervalMs: 15000, pingIntervalMs: 20000, pingTimeoutMs: 10000, gatewayPublicKey: 'ssh-ed25519 AAAA exec-gateway' }],
      [GatewayMessages, { type: 'relay', relayId: 'abc-123' }],
      [GatewayMessages, { type: 'heartbeat' }],
      [GatewayMessages, { type: 'superseded' }],
      [GatewayMessages, { type: 'rejected', reason: 'superseded: a newer supervisor process serves this sandbox' }]
    ] as ReadonlyArray<[Codec<unknown>, object]>) {
      const d = decode(codec, line(JSON.stringify(msg)))
      expect(d, JSON.stringify(msg)).toEqual({ ok: true, msg })
    }
  })

  it('drops fields it does not know, so nothing unbounded rides along into a handler', () => {
    const d = decode(SupervisorMessages, line(JSON.stringify({ type: 'heartbeat', extra: 'x'.repeat(1000), nested: { a: [1, 2] } })))
    expect(d).toEqual({ ok: true, msg: { type: 'heartbeat' } })
  })

  it('says why a line was refused, in a fixed phrase that holds none of the peer\'s bytes', () => {
    const cases: Array<[string | Buffer, string]> = [
      ['null', 'not a JSON object'],
      ['[]', 'not a JSON object'],
      ['"hello"', 'not a JSON object'],
      ['1e308', 'not a JSON object'],
      ['{', 'not JSON'],
      ['x', 'not JSON'],
      [Buffer.from([0xff, 0xfe, 0x7b, 0x7d]), 'not UTF-8'],
      ['{}', 'no string "type"'],
      ['{"type":{"toString":{}}}', 'no string "type"'],
      ['{"type":"constructor"}', 'unknown message type'],
      ['{"type":"__proto__"}', 'unknown message type'],
      ['{"type":"accepted"}', 'unknown message type'],
      ['{"type":"relay_failed","relayId":"r1","reason":{"toString":{}}}', 'invalid relay_failed at /reason'],
      [`{"type":"relay_failed","relayId":"r1","reason":"${'x'.repeat(1025)}"}`, 'invalid relay_failed at /reason'],
      [`{"type":"relay_failed","relayId":"${'r'.repeat(65)}","reason":"x"}`, 'invalid relay_failed at /relayId'],
      ['{"type":"hello","instanceId":"a b"}', 'invalid hello at /instanceId'],
      ['{"type":"hello","sshUser":"root\\nInjected: yes"}', 'invalid hello at /sshUser'],
      ['{"type":"hello","sshUser":"-oProxyCommand=x"}', 'invalid hello at /sshUser'],
      [`{"type":"hello","sshUser":"${'a'.repeat(257)}"}`, 'invalid hello at /sshUser'],
      [`{"type":"hello","sshHostKey":"${'a'.repeat(16 * 1024 + 1)}"}`, 'invalid hello at /sshHostKey']
    ]
    for (const [input, why] of cases) {
      const d = decode(SupervisorMessages, typeof input === 'string' ? line(input) : input)
      expect(d, String(input).slice(0, 80)).toEqual({ ok: false, why })
    }
  })

  it('refuses gateway messages whose numbers could drive a supervisor timer into a tight loop', () => {
    const base = { type: 'accepted', sessionId: 's', heartbeatIntervalMs: 15000, pingIntervalMs: 20000, pingTimeoutMs: 10000, gatewayPublicKey: 'k' }
    for (const bad of [0, -1, 0.5, 1e308, '10', null, true, [], {}]) {
      for (const field of ['heartbeatIntervalMs', 'pingIntervalMs', 'pingTimeoutMs']) {
        const d = decode(GatewayMessages, line(JSON.stringify({ ...base, [field]: bad })))
        expect(d.ok, `${field}: ${JSON.stringify(bad)}`).toBe(false)
      }
    }
  })
})

describe('LineSplitter', () => {
  const collect = (max: number, chunks: Buffer[]): { lines: string[], tooLong: number[], ok: boolean[] } => {
    const s = new LineSplitter(max)
    const lines: string[] = []
    const tooLong: number[] = []
    const ok = chunks.map((c) => s.push(c, (l) => { lines.push(l.toString('latin1')); return 'go on' }, (n) => tooLong.push(n)))
    return { lines, tooLong, ok }
  }

  it('gives the same lines however the bytes are cut', () => {
    const text = Buffer.from('{"a":1}\n\n{"b":"é€😀"}\nlast without newline')
    const want = ['{"a":1}', '', Buffer.from('{"b":"é€😀"}').toString('latin1')]
    for (let cut = 0; cut <= text.length; cut++) {
      expect(collect(1024, [text.subarray(0, cut), text.subarray(cut)]).lines, `cut at ${cut}`).toEqual(want)
    }
    expect(collect(1024, [...text].map((b) => Buffer.from([b]))).lines).toEqual(want)
  })

  it('counts bytes, not characters: 0xFF bytes (one U+FFFD each if decoded) count one each', () => {
    const r = collect(1024, [Buffer.alloc(1024, 0xff), Buffer.from('\n')])
    expect(r.lines).toHaveLength(1)
    expect(r.tooLong).toEqual([])
    const over = collect(1024, [Buffer.alloc(1025, 0xff)])
    expect(over.tooLong).toEqual([1025])
    // Three-byte characters: 342 of them are 1026 bytes, over a 1024-byte bound.
    expect(collect(1024, [Buffer.from('€'.repeat(342))]).tooLong).toEqual([1026])
  })

  it('an unfinished line over the bound is reported once and nothing more is read', () => {
    const s = new LineSplitter(1024)
    const tooLong: number[] = []
    const lines: Buffer[] = []
    const push = (b: Buffer): boolean => s.push(b, (l) => { lines.push(l); return 'go on' }, (n) => tooLong.push(n))
    for (let i = 0; i < 3; i++) expect(push(Buffer.alloc(300, 0x61))).toBe(true)
    expect(s.pendingBytes).toBe(900)
    expect(push(Buffer.alloc(300, 0x61))).toBe(false)
    expect(tooLong).toEqual([1200])
    expect(s.pendingBytes).toBe(0)
    expect(push(Buffer.from('\n{"type":"heartbeat"}\n'))).toBe(false)
    expect(lines).toEqual([])
    expect(tooLong).toHaveLength(1)
  })

  it('a finished line over the bound is refused too, and lines before it were delivered', () => {
    const r = collect(8, [Buffer.from('12345678\n123456789\nnever\n')])
    expect(r.lines).toEqual(['12345678'])
    expect(r.tooLong).toEqual([9])
    expect(r.ok).toEqual([false])
  })

  it("'stop' from the line handler stops at that line", () => {
    const s = new LineSplitter(100)
    const seen: string[] = []
    s.push(Buffer.from('a\nb\nc\n'), (l): LineVerdict => { seen.push(l.toString()); return l.toString() === 'b' ? 'stop' : 'go on' }, () => {})
    expect(seen).toEqual(['a', 'b'])
  })

  it('holds an unfinished line in its chunks without re-copying them: 64 KiB in 1-byte chunks stays linear', () => {
    const s = new LineSplitter(64 * 1024)
    const one = Buffer.from('x')
    const t0 = performance.now()
    for (let i = 0; i < 64 * 1024; i++) s.push(one, () => 'go on', () => {})
    const held = s.pendingBytes
    let got = 0
    s.push(Buffer.from('\n'), (l) => { got = l.length; return 'go on' }, () => {})
    expect(held).toBe(64 * 1024)
    expect(got).toBe(64 * 1024)
    // A re-copy per chunk would move 2 GiB here; linear work is a few ms.
    expect(performance.now() - t0).toBeLessThan(2000)
  })

  it('copies a short tail of a big chunk, so the held line does not pin the chunk', () => {
    const s = new LineSplitter(32 * 1024)
    const big = Buffer.alloc(16 * 1024, 0x61)
    big[big.length - 3] = 10
    s.push(big, () => 'go on', () => {})
    expect(s.pendingBytes).toBe(2)
    // Had the tail been a view of the chunk, writing into the chunk would show in the line.
    big.fill(0x7a)
    let tail = ''
    s.push(Buffer.from('\n'), (l) => { tail = l.toString(); return 'go on' }, () => {})
    expect(tail).toBe('aa')
  })
})

describe('token buckets', () => {
  it('gives a burst of its capacity, then its rate', () => {
    const b = new TokenBucket(4, 2, 0)
    expect([1, 2, 3, 4, 5].map(() => b.take(1, 0))).toEqual([true, true, true, true, false])
    expect(b.take(1, 400)).toBe(false)
    expect(b.take(1, 500)).toBe(true)
    expect(b.full(10_000)).toBe(true)
  })

  it('a key gets its own bucket back, and the map stays bounded', () => {
    const m = new KeyedBuckets(() => new TokenBucket(1, 0.0001), 100)
    expect(m.take('a')).toBe(true)
    expect(m.take('a')).toBe(false)
    for (let i = 0; i < 1000; i++) m.take(`k${i}`)
    expect(m.size).toBeLessThanOrEqual(100)
  })
})
