// src/execs/journal.ts and src/execs/exec-entry.ts: byte offsets, retention, gaps, UTF-8 safe
// events, and the one final event.
import { describe, expect, it } from 'vitest'
import { interleave, OutputJournal, utf8CompleteLength } from '../../src/execs/journal.js'
import { ExecEntry } from '../../src/execs/exec-entry.js'
import { validateExecRequest } from '../../src/execs/validate.js'
import { GatewayError } from '../../src/errors.js'
import type { Outcome } from '../../src/relay/outcome.js'
import type { ExecEvent } from '../../src/schemas/events.js'

const b = (s: string): Buffer => Buffer.from(s, 'utf8')
const EMOJI = b('😀') // f0 9f 98 80

function joinChunks (chunks: Array<{ offset: number, data: Buffer }>): Buffer {
  return Buffer.concat(chunks.map((c) => c.data))
}

describe('OutputJournal', () => {
  it('assigns consecutive byte offsets across appends', () => {
    const j = new OutputJournal(1024)
    expect(j.total).toBe(0)
    expect(j.start).toBe(0)
    expect(j.append(b('abc'))).toEqual({ offset: 0, data: b('abc') })
    expect(j.append(b('é'))).toEqual({ offset: 3, data: b('é') })
    expect(j.append(b('defg'))).toEqual({ offset: 5, data: b('defg') })
    expect(j.total).toBe(9)
    expect(j.start).toBe(0)
    expect(j.tail()).toEqual({ data: b('abcédefg'), truncated: false })
  })

  it('an empty journal reads nothing and its tail is empty', () => {
    const j = new OutputJournal(16)
    expect(j.readFrom(0)).toEqual({ gap: undefined, chunks: [] })
    expect(j.tail()).toEqual({ data: Buffer.alloc(0), truncated: false })
  })

  it('trims to the retention: total keeps counting, start moves, tail is truncated', () => {
    const j = new OutputJournal(10)
    j.append(b('abcdef'))
    j.append(b('ghijkl'))
    expect(j.total).toBe(12)
    expect(j.start).toBe(2)
    expect(j.tail()).toEqual({ data: b('cdefghijkl'), truncated: true })
    j.append(b('mnopqrstuvwxyz')) // larger than the retention by itself
    expect(j.total).toBe(26)
    expect(j.start).toBe(16)
    expect(j.tail()).toEqual({ data: b('qrstuvwxyz'), truncated: true })
  })

  it('exactly at the retention nothing is dropped', () => {
    const j = new OutputJournal(10)
    j.append(b('01234'))
    j.append(b('56789'))
    expect(j.start).toBe(0)
    expect(j.tail()).toEqual({ data: b('0123456789'), truncated: false })
    j.append(b('A'))
    expect(j.start).toBe(1)
    expect(j.tail()).toEqual({ data: b('123456789A'), truncated: true })
  })

  it('readFrom 0, mid-chunk and at the end', () => {
    const j = new OutputJournal(1024)
    j.append(b('hello '))
    j.append(b('big '))
    j.append(b('world'))
    const all = j.readFrom(0)
    expect(all.gap).toBeUndefined()
    expect(all.chunks.map((c) => c.offset)).toEqual([0, 6, 10])
    expect(joinChunks(all.chunks).toString()).toBe('hello big world')

    const mid = j.readFrom(8)
    expect(mid.gap).toBeUndefined()
    expect(mid.chunks).toEqual([{ offset: 8, data: b('g ') }, { offset: 10, data: b('world') }])

    const boundary = j.readFrom(10)
    expect(boundary.chunks).toEqual([{ offset: 10, data: b('world') }])

    expect(j.readFrom(15)).toEqual({ gap: undefined, chunks: [] })
    // Past the end is the end, not an error.
    expect(j.readFrom(1000)).toEqual({ gap: undefined, chunks: [] })
  })

  it('readFrom before the retained start: a gap, then exactly the retained bytes', () => {
    const j = new OutputJournal(8)
    j.append(b('0123456789')) // 10 bytes, keeps "23456789"
    j.append(b('abc')) // 13 total; keeps "56789abc", start 5
    expect(j.total).toBe(13)
    expect(j.start).toBe(5)
    const r = j.readFrom(0)
    expect(r.gap).toEqual({ from: 0, to: 5 })
    expect(r.chunks[0]!.offset).toBe(5)
    expect(joinChunks(r.chunks).toString()).toBe('56789abc')
    // Chunk offsets are contiguous.
    let next = 5
    for (const c of r.chunks) { expect(c.offset).toBe(next); next += c.data.length }
    expect(next).toBe(13)

    const r3 = j.readFrom(3)
    expect(r3.gap).toEqual({ from: 3, to: 5 })
    expect(joinChunks(r3.chunks).toString()).toBe('56789abc')

    // At the start exactly: no gap.
    const r5 = j.readFrom(5)
    expect(r5.gap).toBeUndefined()
    expect(joinChunks(r5.chunks).toString()).toBe('56789abc')
    const r7 = j.readFrom(7)
    expect(r7.gap).toBeUndefined()
    expect(r7.chunks[0]!.offset).toBe(7)
    expect(joinChunks(r7.chunks).toString()).toBe('789abc')
  })

  it('stays consistent over many random appends', () => {
    let seed = 42
    const rand = (n: number): number => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed % n }
    const retention = 100
    const j = new OutputJournal(retention)
    const everything: Buffer[] = []
    for (let i = 0; i < 300; i++) {
      const chunk = Buffer.alloc(rand(40))
      for (let k = 0; k < chunk.length; k++) chunk[k] = rand(256)
      const appended = j.append(chunk)
      expect(appended.offset).toBe(Buffer.concat(everything).length)
      everything.push(chunk)
      const all = Buffer.concat(everything)
      expect(j.total).toBe(all.length)
      expect(j.start).toBe(Math.max(0, all.length - retention))
      expect(j.tail().data.equals(all.subarray(j.start))).toBe(true)
      const from = rand(all.length + 1)
      const r = j.readFrom(from)
      if (from < j.start) expect(r.gap).toEqual({ from, to: j.start })
      else expect(r.gap).toBeUndefined()
      expect(joinChunks(r.chunks).equals(all.subarray(Math.max(from, j.start)))).toBe(true)
    }
  })
})

describe('utf8CompleteLength', () => {
  it('complete text is complete', () => {
    for (const s of ['', 'a', 'abc', 'é', 'aé', '€', 'a€', '😀', 'a😀', 'é€😀x']) {
      expect(utf8CompleteLength(b(s)), s).toBe(b(s).length)
    }
  })

  it('cuts before a 2-byte character missing its last byte', () => {
    const e = b('é') // c3 a9
    expect(utf8CompleteLength(e.subarray(0, 1))).toBe(0)
    expect(utf8CompleteLength(Buffer.concat([b('ab'), e.subarray(0, 1)]))).toBe(2)
  })

  it('cuts before a 3-byte character missing 1 or 2 bytes', () => {
    const euro = b('€') // e2 82 ac
    expect(utf8CompleteLength(euro.subarray(0, 1))).toBe(0)
    expect(utf8CompleteLength(euro.subarray(0, 2))).toBe(0)
    expect(utf8CompleteLength(Buffer.concat([b('x'), euro.subarray(0, 1)]))).toBe(1)
    expect(utf8CompleteLength(Buffer.concat([b('xy'), euro.subarray(0, 2)]))).toBe(2)
  })

  it('cuts before a 4-byte character missing 1, 2 or 3 bytes', () => {
    for (let have = 1; have <= 3; have++) {
      expect(utf8CompleteLength(EMOJI.subarray(0, have)), `${have} of 4`).toBe(0)
      expect(utf8CompleteLength(Buffer.concat([b('abc'), EMOJI.subarray(0, have)])), `abc + ${have} of 4`).toBe(3)
      expect(utf8CompleteLength(Buffer.concat([b('é'), EMOJI.subarray(0, have)])), `é + ${have} of 4`).toBe(2)
    }
  })

  it('a complete multi-byte character after another is complete', () => {
    expect(utf8CompleteLength(Buffer.concat([EMOJI, EMOJI]))).toBe(8)
    expect(utf8CompleteLength(Buffer.concat([EMOJI, EMOJI.subarray(0, 2)]))).toBe(4)
  })

  it('bytes that are not UTF-8 are never held back forever', () => {
    // A lone byte >= 0x80 that is a continuation byte with no lead: nothing to wait for.
    expect(utf8CompleteLength(Buffer.from([0x61, 0x80, 0x80, 0x80, 0x80]))).toBe(5)
    expect(utf8CompleteLength(Buffer.from([0xff]))).toBeLessThanOrEqual(1)
  })
})

// ---- ExecEntry --------------------------------------------------------------------------------

const spec = validateExecRequest({ command: ['true'] })
const EXIT0: Outcome = { kind: 'exited', exitCode: 0, signal: null, timedOut: false }

function collect (entry: ExecEntry, opts: Parameters<ExecEntry['attach']>[0] = {}): { events: ExecEvent[], ends: Array<number | undefined>, detach: () => void } {
  const events: ExecEvent[] = []
  const ends: Array<number | undefined> = []
  const detach = entry.attach(opts, (ev, end) => { events.push(ev); ends.push(end) })
  return { events, ends, detach }
}

const finals = (events: ExecEvent[]): ExecEvent[] => events.filter((e) => e.type === 'exit' || e.type === 'error')
const textOf = (events: ExecEvent[], stream: 'stdout' | 'stderr'): string =>
  events.filter((e): e is Extract<ExecEvent, { type: 'stdout' | 'stderr' }> => e.type === stream).map((e) => e.data).join('')

describe('ExecEntry', () => {
  it('a 4-byte character split across two appends arrives whole, at its first byte\'s offset', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    const { events, ends } = collect(entry)
    entry.append('stdout', Buffer.concat([b('a'), EMOJI.subarray(0, 2)]))
    expect(events).toEqual([{ type: 'stdout', offset: 0, data: 'a' }])
    expect(ends).toEqual([1])
    entry.append('stdout', Buffer.concat([EMOJI.subarray(2), b('b')]))
    expect(events[1]).toEqual({ type: 'stdout', offset: 1, data: '😀b' })
    expect(ends[1]).toBe(6)
    expect(events.some((e) => 'data' in e && e.data.includes('\uFFFD'))).toBe(false)
  })

  it('a character split into single bytes arrives once, whole', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    const { events } = collect(entry)
    for (const byte of EMOJI) entry.append('stderr', Buffer.from([byte]))
    expect(events).toEqual([{ type: 'stderr', offset: 0, data: '😀' }])
    entry.finish(EXIT0)
    expect(events.slice(1)).toEqual([{ type: 'exit', exitCode: 0, signal: null, timedOut: false }])
  })

  it('streams keep separate offsets and carries', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    const { events } = collect(entry)
    entry.append('stdout', EMOJI.subarray(0, 3))
    entry.append('stderr', b('err'))
    entry.append('stdout', Buffer.concat([EMOJI.subarray(3), b('!')]))
    entry.append('stderr', b('2'))
    expect(events).toEqual([
      { type: 'stderr', offset: 0, data: 'err' },
      { type: 'stdout', offset: 0, data: '😀!' },
      { type: 'stderr', offset: 3, data: '2' }
    ])
  })

  it('an incomplete character at the end is flushed before the final event', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    const { events } = collect(entry)
    entry.append('stdout', Buffer.concat([b('x'), EMOJI.subarray(0, 2)]))
    entry.finish(EXIT0)
    expect(events.map((e) => e.type)).toEqual(['stdout', 'stdout', 'exit'])
    expect(events[1]).toMatchObject({ type: 'stdout', offset: 1 })
  })

  it('base64 gives the exact bytes, invalid UTF-8 included, with byte offsets', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    const live = collect(entry, { encoding: 'base64' })
    const parts = [Buffer.from([0xff, 0x00, 0xfe]), EMOJI.subarray(0, 1), EMOJI.subarray(1), Buffer.from([0x80, 0x0a])]
    for (const p of parts) entry.append('stdout', p)
    entry.finish(EXIT0)
    const want = Buffer.concat(parts)
    const out = live.events.filter((e) => e.type === 'stdout') as Array<{ offset: number, data: string }>
    expect(Buffer.concat(out.map((e) => Buffer.from(e.data, 'base64'))).equals(want)).toBe(true)
    expect(out.map((e) => e.offset)).toEqual([0, 3, 4, 7])
    // Replay after the end: the same bytes.
    const replay = collect(entry, { encoding: 'base64' })
    const rOut = replay.events.filter((e) => e.type === 'stdout') as Array<{ offset: number, data: string }>
    expect(Buffer.concat(rOut.map((e) => Buffer.from(e.data, 'base64'))).equals(want)).toBe(true)
    expect(finals(replay.events)).toHaveLength(1)
    expect(entry.toResult('base64').stdout).toBe(want.toString('base64'))
  })

  it('attach after finish replays everything, then exactly one final event', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    entry.markStarted()
    entry.append('stdout', b('one\n'))
    entry.append('stderr', b('warn\n'))
    entry.append('stdout', b('two\n'))
    entry.finish({ kind: 'exited', exitCode: 3, signal: null, timedOut: false })
    const { events, detach } = collect(entry)
    expect(textOf(events, 'stdout')).toBe('one\ntwo\n')
    expect(textOf(events, 'stderr')).toBe('warn\n')
    expect(finals(events)).toEqual([{ type: 'exit', exitCode: 3, signal: null, timedOut: false }])
    expect(events[events.length - 1]!.type).toBe('exit')
    detach()
    // Nothing more can arrive.
    entry.append('stdout', b('late'))
    entry.finish(EXIT0)
    expect(events.filter((e) => e.type === 'exit')).toHaveLength(1)
  })

  it('attach while running: live output, then one final event, then nothing', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    entry.append('stdout', b('before '))
    const { events } = collect(entry)
    entry.append('stdout', b('after'))
    entry.finish({ kind: 'failed', error: new GatewayError('relay_unavailable', 'the relay went away') })
    entry.finish(EXIT0)
    entry.append('stdout', b('ignored'))
    expect(textOf(events, 'stdout')).toBe('before after')
    expect(finals(events)).toEqual([{ type: 'error', code: 'relay_unavailable', status: 503, detail: 'the relay went away', message: 'the relay went away' }])
    expect(events[events.length - 1]!.type).toBe('error')
    expect(entry.readers).toBe(0)
  })

  it('detach stops events and removes listeners', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    const { events, detach } = collect(entry)
    entry.append('stdout', b('a'))
    detach()
    entry.append('stdout', b('b'))
    entry.finish(EXIT0)
    expect(events).toEqual([{ type: 'stdout', offset: 0, data: 'a' }])
    expect(entry.readers).toBe(0)
  })

  it('resumes from offsets; older than retention is a gap', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 8)
    entry.append('stdout', b('0123456789')) // keeps 23456789
    entry.append('stderr', b('abcdef'))
    const resumed = collect(entry, { stdoutOffset: 4, stderrOffset: 2 })
    expect(resumed.events).toEqual([
      { type: 'stdout', offset: 4, data: '456789' },
      { type: 'stderr', offset: 2, data: 'cdef' }
    ])
    const late = collect(entry)
    expect(late.events).toEqual([
      { type: 'gap', stream: 'stdout', from: 0, to: 2 },
      { type: 'stdout', offset: 2, data: '23456789' },
      { type: 'stderr', offset: 0, data: 'abcdef' }
    ])
    const atEnd = collect(entry, { stdoutOffset: 10, stderrOffset: 6 })
    expect(atEnd.events).toEqual([])
  })

  it('a replay after retention cut a character in half never sends a broken character', () => {
    // docs/api.md §4: output data is "UTF-8, never splitting a character". Retention trims
    // by bytes, so the oldest retained byte can be the middle of a character; the replay must
    // not turn that into U+FFFD, and what it sends must start where the gap ends.
    const entry = new ExecEntry('ex_1', 'sbx', spec, 5)
    entry.append('stdout', Buffer.concat([EMOJI, EMOJI])) // 8 bytes; keeps the last 5: 80 + 😀
    entry.finish(EXIT0)
    const { events } = collect(entry)
    const gap = events.find((e) => e.type === 'gap') as { from: number, to: number } | undefined
    const out = events.filter((e) => e.type === 'stdout') as Array<{ offset: number, data: string }>
    expect(gap).toBeDefined()
    expect(out.length).toBeGreaterThan(0)
    expect(out[0]!.offset).toBe(gap!.to)
    expect(out.map((e) => e.data).join('')).not.toContain('\uFFFD')
    expect(out.map((e) => e.data).join('')).toBe('😀')
  })

  it('finish is idempotent: one end event, first outcome wins', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    let ends = 0
    entry.on('end', () => { ends++ })
    entry.markStarted()
    entry.finish({ kind: 'signaled', exitCode: null, signal: 'KILL', timedOut: false })
    const endedAt = entry.endedAt
    entry.finish(EXIT0)
    entry.finish({ kind: 'failed', error: new GatewayError('relay_unavailable', 'x') })
    expect(ends).toBe(1)
    expect(entry.status).toBe('exited')
    expect(entry.outcome).toEqual({ kind: 'signaled', exitCode: null, signal: 'KILL', timedOut: false })
    expect(entry.endedAt).toBe(endedAt)
    expect(entry.finalEvent()).toEqual({ type: 'exit', exitCode: null, signal: 'KILL', timedOut: false })
  })

  it('markStarted only moves pending → running, once', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    let started = 0
    entry.on('started', () => { started++ })
    entry.markStarted()
    const at = entry.startedAt
    entry.markStarted()
    expect(started).toBe(1)
    expect(entry.startedAt).toBe(at)
    expect(entry.status).toBe('running')
  })

  it('toJSON: a pending exec', () => {
    const s = validateExecRequest({ command: ['echo', 'hi'], tty: true, interactive: true })
    const entry = new ExecEntry('ex_42', 'sbx-a', s, 1024)
    const j = entry.toJSON()
    expect(Object.keys(j).sort()).toEqual([
      'command', 'createdAt', 'endedAt', 'error', 'exitCode', 'id', 'interactive', 'sandboxId', 'signal',
      'startedAt', 'status', 'stderrBytes', 'stdinBytes', 'stdoutBytes', 'tty', 'timedOut'
    ].sort())
    expect(j).toMatchObject({
      id: 'ex_42',
      sandboxId: 'sbx-a',
      command: ['echo', 'hi'],
      tty: true,
      interactive: true,
      status: 'pending',
      exitCode: null,
      signal: null,
      timedOut: false,
      error: null,
      startedAt: null,
      endedAt: null,
      stdoutBytes: 0,
      stderrBytes: 0,
      stdinBytes: 0
    })
    expect(new Date(j.createdAt).toISOString()).toBe(j.createdAt)
    expect(JSON.parse(JSON.stringify(entry))).toEqual(j)
    expect(entry.finalEvent()).toBeUndefined()
  })

  it('toJSON / toResult: exited, with byte counts beyond retention', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 4)
    entry.markStarted()
    entry.append('stdout', b('héllo')) // 6 bytes (68 c3 a9 6c 6c 6f); keeps the last 4: a9 6c 6c 6f
    entry.append('stderr', b('ok'))
    entry.finish({ kind: 'exited', exitCode: 7, signal: null, timedOut: false })
    const j = entry.toJSON()
    expect(j).toMatchObject({ status: 'exited', exitCode: 7, signal: null, timedOut: false, error: null, stdoutBytes: 6, stderrBytes: 2 })
    expect(j.startedAt).not.toBeNull()
    expect(j.endedAt).not.toBeNull()
    expect(Date.parse(j.endedAt!)).toBeGreaterThanOrEqual(Date.parse(j.startedAt!))
    const r = entry.toResult('utf8')
    expect(r.stderr).toBe('ok')
    expect(r.stderrTruncated).toBe(false)
    expect(r.stdoutTruncated).toBe(true)
    expect(Buffer.from(entry.toResult('base64').stdout, 'base64').equals(b('héllo').subarray(2))).toBe(true)
    expect(r).toMatchObject({ ...j })
  })

  it('toJSON: timed out, signaled and failed', () => {
    const t = new ExecEntry('ex_t', 'sbx', spec, 1024)
    t.finish({ kind: 'exited', exitCode: 124, signal: null, timedOut: true })
    expect(t.toJSON()).toMatchObject({ status: 'exited', exitCode: 124, signal: null, timedOut: true, error: null })
    expect(t.finalEvent()).toEqual({ type: 'exit', exitCode: 124, signal: null, timedOut: true })

    const s = new ExecEntry('ex_s', 'sbx', spec, 1024)
    s.finish({ kind: 'signaled', exitCode: null, signal: 'TERM', timedOut: false })
    expect(s.toJSON()).toMatchObject({ status: 'exited', exitCode: null, signal: 'TERM', timedOut: false, error: null })

    const f = new ExecEntry('ex_f', 'sbx', spec, 1024)
    f.append('stdout', b('partial'))
    f.finish({ kind: 'failed', error: new GatewayError('relay_unavailable', 'relay reset') })
    expect(f.toJSON()).toMatchObject({
      status: 'failed',
      exitCode: null,
      signal: null,
      timedOut: false,
      error: { code: 'relay_unavailable', status: 503, detail: 'relay reset' },
      stdoutBytes: 7
    })
    expect(f.error?.code).toBe('relay_unavailable')
    expect(f.toResult('utf8')).toMatchObject({ status: 'failed', stdout: 'partial', stdoutTruncated: false, exitCode: null })
  })

  it('empty appends are ignored', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    const { events } = collect(entry)
    entry.append('stdout', Buffer.alloc(0))
    expect(events).toEqual([])
    expect(entry.stdout.total).toBe(0)
  })
})

// ---- Issue 11: replays keep the interleaving; resume never invents characters ----------------

describe('OutputJournal arrival order', () => {
  it('stamps every append in arrival order, across journals', () => {
    const out = new OutputJournal(1024)
    const err = new OutputJournal(1024)
    out.append(b('1'))
    err.append(b('2'))
    out.append(b('3'))
    err.append(b('4'))
    const seqs = [...out.replayFrom(0).chunks, ...err.replayFrom(0).chunks].sort((x, y) => x.seq - y.seq)
    expect(seqs.map((c) => c.data.toString())).toEqual(['1', '2', '3', '4'])
  })

  it('replayFrom says where the replay begins: the offset asked for, or the oldest byte held', () => {
    const j = new OutputJournal(4)
    j.append(b('abcdef')) // keeps cdef
    expect(j.replayFrom(0)).toMatchObject({ begin: 2, gap: { from: 0, to: 2 } })
    expect(j.replayFrom(3)).toMatchObject({ begin: 3, gap: undefined })
    expect(j.replayFrom(99)).toMatchObject({ begin: 6, gap: undefined, chunks: [] })
  })

  it('interleave merges replays by arrival; a chunk cut by trimming or by the offset keeps its place', () => {
    const out = new OutputJournal(3)
    const err = new OutputJournal(1024)
    out.append(b('o1'))
    err.append(b('e1'))
    out.append(b('o2')) // stdout keeps "1o2": "o1" is cut to "1", still before "e1"
    err.append(b('e2'))
    out.append(b('')) // an empty append holds nothing, so replays nothing
    const merged = interleave([{ stream: 'stdout', chunks: out.replayFrom(0).chunks }, { stream: 'stderr', chunks: err.replayFrom(1).chunks }])
    expect(merged.map((c) => [c.stream, c.offset, c.data.toString()])).toEqual([
      ['stdout', 1, '1'],
      ['stderr', 1, '1'],
      ['stdout', 2, 'o2'],
      ['stderr', 2, 'e2']
    ])
  })

  it('trimming drops a chunk together with its stamp', () => {
    const out = new OutputJournal(2)
    const err = new OutputJournal(1024)
    out.append(b('aa'))
    err.append(b('x'))
    out.append(b('bb')) // "aa" is gone
    const merged = interleave([{ stream: 'stdout', chunks: out.replayFrom(0).chunks }, { stream: 'stderr', chunks: err.replayFrom(0).chunks }])
    expect(merged.map((c) => c.data.toString())).toEqual(['x', 'bb'])
  })
})

interface Recorded { ev: ExecEvent, end: number | undefined, raw: string | undefined }

function record (entry: ExecEntry, opts: Parameters<ExecEntry['attach']>[0] = {}): Recorded[] {
  const got: Recorded[] = []
  entry.attach(opts, (ev, end, raw) => { got.push({ ev, end, raw: raw?.toString('hex') }) })
  return got
}

const outputs = (got: Recorded[]): Array<[string, number, string]> =>
  got.flatMap(({ ev }) => ev.type === 'stdout' || ev.type === 'stderr' ? [[ev.type, ev.offset, ev.data] as [string, number, string]] : [])

const ENCODINGS = ['utf8', 'base64', 'binary'] as const

describe('ExecEntry replays in arrival order', () => {
  it('a finished exec replays stdout and stderr interleaved as they were streamed live, in every encoding', () => {
    for (const encoding of ENCODINGS) {
      const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
      const live = record(entry, { encoding })
      entry.append('stdout', b('1'))
      entry.append('stderr', b('2'))
      entry.append('stdout', b('3'))
      entry.append('stderr', b('4'))
      entry.finish(EXIT0)
      const replay = record(entry, { encoding })
      expect(replay, encoding).toEqual(live)
      expect(live.map((r) => r.ev.type), encoding).toEqual(['stdout', 'stderr', 'stdout', 'stderr', 'exit'])
    }
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    for (const [s, d] of [['stdout', '1'], ['stderr', '2'], ['stdout', '3'], ['stderr', '4']] as const) entry.append(s, b(d))
    expect(outputs(record(entry))).toEqual([['stdout', 0, '1'], ['stderr', 0, '2'], ['stdout', 1, '3'], ['stderr', 1, '4']])
  })

  it('attach while running: what is held in arrival order, then live output, then the final event', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    entry.append('stdout', b('1'))
    entry.append('stderr', b('2'))
    entry.append('stdout', b('3'))
    const got = record(entry)
    entry.append('stderr', b('4'))
    entry.append('stdout', b('5'))
    entry.finish(EXIT0)
    expect(outputs(got)).toEqual([['stdout', 0, '1'], ['stderr', 0, '2'], ['stdout', 1, '3'], ['stderr', 1, '4'], ['stdout', 2, '5']])
    expect(got.at(-1)!.ev.type).toBe('exit')
  })

  it('a resume from offsets replays what follows them, still interleaved', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    for (const [s, d] of [['stdout', 'o1'], ['stderr', 'e1'], ['stdout', 'o2'], ['stderr', 'e2'], ['stdout', 'o3']] as const) entry.append(s, b(d))
    entry.finish(EXIT0)
    expect(outputs(record(entry, { stdoutOffset: 2, stderrOffset: 0 }))).toEqual([['stderr', 0, 'e1'], ['stdout', 2, 'o2'], ['stderr', 2, 'e2'], ['stdout', 4, 'o3']])
    expect(outputs(record(entry, { stdoutOffset: 3, stderrOffset: 4 }))).toEqual([['stdout', 3, '2'], ['stdout', 4, 'o3']])
  })

  it('UTF-8 carries stay per stream while the streams interleave; live and replay agree', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    const live = record(entry)
    const euro = b('€') // e2 82 ac
    entry.append('stdout', Buffer.concat([b('a'), EMOJI.subarray(0, 1)]))
    entry.append('stderr', Buffer.concat([b('x'), euro.subarray(0, 2)]))
    entry.append('stdout', EMOJI.subarray(1, 3))
    entry.append('stderr', Buffer.concat([euro.subarray(2), b('y')]))
    entry.append('stdout', Buffer.concat([EMOJI.subarray(3), b('b')]))
    entry.finish(EXIT0)
    expect(outputs(live)).toEqual([['stdout', 0, 'a'], ['stderr', 0, 'x'], ['stderr', 1, '€y'], ['stdout', 1, '😀b']])
    expect(record(entry)).toEqual(live)
  })

  it('incomplete characters at the end are flushed before the final event, live and in replay alike', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    const live = record(entry)
    entry.append('stderr', EMOJI.subarray(0, 2))
    entry.append('stdout', b('ok'))
    entry.finish(EXIT0)
    expect(live.map((r) => r.ev.type)).toEqual(['stdout', 'stderr', 'exit'])
    expect(record(entry)).toEqual(live)
  })

  it('gaps come first, once per stream, then the retained chunks in arrival order', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 4)
    for (const [s, d] of [['stdout', 'abcd'], ['stderr', 'ABCD'], ['stdout', 'ef'], ['stderr', 'EF'], ['stdout', 'gh']] as const) entry.append(s, b(d))
    entry.finish(EXIT0)
    const got = record(entry)
    expect(got.map((r) => r.ev)).toEqual([
      { type: 'gap', stream: 'stdout', from: 0, to: 4 },
      { type: 'gap', stream: 'stderr', from: 0, to: 2 },
      { type: 'stderr', offset: 2, data: 'CD' },
      { type: 'stdout', offset: 4, data: 'ef' },
      { type: 'stderr', offset: 4, data: 'EF' },
      { type: 'stdout', offset: 6, data: 'gh' },
      { type: 'exit', exitCode: 0, signal: null, timedOut: false }
    ])
  })

  it('random interleaved multi-byte output: every replay, from any event boundary, is the live stream from there', () => {
    let seed = 7
    const rand = (n: number): number => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed % n }
    const alphabet = ['a', 'é', '€', '😀', '\n']
    for (let round = 0; round < 20; round++) {
      const entry = new ExecEntry('ex_r', 'sbx', spec, 1 << 20)
      const live = record(entry)
      const pending: Record<'stdout' | 'stderr', Buffer> = { stdout: Buffer.alloc(0), stderr: Buffer.alloc(0) }
      for (const s of ['stdout', 'stderr'] as const) pending[s] = b(Array.from({ length: 40 }, () => alphabet[rand(alphabet.length)]).join(''))
      while (pending.stdout.length + pending.stderr.length > 0) {
        const s = pending.stdout.length === 0 ? 'stderr' : pending.stderr.length === 0 ? 'stdout' : rand(2) === 0 ? 'stdout' : 'stderr'
        const n = 1 + rand(Math.min(7, pending[s].length))
        entry.append(s, pending[s].subarray(0, n))
        pending[s] = pending[s].subarray(n)
      }
      entry.finish(EXIT0)
      expect(record(entry)).toEqual(live)
      const ends = { stdout: [0], stderr: [0] }
      for (const r of live) if ((r.ev.type === 'stdout' || r.ev.type === 'stderr') && r.end !== undefined) ends[r.ev.type].push(r.end)
      const from = { stdout: ends.stdout[rand(ends.stdout.length)]!, stderr: ends.stderr[rand(ends.stderr.length)]! }
      const expected = live.filter(({ ev }) => !((ev.type === 'stdout' || ev.type === 'stderr') && ev.offset < from[ev.type]))
      expect(record(entry, { stdoutOffset: from.stdout, stderrOffset: from.stderr }), JSON.stringify(from)).toEqual(expected)
    }
  })
})

describe('ExecEntry resume inside a character', () => {
  // 'aé€😀b': a=0, é=1..2, €=3..5, 😀=6..9, b=10; 11 bytes.
  const TEXT = 'aé€😀b'
  const BYTES = b(TEXT)
  const nextBoundary = (o: number): number => { let n = o; while (n < BYTES.length && (BYTES[n]! & 0xc0) === 0x80) n++; return n }

  function finishedEntry (): ExecEntry {
    const entry = new ExecEntry('ex_u', 'sbx', spec, 1024)
    // Split mid-character and interleaved with stderr, so resumes cross carries and streams.
    for (const [s, from, to] of [['stdout', 0, 2], ['stderr', 0, 0], ['stdout', 2, 4], ['stdout', 4, 7], ['stderr', 0, 0], ['stdout', 7, 11]] as const) {
      entry.append(s, s === 'stdout' ? BYTES.subarray(from, to) : b('e'))
    }
    entry.finish(EXIT0)
    return entry
  }

  it('starts at the next character boundary, says so in the offset, and never sends U+FFFD', () => {
    const entry = finishedEntry()
    for (let o = 0; o <= BYTES.length; o++) {
      const got = record(entry, { stdoutOffset: o, stderrOffset: 2 })
      const out = got.filter((r) => r.ev.type === 'stdout').map((r) => r.ev as { offset: number, data: string })
      const boundary = nextBoundary(o)
      expect(got.some((r) => r.ev.type === 'gap'), `offset ${o}`).toBe(false)
      expect(out.map((e) => e.data).join(''), `offset ${o}`).toBe(BYTES.subarray(boundary).toString('utf8'))
      expect(out.map((e) => e.data).join(''), `offset ${o}`).not.toContain('\uFFFD')
      if (boundary < BYTES.length) expect(out[0]!.offset, `offset ${o}`).toBe(boundary)
      else expect(out, `offset ${o}`).toEqual([])
    }
  })

  it('a reader that begins inside a character whose end has not arrived drops its continuation bytes as they arrive', () => {
    const entry = new ExecEntry('ex_u', 'sbx', spec, 1024)
    entry.append('stdout', Buffer.concat([b('a'), EMOJI.subarray(0, 2)])) // 3 bytes: a f0 9f
    const got = record(entry, { stdoutOffset: 2 })
    entry.append('stdout', EMOJI.subarray(2, 3))
    entry.append('stderr', b('e'))
    entry.append('stdout', Buffer.concat([EMOJI.subarray(3), b('b')]))
    entry.append('stdout', b('c'))
    entry.finish(EXIT0)
    expect(outputs(got)).toEqual([['stderr', 0, 'e'], ['stdout', 5, 'b'], ['stdout', 6, 'c']])
    expect(got.find((r) => r.ev.type === 'stdout')!.end).toBe(6)
  })

  it('a resume at a boundary drops nothing, not even later bytes that are not UTF-8', () => {
    const entry = new ExecEntry('ex_u', 'sbx', spec, 1024)
    entry.append('stdout', b('ab'))
    entry.append('stdout', Buffer.from([0x80, 0x63]))
    entry.finish(EXIT0)
    expect(outputs(record(entry, { stdoutOffset: 1 }))).toEqual([['stdout', 1, 'b'], ['stdout', 2, '\uFFFDc']])
    // From byte 0 nothing precedes the output: stray continuation bytes there are the output's own.
    const raw = new ExecEntry('ex_r', 'sbx', spec, 1024)
    raw.append('stdout', Buffer.from([0x80, 0x61]))
    expect(outputs(record(raw))).toEqual([['stdout', 0, '\uFFFDa']])
  })

  it('base64 and binary readers start exactly at the offset, inside a character too', () => {
    const entry = finishedEntry()
    for (let o = 0; o <= BYTES.length; o++) {
      const b64 = record(entry, { stdoutOffset: o, encoding: 'base64' }).filter((r) => r.ev.type === 'stdout').map((r) => r.ev as { offset: number, data: string })
      expect(Buffer.concat(b64.map((e) => Buffer.from(e.data, 'base64'))).equals(BYTES.subarray(o)), `base64 ${o}`).toBe(true)
      if (o < BYTES.length) expect(b64[0]!.offset, `base64 ${o}`).toBe(o)
      const bin = record(entry, { stdoutOffset: o, encoding: 'binary' }).filter((r) => r.ev.type === 'stdout')
      expect(bin.map((r) => r.raw).join(''), `binary ${o}`).toBe(BYTES.subarray(o).toString('hex'))
    }
  })
})

// ---- Issue 17: the retention budgets take bytes from the front; offsets stay exact ------------

describe('OutputJournal.dropOldest', () => {
  it('frees whole and cut chunks from the front; what is left keeps its offsets; the start is a gap', () => {
    const j = new OutputJournal(1024)
    j.append(b('abc'))
    j.append(b('defg'))
    j.append(b('hi'))
    expect(j.retained).toBe(9)
    expect(j.dropOldest(5)).toBe(5) // "abc" whole, "de" of "defg"
    expect(j.start).toBe(5)
    expect(j.total).toBe(9)
    expect(j.retained).toBe(4)
    expect(j.readFrom(0)).toEqual({ gap: { from: 0, to: 5 }, chunks: [{ offset: 5, data: b('fg') }, { offset: 7, data: b('hi') }] })
    expect(j.tail()).toEqual({ data: b('fghi'), truncated: true })
    // Appends go on at the next offset, and the gap does not move.
    expect(j.append(b('j'))).toEqual({ offset: 9, data: b('j') })
    expect(j.readFrom(2).gap).toEqual({ from: 2, to: 5 })
  })

  it('never frees more than it holds; down to nothing, the whole output is one gap', () => {
    const j = new OutputJournal(1024)
    j.append(b('abcdef'))
    expect(j.dropOldest(100)).toBe(6)
    expect(j.dropOldest(1)).toBe(0)
    expect(j.retained).toBe(0)
    expect(j.oldestSeq).toBeUndefined()
    expect(j.replayFrom(0)).toEqual({ begin: 6, gap: { from: 0, to: 6 }, chunks: [] })
    expect(j.tail()).toEqual({ data: Buffer.alloc(0), truncated: true })
  })

  it('stops at the first chunk that arrived at or after untilSeq, and a cut chunk keeps its stamp', () => {
    const out = new OutputJournal(1024)
    const err = new OutputJournal(1024)
    out.append(b('o1'))
    err.append(b('e1'))
    out.append(b('o2'))
    const o1 = out.oldestSeq!
    expect(out.dropOldest(100, err.oldestSeq)).toBe(2) // only "o1" came before "e1"
    expect(out.readFrom(0).chunks).toEqual([{ offset: 2, data: b('o2') }])
    const o2 = out.oldestSeq!
    expect(o2).toBeGreaterThan(o1)
    expect(out.dropOldest(1)).toBe(1)
    expect(out.oldestSeq).toBe(o2)
  })

  it('own retention and drops together: start is always total minus retained, replays byte-exact', () => {
    let seed = 7
    const rand = (n: number): number => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed % n }
    const j = new OutputJournal(64)
    let all = Buffer.alloc(0)
    for (let i = 0; i < 400; i++) {
      const chunk = Buffer.from(Array.from({ length: rand(30) }, () => rand(256)))
      j.append(chunk)
      all = Buffer.concat([all, chunk])
      if (rand(3) === 0) j.dropOldest(rand(40))
      expect(j.total).toBe(all.length)
      expect(j.retained).toBeLessThanOrEqual(64)
      expect(j.start).toBe(all.length - j.retained)
      const from = rand(all.length + 1)
      const r = j.readFrom(from)
      expect(r.gap).toEqual(from < j.start ? { from, to: j.start } : undefined)
      expect(joinChunks(r.chunks).equals(all.subarray(Math.max(from, j.start)))).toBe(true)
    }
  })
})

describe('ExecEntry.dropOldest and discard', () => {
  it('drops across both streams in the order the bytes arrived', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    entry.append('stdout', b('o1'))
    entry.append('stderr', b('e1'))
    entry.append('stdout', b('o2'))
    entry.append('stderr', b('e2'))
    expect(entry.retained).toBe(8)
    expect(entry.dropOldest(3)).toBe(3) // "o1", then "e" of "e1"
    expect(entry.stdout.readFrom(0)).toEqual({ gap: { from: 0, to: 2 }, chunks: [{ offset: 2, data: b('o2') }] })
    expect(entry.stderr.readFrom(0)).toEqual({ gap: { from: 0, to: 1 }, chunks: [{ offset: 1, data: b('1') }, { offset: 2, data: b('e2') }] })
    expect(entry.dropOldest(100)).toBe(5)
    expect(entry.retained).toBe(0)
    entry.finish(EXIT0)
    expect(entry.toResult('utf8')).toMatchObject({ stdout: '', stderr: '', stdoutTruncated: true, stderrTruncated: true })
  })

  it('a replay after a drop reports the gap, then the rest in arrival order; a live reader saw everything', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    const live = collect(entry)
    entry.append('stdout', b('aaaa'))
    entry.append('stderr', b('bb'))
    entry.append('stdout', b('cc'))
    entry.dropOldest(5)
    entry.finish(EXIT0)
    expect(textOf(live.events, 'stdout')).toBe('aaaacc')
    expect(textOf(live.events, 'stderr')).toBe('bb')
    expect(finals(live.events)).toHaveLength(1)
    expect(collect(entry).events).toEqual([
      { type: 'gap', stream: 'stdout', from: 0, to: 4 },
      { type: 'gap', stream: 'stderr', from: 0, to: 1 },
      { type: 'stderr', offset: 1, data: 'b' },
      { type: 'stdout', offset: 4, data: 'cc' },
      { type: 'exit', exitCode: 0, signal: null, timedOut: false }
    ])
  })

  it('a discarded exec holds nothing, and later output still reaches attached readers live', () => {
    const entry = new ExecEntry('ex_1', 'sbx', spec, 1024)
    entry.append('stdout', b('before'))
    const live = collect(entry, { stdoutOffset: 6 })
    entry.discard()
    expect(entry.retained).toBe(0)
    entry.append('stdout', b('after'))
    expect(entry.retained).toBe(0)
    expect(entry.stdout.total).toBe(11)
    expect(live.events).toEqual([{ type: 'stdout', offset: 6, data: 'after' }])
  })
})

describe('OutputJournal.skipTo', () => {
  it('gives the next byte the offset, and reports the bytes in between as a gap', () => {
    const skips: unknown[] = []
    const j = new OutputJournal(1024, (gap, freed) => skips.push({ gap, freed }))
    j.append(b('abc'))
    j.skipTo(10)
    expect(skips).toEqual([{ gap: { from: 3, to: 10 }, freed: 3 }])
    expect(j.append(b('xy')).offset).toBe(10)
    expect(j.total).toBe(12)
    const r = j.readFrom(0)
    expect(r.gap).toEqual({ from: 0, to: 10 })
    expect(joinChunks(r.chunks).toString()).toBe('xy')
    expect(j.readFrom(11).chunks).toEqual([{ offset: 11, data: b('y') }])
  })

  it('never goes back', () => {
    const j = new OutputJournal(1024)
    j.append(b('abcdef'))
    j.skipTo(2)
    j.skipTo(6)
    expect(j.total).toBe(6)
    expect(joinChunks(j.readFrom(0).chunks).toString()).toBe('abcdef')
  })
})

describe('ExecEntry relay events', () => {
  const relaySpec = validateExecRequest({ command: ['true'] })

  it('tells live readers when the relay is lost and restored, never twice the same', () => {
    const e = new ExecEntry('ex_r', 'sb', relaySpec, 1024)
    e.markStarted()
    const seen: ExecEvent[] = []
    e.attach({}, (ev) => seen.push(ev))
    e.relayLost()
    e.relayLost()
    e.relayRestored()
    e.relayRestored()
    e.append('stdout', b('hi'))
    expect(seen).toEqual([
      { type: 'relay', state: 'lost' },
      { type: 'relay', state: 'restored' },
      { type: 'stdout', offset: 0, data: 'hi' }
    ])
  })

  it('says restored before the first output of a reattached channel, even before the run knows the attach succeeded', () => {
    const e = new ExecEntry('ex_r', 'sb', relaySpec, 1024)
    e.markStarted()
    const seen: ExecEvent[] = []
    e.attach({}, (ev) => seen.push(ev))
    e.relayLost()
    e.append('stdout', b('hi'))
    e.relayRestored()
    expect(seen).toEqual([
      { type: 'relay', state: 'lost' },
      { type: 'relay', state: 'restored' },
      { type: 'stdout', offset: 0, data: 'hi' }
    ])
  })

  it('never sends a reader bytes below the offset it resumed from, when the journal holds less than that yet', () => {
    const e = new ExecEntry('ex_r', 'sb', relaySpec, 1024)
    e.markStarted()
    const seen: ExecEvent[] = []
    e.attach({ stdoutOffset: 3 }, (ev) => seen.push(ev))
    e.append('stdout', b('ab'))
    e.append('stdout', b('cdef'))
    expect(seen).toEqual([{ type: 'stdout', offset: 3, data: 'def' }])
  })

  it('starts a reader that attaches while the relay is lost with relay lost; replays keep no relay events', () => {
    const e = new ExecEntry('ex_r', 'sb', relaySpec, 1024)
    e.markStarted()
    e.append('stdout', b('a'))
    e.relayLost()
    const during: ExecEvent[] = []
    e.attach({}, (ev) => during.push(ev))
    expect(during).toEqual([{ type: 'relay', state: 'lost' }, { type: 'stdout', offset: 0, data: 'a' }])
    e.relayRestored()
    const after: ExecEvent[] = []
    e.attach({}, (ev) => after.push(ev))
    expect(after).toEqual([{ type: 'stdout', offset: 0, data: 'a' }])
  })

  it('tells live readers of a skip as a gap, and continues from it', () => {
    const e = new ExecEntry('ex_r', 'sb', relaySpec, 1024, undefined, new Date('2026-01-01T00:00:00Z'))
    expect(e.toJSON().createdAt).toBe('2026-01-01T00:00:00.000Z')
    e.markStarted()
    const seen: ExecEvent[] = []
    e.attach({}, (ev) => seen.push(ev))
    e.append('stdout', b('ab'))
    e.stdout.skipTo(9)
    e.append('stdout', b('z'))
    expect(seen).toEqual([
      { type: 'stdout', offset: 0, data: 'ab' },
      { type: 'gap', stream: 'stdout', from: 2, to: 9 },
      { type: 'stdout', offset: 9, data: 'z' }
    ])
  })
})
