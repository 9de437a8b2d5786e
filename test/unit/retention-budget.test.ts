// src/execs/retention-budget.ts with real ExecEntry journals: the bytes retained per sandbox and
// in total stay within their budgets, every journal still replays exactly what it holds behind
// the right gap, and eviction takes from whom the contract says, in its order.
import { describe, expect, it } from 'vitest'
import fc from 'fast-check'
import { ExecEntry, type StreamName } from '../../src/execs/exec-entry.js'
import { RetentionBudget } from '../../src/execs/retention-budget.js'
import { validateExecRequest } from '../../src/execs/validate.js'
import type { Outcome } from '../../src/relay/outcome.js'

const spec = validateExecRequest({ command: ['true'] })
const EXIT0: Outcome = { kind: 'exited', exitCode: 0, signal: null, timedOut: false }
const SEED = process.env.FC_SEED === undefined ? undefined : Number(process.env.FC_SEED)

// A test world: real entries on one budget, what each was sent (to compare replays with), and
// every drop the budget asked for, with the state it was asked in.
interface Tracked {
  entry: ExecEntry
  created: number
  ended: number | undefined
  removed: boolean
  sent: Record<StreamName, Buffer>
}

interface Drop { exec: Tracked, heldBySandbox: Map<string, number>, perSandboxOver: boolean }

class World {
  readonly budget: RetentionBudget
  readonly execs: Tracked[] = []
  readonly drops: Drop[] = []
  readonly #perExec: number
  readonly #perSandbox: number
  #clock = 0

  // Recording the holdings at each drop scans every exec: off for the cost test.
  readonly #snapshots: boolean

  constructor (perExec: number, perSandbox: number, total: number, snapshots = true) {
    this.#snapshots = snapshots
    this.#perExec = perExec
    this.#perSandbox = perSandbox
    this.budget = new RetentionBudget({ perSandbox, total })
  }

  create (sandboxId: string): Tracked {
    const entry = new ExecEntry(`ex_${this.execs.length}`, sandboxId, spec, this.#perExec, this.budget)
    const t: Tracked = { entry, created: this.#clock++, ended: undefined, removed: false, sent: { stdout: Buffer.alloc(0), stderr: Buffer.alloc(0) } }
    // Every drop is recorded with the holdings at the moment the budget asked for it.
    const drop = entry.dropOldest.bind(entry)
    entry.dropOldest = (n: number): number => {
      const held = this.#snapshots ? this.heldBySandbox() : new Map<string, number>()
      this.drops.push({ exec: t, heldBySandbox: held, perSandboxOver: (held.get(sandboxId) ?? 0) > this.#perSandbox })
      return drop(n)
    }
    this.execs.push(t)
    return t
  }

  append (t: Tracked, stream: StreamName, data: Buffer): void {
    t.entry.append(stream, data)
    if (!t.entry.finished) t.sent[stream] = Buffer.concat([t.sent[stream], data])
  }

  finish (t: Tracked): void {
    if (t.entry.finished) return
    t.entry.finish(EXIT0)
    t.ended = this.#clock++
  }

  remove (t: Tracked): void {
    t.removed = true
    t.entry.discard()
  }

  live (): Tracked[] { return this.execs.filter((t) => !t.removed) }

  heldBySandbox (): Map<string, number> {
    const m = new Map<string, number>()
    for (const t of this.live()) m.set(t.entry.sandboxId, (m.get(t.entry.sandboxId) ?? 0) + t.entry.retained)
    return m
  }
}

// The property's checks return what is wrong, as text, so that a step costs one assertion.

// Every journal holds exactly a suffix of what it was sent, no more than its own retention, and
// replays it behind a gap that covers exactly what is gone.
function journalViolations (w: World, perExec: number): string[] {
  const out: string[] = []
  for (const t of w.live()) {
    for (const stream of ['stdout', 'stderr'] as const) {
      const j = t.entry[stream]
      const sent = t.sent[stream]
      const name = `${t.entry.id} ${stream}`
      if (j.total !== sent.length) out.push(`${name}: total ${j.total}, sent ${sent.length}`)
      if (j.retained > perExec) out.push(`${name}: holds ${j.retained} > its own retention ${perExec}`)
      if (j.start !== sent.length - j.retained) out.push(`${name}: start ${j.start} is not total - retained`)
      const r = j.readFrom(0)
      const gapOk = j.start > 0 ? r.gap?.from === 0 && r.gap.to === j.start : r.gap === undefined
      if (!gapOk) out.push(`${name}: gap ${JSON.stringify(r.gap)} with start ${j.start}`)
      if (!Buffer.concat(r.chunks.map((c) => c.data)).equals(sent.subarray(j.start))) out.push(`${name}: replay is not the sent bytes from ${j.start}`)
      const tail = j.tail()
      if (tail.truncated !== (j.start > 0) || !tail.data.equals(sent.subarray(j.start))) out.push(`${name}: tail differs`)
    }
  }
  return out
}

// For the total, only a sandbox that holds the most gives anything up; checked on the holdings
// each drop saw. Holders that tie take turns, so one of them may be half of what was over (at
// most half the chunk just appended) below another when its turn ends.
function totalDropViolations (w: World, appendedIn: string, chunk: number): string[] {
  const out: string[] = []
  for (const d of w.drops) {
    const sandbox = d.exec.entry.sandboxId
    if (sandbox === appendedIn && d.perSandboxOver) continue
    const held = d.heldBySandbox.get(sandbox) ?? 0
    for (const [other, h] of d.heldBySandbox) {
      if (h - held > Math.ceil(chunk / 2)) out.push(`${sandbox} (${held}) trimmed for the total while ${other} held ${h}`)
    }
  }
  w.drops.length = 0
  return out
}

// When exec v lost bytes in a step, no exec ahead of it in its sandbox's eviction order may
// still hold any.
function orderViolations (w: World, before: Map<Tracked, number>, appended: Tracked): string[] {
  const out: string[] = []
  const live = w.live()
  for (const v of live) {
    if (v === appended || v.entry.retained >= (before.get(v) ?? 0)) continue
    for (const x of live) {
      if (x !== v && x.entry.sandboxId === v.entry.sandboxId && isAhead(x, v) && x.entry.retained > 0) {
        out.push(`${x.entry.id} still holds ${x.entry.retained} while ${v.entry.id}, after it in eviction order, lost bytes`)
      }
    }
  }
  return out
}

// Whether x comes before v in eviction order: finished before running; finished by end, running
// by creation.
function isAhead (x: Tracked, v: Tracked): boolean {
  if (x.ended !== undefined && v.ended === undefined) return true
  if (x.ended !== undefined && v.ended !== undefined) return x.ended < v.ended
  if (x.ended === undefined && v.ended === undefined) return x.created < v.created
  return false
}

describe('RetentionBudget', () => {
  it('property: budgets hold, journals stay exact, eviction follows the contract', () => {
    const sandboxes = ['a', 'b', 'c']
    const op = fc.oneof(
      { arbitrary: fc.record({ kind: fc.constant('create' as const), sandbox: fc.constantFrom(...sandboxes) }), weight: 2 },
      { arbitrary: fc.record({ kind: fc.constant('append' as const), exec: fc.nat(), stream: fc.constantFrom('stdout' as const, 'stderr' as const), data: fc.uint8Array({ minLength: 0, maxLength: 80, size: 'max' }) }), weight: 8 },
      { arbitrary: fc.record({ kind: fc.constant('finish' as const), exec: fc.nat() }), weight: 2 },
      { arbitrary: fc.record({ kind: fc.constant('remove' as const), exec: fc.nat() }), weight: 1 }
    )
    fc.assert(fc.property(
      fc.integer({ min: 8, max: 64 }), fc.integer({ min: 16, max: 200 }), fc.integer({ min: 16, max: 300 }), fc.array(op, { minLength: 10, maxLength: 150, size: 'max' }),
      (perExec, perSandbox, total, ops) => {
        const w = new World(perExec, perSandbox, total)
        for (const [step, o] of ops.entries()) {
          const live = w.live()
          const problems: string[] = []
          let appendedIn = ''
          let chunk = 0
          if (o.kind === 'create') {
            w.create(o.sandbox)
          } else if (live.length === 0) {
            continue
          } else {
            const t = live[o.exec % live.length]!
            if (o.kind === 'append') {
              const before = new Map(live.map((x) => [x, x.entry.retained]))
              appendedIn = t.entry.sandboxId
              chunk = o.data.length
              w.append(t, o.stream, Buffer.from(o.data))
              problems.push(...orderViolations(w, before, t))
            } else if (o.kind === 'finish') {
              w.finish(t)
            } else {
              w.remove(t)
            }
          }
          problems.push(...totalDropViolations(w, appendedIn, chunk))
          const held = w.heldBySandbox()
          let sum = 0
          for (const s of sandboxes) {
            const h = held.get(s) ?? 0
            if (w.budget.retainedBy(s) !== h) problems.push(`${s}: budget counts ${w.budget.retainedBy(s)}, journals hold ${h}`)
            if (h > perSandbox) problems.push(`${s}: holds ${h} > ${perSandbox}`)
            sum += h
          }
          if (w.budget.retained !== sum) problems.push(`total counted ${w.budget.retained}, held ${sum}`)
          if (sum > total) problems.push(`total ${sum} > ${total}`)
          problems.push(...journalViolations(w, perExec))
          expect(problems, `after step ${step} (${o.kind})`).toEqual([])
        }
      }
    ), { numRuns: Number(process.env.FC_RUNS ?? 300), endOnFailure: process.env.FC_END === '1', ...(SEED === undefined ? {} : { seed: SEED }) })
  })

  it('within a sandbox: finished execs first, the one that ended first first, each down to nothing', () => {
    const w = new World(100, 100, 1_000_000)
    const [e1, e2, e3] = [w.create('a'), w.create('a'), w.create('a')]
    w.append(e1, 'stdout', Buffer.alloc(30, 1))
    w.append(e2, 'stdout', Buffer.alloc(30, 2))
    w.append(e3, 'stdout', Buffer.alloc(30, 3))
    w.finish(e2) // e2 ends before e1, though created after it
    w.finish(e1)
    const e4 = w.create('a')
    w.append(e4, 'stdout', Buffer.alloc(45, 4)) // 135 held: 35 over
    expect([e1, e2, e3, e4].map((t) => t.entry.retained)).toEqual([25, 0, 30, 45])
    w.append(e4, 'stderr', Buffer.alloc(30, 5)) // 30 over: e1's last 25, then 5 of running e3
    expect([e1, e2, e3, e4].map((t) => t.entry.retained)).toEqual([0, 0, 25, 75])
    expect(w.budget.retainedBy('a')).toBe(100)
  })

  it('only running execs over the budget: the one created first gives up its oldest first', () => {
    const w = new World(100, 50, 1_000_000)
    const [r1, r2, r3] = [w.create('a'), w.create('a'), w.create('a')]
    w.append(r1, 'stdout', Buffer.from('a'.repeat(20)))
    w.append(r2, 'stdout', Buffer.from('b'.repeat(20)))
    w.append(r3, 'stdout', Buffer.from('c'.repeat(20))) // 10 over: from r1
    expect([r1, r2, r3].map((t) => t.entry.retained)).toEqual([10, 20, 20])
    expect(r1.entry.stdout.readFrom(0)).toMatchObject({ gap: { from: 0, to: 10 } })
    w.append(r2, 'stdout', Buffer.from('b'.repeat(15))) // r1's last 10, then 5 of r2
    expect([r1, r2, r3].map((t) => t.entry.retained)).toEqual([0, 30, 20])
    // r1 grows again: it is still the oldest, so it goes first again.
    w.append(r1, 'stdout', Buffer.from('A'.repeat(5)))
    expect([r1, r2, r3].map((t) => t.entry.retained)).toEqual([0, 30, 20])
    w.finish(r1)
    w.finish(r2)
    w.finish(r3)
    expect(r1.entry.toResult('utf8')).toMatchObject({ stdout: '', stdoutTruncated: true })
    expect(r2.entry.toResult('utf8')).toMatchObject({ stdout: 'b'.repeat(30), stdoutTruncated: true })
    expect(r3.entry.toResult('utf8')).toMatchObject({ stdout: 'c'.repeat(20), stdoutTruncated: false })
  })

  it('over the total, the biggest holder pays; a smaller sandbox keeps everything', () => {
    const w = new World(1000, 1000, 100)
    const b = w.create('b')
    w.append(b, 'stdout', Buffer.alloc(30, 0x62))
    w.finish(b)
    const a = [w.create('a'), w.create('a'), w.create('a')]
    for (const t of a) w.append(t, 'stdout', Buffer.alloc(30, 0x61)) // 120 held: a (90) pays 20
    expect(w.budget.retained).toBe(100)
    expect(w.budget.retainedBy('a')).toBe(70)
    expect(w.budget.retainedBy('b')).toBe(30)
    expect(b.entry.toResult('utf8')).toMatchObject({ stdout: 'b'.repeat(30), stdoutTruncated: false })
    // c (50) and a (70, down to 50 first) are then the biggest, level: they share the rest;
    // b, holding less, keeps everything.
    const c = w.create('c')
    w.append(c, 'stdout', Buffer.alloc(50, 0x63))
    expect(w.budget.retained).toBe(100)
    expect(w.budget.retainedBy('a')).toBe(35)
    expect(w.budget.retainedBy('c')).toBe(35)
    expect(w.budget.retainedBy('b')).toBe(30)
    expect(b.entry.toResult('utf8')).toMatchObject({ stdout: 'b'.repeat(30), stdoutTruncated: false })
  })

  it('a removed exec releases its bytes, and a sandbox with nothing left is forgotten', () => {
    const w = new World(100, 100, 150)
    const [a1, a2] = [w.create('a'), w.create('a')]
    w.append(a1, 'stdout', Buffer.alloc(60))
    w.append(a2, 'stderr', Buffer.alloc(40))
    expect(w.budget.retained).toBe(100)
    w.remove(a1)
    expect(w.budget.retained).toBe(40)
    w.append(a1, 'stdout', Buffer.alloc(10)) // a deleted exec still running retains nothing
    expect(w.budget.retained).toBe(40)
    w.remove(a2)
    expect(w.budget.retainedBy('a')).toBe(0)
    expect(w.budget.retained).toBe(0)
  })

  it('bookkeeping is amortised: drops per append stay bounded with thousands of execs', () => {
    const w = new World(64, 4096, 8192, false)
    for (let i = 0; i < 3000; i++) {
      const t = w.create(`s${i % 7}`)
      w.append(t, 'stdout', Buffer.alloc(40))
      if (i % 3 !== 0) w.finish(t)
    }
    let calls = 0
    const appends = 20_000
    const all = w.live()
    const started = performance.now()
    for (let i = 0; i < appends; i++) {
      const t = all[(i * 7919) % all.length]!
      w.drops.length = 0
      w.append(t, 'stderr', Buffer.alloc(1 + (i % 50)))
      calls += w.drops.length
    }
    // Each drop either satisfies the need or empties a holder, and a holder emptied stays so
    // until it grows again: at most about two drops per append.
    expect(calls).toBeLessThanOrEqual(appends * 3)
    expect(w.budget.retained).toBeLessThanOrEqual(8192)
    // Generous (it takes tens of ms): a scan of 3,000 execs per append would take seconds.
    expect(performance.now() - started).toBeLessThan(1500)
  })
})
