// Output oracle (issue 11 item 2): generated shell programs (writes of 0 B to 16 MiB to stdout
// and stderr, interleaved, fast and slow producers, both streams at once, sleeps, background
// children, a stream closed early, exit codes 0-255, deaths by signal; test/oracle/programs.ts)
// run through the gateway on both daemons (the embedded ssh2 daemon in a real supervisor process,
// and OpenSSH's sshd) and directly by /bin/sh in this process. Each stream must match byte for
// byte (length and sha256, from the offset the reader asked for, after exactly the gap retention
// explains), and so must the exit code or signal, in the record and in the final event
// (test/oracle/verify.ts). The way of reading is drawn per case and daemon
// (test/oracle/reader-kinds.ts, read by test/oracle/readers.ts): nobody attached (poll the record, then read /events), ?wait=true, a
// WebSocket from the start (JSON or binary frames), a WebSocket after the end (mostly on a
// gateway with a small retention: gap + tail), SSE or NDJSON from the start, a reader that stops
// reading for 1-3 s, two readers at once (one pausing), and a reader that leaves partway and comes
// back at its offsets (SSE through Last-Event-ID). A fixed list of regression cases (the shapes of
// the large-burst hang fixed in ba114f0) always runs. Every case races a bound computed from its
// size: a hang fails that case with "hang: ...", with what the gateway held at that moment,
// never the test's timeout (which is above the sum of all bounds).
//
// ORACLE_SEED=s replays a run (the seed is printed at the start); ORACLE_RUNS_SCALE=n multiplies
// the number of programs (200 at scale 1, each on both daemons: 400 cases); ORACLE_CASE=i runs
// only program i of that seed; ORACLE_CONCURRENCY (default 6) cases at a time;
// ORACLE_MAX_FAILURES (default 6) stops starting new cases after that many failures;
// ORACLE_SHRINK_S (default 90, 0 = off) seconds to shrink the first failing program.
//
// This file holds the cases and the tests; one case's run through the gateway is
// test/oracle/run-case.ts, and the bounds, the pool and the shrinker are test/oracle/runner.ts.
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import fc from 'fast-check'
import { intEnv } from '../helpers/env.js'
import { startSandbox, type Daemon, type TestSandbox } from '../helpers/sandbox.js'
import { MiB, programArb, renderProgram, runDirect, writePools, type OracleResult, type Program, type Rendered } from './programs.js'
import { pauseStats } from './readers.js'
import { BIG_RETENTION, SMALL_RETENTION, describeSpec, rawReaderArb, readerSpec, type PauseSpec, type ReaderSpec } from './reader-kinds.js'
import { exercised, runCase, type Target } from './run-case.js'
import { HangError, runUntilFailures, shared, shrinkProgram, type Failure as RunnerFailure, type Shared } from './runner.js'

const SCALE = intEnv('ORACLE_RUNS_SCALE', 1, 1, 1000)
const SEED = seedFromEnv()
const ONLY = process.env.ORACLE_CASE === undefined || process.env.ORACLE_CASE === '' ? undefined : intEnv('ORACLE_CASE', 0, 0, 1e9)
const CONCURRENCY = intEnv('ORACLE_CONCURRENCY', 6, 1, 32)
const MAX_FAILURES = intEnv('ORACLE_MAX_FAILURES', 6, 1, 1e9)
const SHRINK_MS = intEnv('ORACLE_SHRINK_S', 90, 0, 3600) * 1000
// Programs per run at scale 1; each runs on both daemons, so twice as many cases.
const PROGRAMS = 200 * SCALE

function seedFromEnv (): number {
  const raw = process.env.ORACLE_SEED
  if (raw === undefined || raw === '') return (Date.now() ^ Math.floor(Math.random() * 0x7fffffff)) | 0
  if (!/^-?\d+$/.test(raw)) throw new Error(`ORACLE_SEED must be an integer, got ${JSON.stringify(raw)}`)
  return Number(raw) | 0
}

interface Case {
  index: number
  program: Program
  readers: Record<Daemon, ReaderSpec>
}

const caseArb = fc.record({ program: programArb, embedded: rawReaderArb, openssh: rawReaderArb })

function sampleCases (): Case[] {
  return fc.sample(caseArb, { seed: SEED, numRuns: PROGRAMS }).map((c, index) => ({
    index,
    program: c.program,
    readers: { embedded: readerSpec(c.embedded, c.program.content), openssh: readerSpec(c.openssh, c.program.content) }
  }))
}

// ---------------------------------------------------------------------------------------------
// Bounds

const BASE_BOUND_MS = 15_000
const MS_PER_MIB = 600 // ~1.7 MiB/s per case, with CONCURRENCY cases sharing two cores

function boundMs (bytes: number, sleepMs: number, pauses: PauseSpec[], background: boolean, awayMs = 0): number {
  return Math.ceil(BASE_BOUND_MS + (bytes / MiB) * MS_PER_MIB + sleepMs + pauses.reduce((n, p) => n + p.ms, 0) + (background ? 1000 : 0) + awayMs)
}

// ---------------------------------------------------------------------------------------------
// Scheduling

interface Task {
  label: string
  daemon: Daemon
  spec: ReaderSpec
  script: string
  bytes: number
  bound: number
  oracle: SharedOracle
  replay: string
  program?: Program
}

type Failure = RunnerFailure<Task>

interface Totals { cases: number, bytes: number, slowest: { label: string, ms: number } | undefined, byKind: Record<string, number> }

// One /bin/sh run of a script, shared by the cases that compare against it (both daemons, or
// both regression readers).
type SharedOracle = Shared<OracleResult>

function oracleFor (script: string, bound: number, users: number): SharedOracle {
  return shared(async () => await runDirect(script, bound), users)
}

async function runTask (targets: Record<Daemon, Target>, t: Task): Promise<{ problems: string[], ms: number }> {
  try {
    let oracle: OracleResult
    try {
      oracle = await t.oracle.get()
    } catch (err) {
      return { problems: [`oracle: ${String((err as Error).message)}`], ms: 0 }
    }
    try {
      return await runCase(targets[t.daemon], t.label, t.script, t.spec, oracle, t.bound)
    } catch (err) {
      return { problems: [err instanceof HangError ? err.message : `run failed: ${String((err as Error).stack ?? err)}`], ms: 0 }
    }
  } finally {
    t.oracle.done()
  }
}

async function runAll (targets: Record<Daemon, Target>, tasks: Task[], totals: Totals): Promise<Failure[]> {
  const { failures, notStarted } = await runUntilFailures(tasks, { concurrency: CONCURRENCY, maxFailures: MAX_FAILURES }, async (t) => {
    const r = await runTask(targets, t)
    totals.cases++
    totals.bytes += t.bytes
    totals.byKind[`${t.daemon} ${t.spec.kind}`] = (totals.byKind[`${t.daemon} ${t.spec.kind}`] ?? 0) + 1
    if (totals.slowest === undefined || r.ms > totals.slowest.ms) totals.slowest = { label: t.label, ms: r.ms }
    if (r.problems.length > 0) console.log(`[oracle] FAIL ${t.label}\n  ${r.problems.slice(0, 8).join('\n  ')}`)
    return r.problems
  })
  if (failures.length >= MAX_FAILURES && notStarted > 0) console.log(`[oracle] stopped after ${failures.length} failures; ${notStarted} cases not run`)
  return failures
}

// A script under its failure, one level in.
function indented (script: string): string {
  return script.trimEnd().split('\n').map((l) => `      ${l}`).join('\n')
}

function report (failures: Failure[], extra: string[] = []): string {
  return [
    `${failures.length} case(s) differ from /bin/sh (seed ${SEED}):`,
    ...failures.slice(0, 6).map((f) => [
      `- ${f.task.label}`,
      ...f.messages.slice(0, 8).map((m) => `    ${m}`),
      `    replay: ${f.task.replay}`,
      `    script:\n${indented(f.task.script)}`
    ].join('\n')),
    ...extra
  ].join('\n')
}

// Shrinks the first failing random program against the same daemon and reader, for SHRINK_MS.
async function shrink (targets: Record<Daemon, Target>, f: Failure, pools: ReturnType<typeof writePools>): Promise<string | undefined> {
  if (SHRINK_MS === 0 || f.task.program === undefined) return undefined
  const found = await shrinkProgram(f.task.program, f.messages, async (c) => {
    const r = renderProgram(c, pools)
    const bytes = r.bytes.stdout + r.bytes.stderr
    const t: Task = { ...f.task, script: r.script, bytes, oracle: oracleFor(r.script, boundMs(bytes, r.sleepMs, [], true), 1), bound: boundMs(bytes, r.sleepMs, f.task.spec.pauses, true, f.task.spec.awayMs) }
    return (await runTask(targets, t)).problems
  }, Date.now() + SHRINK_MS)
  const r = renderProgram(found.program, pools)
  return [`shrunk in ${found.tries} tries (${f.task.daemon}, ${describeSpec(f.task.spec)}):`, ...found.problems.slice(0, 6).map((m) => `    ${m}`), `    script:\n${indented(r.script)}`].join('\n')
}

// ---------------------------------------------------------------------------------------------

const pools = writePools(SEED)
const cases = sampleCases().filter((c) => ONLY === undefined || c.index === ONLY)
const randomTasks: Task[] = cases.flatMap((c) => {
  const r: Rendered = renderProgram(c.program, pools)
  const bytes = r.bytes.stdout + r.bytes.stderr
  const background = c.program.steps.some((s) => s.kind === 'bg')
  const oracle = oracleFor(r.script, boundMs(bytes, r.sleepMs, [], background), 2)
  return (['embedded', 'openssh'] as const).map((daemon): Task => {
    const spec = c.readers[daemon]
    return {
      label: `case #${c.index} on ${daemon} (${describeSpec(spec)}; ${(bytes / MiB).toFixed(2)} MiB)`,
      daemon,
      spec,
      script: r.script,
      bytes,
      bound: boundMs(bytes, r.sleepMs, spec.pauses, background, spec.awayMs),
      oracle,
      replay: `ORACLE_SEED=${SEED} ORACLE_CASE=${c.index} npx vitest run test/oracle/oracle.test.ts`,
      program: c.program
    }
  })
})

// The shapes of the large-burst hang (fixed in the embedded daemon's channel output), always run:
// with nobody attached and with ?wait=true, on both daemons.
const REGRESSIONS: Array<{ name: string, script: string, bytes: number }> = [
  { name: '4 MiB of zeros on stdout, then one line on stderr', script: 'head -c 4194304 /dev/zero; echo done >&2', bytes: 4 * MiB },
  { name: '5 MiB burst on stderr, then one line on stdout', script: `head -c 5242880 ${pools.bin} >&2; echo done`, bytes: 5 * MiB },
  { name: 'dd bs=1M count=4 (its record counts go to stderr after the burst), then stderr', script: 'dd if=/dev/zero bs=1M count=4 status=noxfer; echo done >&2', bytes: 4 * MiB },
  { name: '12,582,912 bytes on stdout, then stderr, then exit 3', script: `head -c 12582912 ${pools.bin}; echo err >&2; exit 3`, bytes: 12 * MiB }
]
const regressionTasks: Task[] = REGRESSIONS.flatMap((reg, i) => {
  const bound = boundMs(reg.bytes, 0, [], false)
  const oracle = oracleFor(reg.script, bound, 4)
  return (['embedded', 'openssh'] as const).flatMap((daemon) => (['detached', 'wait'] as const).map((kind): Task => {
    const spec: ReaderSpec = { kind, transport: i % 2 === 0 ? 'ndjson' : 'sse', encoding: 'base64', small: false, gated: false, resume: undefined, pauses: [], second: 'ndjson', leaveAt: 0, awayMs: 0 }
    return { label: `regression "${reg.name}" on ${daemon} (${describeSpec(spec)})`, daemon, spec, script: reg.script, bytes: reg.bytes, bound, oracle, replay: 'npx vitest run test/oracle/oracle.test.ts -t regression' }
  }))
})

function testTimeout (tasks: Task[]): number {
  const sum = tasks.reduce((n, t) => n + t.bound, 0)
  const max = tasks.reduce((n, t) => Math.max(n, t.bound), 0)
  return Math.ceil(sum / CONCURRENCY + 2 * max + SHRINK_MS + 120_000)
}

describe('output oracle: the gateway on both daemons against /bin/sh', () => {
  const targets = {} as Record<Daemon, Target>
  const sandboxes: TestSandbox[] = []
  const started = Date.now()

  beforeAll(async () => {
    const randomBytes = randomTasks.reduce((n, t) => n + t.bytes, 0)
    console.log(`[oracle] seed ${SEED} (replay with ORACLE_SEED=${SEED}), scale ${SCALE}: ${cases.length} programs × 2 daemons = ${randomTasks.length} cases ` +
      `(${(randomBytes / MiB).toFixed(0)} MiB through the gateway) + ${regressionTasks.length} regression cases; ${CONCURRENCY} at a time` +
      (ONLY === undefined ? '' : `; only case #${ONLY}`))
    const start = async (daemon: Daemon, retention: number, id: string): Promise<TestSandbox> => {
      const sb = await startSandbox(daemon, id, { retentionBytes: retention })
      sandboxes.push(sb)
      return sb
    }
    const [eb, es, ob, os] = await Promise.all([
      start('embedded', BIG_RETENTION, 'oracle-embedded'),
      start('embedded', SMALL_RETENTION, 'oracle-embedded-small'),
      start('openssh', BIG_RETENTION, 'oracle-openssh'),
      start('openssh', SMALL_RETENTION, 'oracle-openssh-small')
    ])
    targets.embedded = { daemon: 'embedded', big: eb!, small: es! }
    targets.openssh = { daemon: 'openssh', big: ob!, small: os! }
  }, 120_000)

  afterAll(async () => {
    await Promise.all(sandboxes.map(async (sb) => await sb.close()))
    pools.close()
    console.log(`[oracle] seed ${SEED}: done in ${((Date.now() - started) / 1000).toFixed(1)} s`)
  }, 60_000)

  function expectHealthy (): void {
    for (const sb of sandboxes) {
      expect(sb.sup.proc.exitCode, `supervisor of ${sb.id} exited:\n${sb.sup.output().slice(-2000)}`).toBeNull()
      expect(sb.g.gw.registry.get(sb.id)?.session, `${sb.id} still connected`).toBeDefined()
    }
  }

  it('regression: bursts past the SSH window followed by a write to the other stream end, with exact output', async () => {
    const totals: Totals = { cases: 0, bytes: 0, slowest: undefined, byKind: {} }
    const failures = await runAll(targets, regressionTasks, totals)
    if (failures.length > 0) throw new Error(report(failures))
    expect(totals.cases).toBe(regressionTasks.length)
    expectHealthy()
  }, testTimeout(regressionTasks))

  it(`random programs match /bin/sh byte for byte on both daemons, through every way of reading (${randomTasks.length} cases)`, async () => {
    const t0 = Date.now()
    const totals: Totals = { cases: 0, bytes: 0, slowest: undefined, byKind: {} }
    const failures = await runAll(targets, randomTasks, totals)
    console.log(`[oracle] seed ${SEED}: ${totals.cases} cases, ${(totals.bytes / MiB).toFixed(0)} MiB in ${((Date.now() - t0) / 1000).toFixed(1)} s; ` +
      `slowest ${totals.slowest?.label ?? '-'} ${totals.slowest?.ms ?? 0} ms; by reader: ${JSON.stringify(totals.byKind)}; exercised: ${JSON.stringify({ ...exercised, pauses: pauseStats.taken })}`)
    if (failures.length > 0) {
      const shrunk = await shrink(targets, failures[0]!, pools)
      throw new Error(report(failures, shrunk === undefined ? [] : [shrunk]))
    }
    expect(totals.cases).toBe(randomTasks.length)
    expectHealthy()
  }, testTimeout(randomTasks))
})
