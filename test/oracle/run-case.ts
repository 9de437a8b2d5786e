// One case through the gateway: an exec of the script on one daemon, read the way its reader
// spec says, every reader's observation checked against the oracle, all within the case's bound
// (a hang fails the case with what the gateway held at that moment).
import type WebSocket from 'ws'
import type { Daemon, TestSandbox } from '../helpers/sandbox.js'
import { sleep } from '../helpers/wait.js'
import type { ExecEntry } from '../../src/execs/exec-entry.js'
import { STREAMS, type OracleResult } from './programs.js'
import { BIG_RETENTION, SMALL_RETENTION, type ReaderSpec } from './reader-kinds.js'
import {
  createExec, deleteExec, getExec, pollEnded, readExec, runWait, sendEof,
  type Encoding, type Observation, type Offsets, type Pause, type Transport
} from './readers.js'
import { bounded } from './runner.js'
import { describeBytes, verify, verifyPrefix, type Expect } from './verify.js'

export interface Target { daemon: Daemon, big: TestSandbox, small: TestSandbox }

export interface RunOutcome { problems: string[], ms: number }

let runSerial = 0

// What the cases exercised, for the summary line (a reader that never left or a pause that
// never came would make a kind vacuous).
export const exercised = { left: 0, resumedAfterGap: 0, gapsAfterEnd: 0, truncatedResults: 0, signals: 0 }

// What the gateway holds of each stream at a hang, against the oracle: how far it got, and
// whether those bytes are the oracle's (a repeated or lost chunk shows here even when the exec
// never ends).
function journalDiagnosis (entry: ExecEntry, oracle: OracleResult): string {
  return (['stdout', 'stderr'] as const).map((s) => {
    const j = entry[s]
    const held = j.tail().data
    const want = oracle[s].subarray(j.start, j.start + held.length)
    const verdict = held.equals(want) && j.total <= oracle[s].length
      ? 'the oracle\'s bytes so far'
      : `NOT the oracle's bytes: ${describeBytes(held)} vs ${describeBytes(want)}${j.total > oracle[s].length ? `, ${j.total - oracle[s].length} bytes more than the oracle's whole stream` : ''}`
    return `${s} ${j.total} of ${oracle[s].length} B (held ${j.start}..${j.total}: ${verdict})`
  }).join('; ') + `; oracle ${oracle.exitCode === null ? `signal ${String(oracle.signal)}` : `exit ${oracle.exitCode}`}`
}

// Gated commands read stdin to its EOF first (the oracle's stdin is /dev/null: EOF at once).
const GATE = 'cat >/dev/null\n'

function snapOffset (full: Buffer, fraction: number, encoding: Encoding): number {
  let at = Math.floor(fraction * full.length)
  // A text reader resumes from offsets the gateway gave it, which are character boundaries.
  if (encoding === 'utf8') while (at < full.length && (full[at]! & 0xc0) === 0x80) at++
  return at
}

export async function runCase (target: Target, label: string, script: string, spec: ReaderSpec, oracle: OracleResult, bound: number): Promise<RunOutcome> {
  const sb = spec.small ? target.small : target.big
  const base = sb.g.publicUrl
  const retention = spec.small ? SMALL_RETENTION : BIG_RETENTION
  // A tag of its own, so that a hanging ?wait=true exec can be found for the diagnosis.
  const tag = `o${++runSerial}`
  const body = { command: ['/bin/sh', '-c', spec.gated ? GATE + script : script], env: { ORACLE_RUN: tag }, ...(spec.gated ? { interactive: true } : {}) }
  let execId: string | undefined
  const started = Date.now()
  const diagnose = async (): Promise<string> => {
    const entry = execId !== undefined ? sb.g.gw.execs.get(execId) : sb.g.gw.execs.list({ sandboxId: sb.id }).find((e) => e.spec.env.ORACLE_RUN === tag)
    if (entry === undefined) return `no exec found (id ${String(execId)})`
    const state = `exec ${entry.id} was ${entry.status} after ${Date.now() - started} ms; ${journalDiagnosis(entry, oracle)}`
    await deleteExec(base, entry.id)
    return state
  }
  const encodingOf = (t: Transport): Encoding | 'binary' => t === 'ws-binary' ? 'binary' : spec.encoding
  // What to check, per reader (multi has two; reconnect has the part before leaving too).
  interface Check { what: string, obs: Observation, expect: Expect, transport: Transport | undefined, prefixOnly?: boolean }
  const checks = await bounded(bound, label, async (signal): Promise<Check[]> => {
    if (spec.kind === 'wait') {
      const o = await runWait(base, sb.id, body, spec.encoding, signal)
      execId = o.execId
      return [{ what: 'ExecResult', obs: o, expect: 'retained', transport: undefined }]
    }
    execId = await createExec(base, sb.id, body, signal)
    const id = execId
    if (spec.kind === 'detached' || spec.kind === 'late') {
      const record = await pollEnded(base, id, signal)
      const offsets: Offsets = spec.resume === undefined
        ? { stdout: 0, stderr: 0 }
        : { stdout: snapOffset(oracle.stdout, spec.resume[0], spec.encoding), stderr: snapOffset(oracle.stderr, spec.resume[1], spec.encoding) }
      const r = await readExec(base, id, { transport: spec.transport, encoding: spec.encoding, offsets, signal })
      return [{ what: spec.transport, obs: { execId: id, record, ...r }, expect: 'retained', transport: spec.transport }]
    }
    // Attached from the start. A lone WebSocket reader sends the gate's EOF itself once open.
    // An /events reader is attached only once its head has arrived and the gateway has
    // registered it, and two readers must both be attached: so the gateway is asked when they
    // are, and EOF goes over a WebSocket of its own.
    const transports: Transport[] = spec.kind === 'multi' ? [spec.transport, spec.second] : [spec.transport]
    const inBand = spec.gated && transports.length === 1 && spec.transport.startsWith('ws')
    const entry = sb.g.gw.execs.get(id)
    const readersBefore = entry?.readers ?? 0
    let eofSent: Promise<void> = Promise.resolve()
    if (spec.gated && !inBand) {
      eofSent = (async () => {
        while ((entry?.readers ?? 0) < readersBefore + transports.length && !signal.aborted) await sleep(5)
        await sendEof(base, id, signal)
      })()
      eofSent.catch(() => {})
    }
    const onAttached = (ws?: WebSocket): void => { if (inBand) ws?.send(JSON.stringify({ type: 'eof' })) }
    // Pause and leave points in bytes received (frames or body), from the share of the output.
    const wire = (t: Transport): number => (oracle.stdout.length + oracle.stderr.length) * (t === 'ws-binary' ? 1 : spec.encoding === 'base64' ? 4 / 3 : 1)
    const pausesFor = (t: Transport): Pause[] => spec.pauses.map((p) => ({ afterBytes: Math.floor(p.at * wire(t)), ms: p.ms }))
    const expect: Expect = spec.gated ? 'all' : 'attached'
    if (spec.kind === 'reconnect') {
      const t = spec.transport
      const first = await readExec(base, id, { transport: t, encoding: spec.encoding, offsets: { stdout: 0, stderr: 0 }, signal, onAttached, leaveAfterBytes: Math.floor(spec.leaveAt * wire(t)) })
      await eofSent
      if (!first.left) {
        const record = await getExec(base, id, signal)
        return [{ what: `${t} (ended before it could leave)`, obs: { execId: id, record, ...first }, expect, transport: t }]
      }
      await sleep(spec.awayMs)
      const back = await readExec(base, id, {
        transport: t,
        encoding: spec.encoding,
        offsets: first.position,
        signal,
        ...(t === 'sse' && first.lastEventId !== undefined ? { lastEventId: first.lastEventId } : {})
      })
      const record = await getExec(base, id, signal)
      return [
        { what: `${t} before leaving`, obs: { execId: id, record, ...first }, expect, transport: t, prefixOnly: true },
        { what: `${t} back at ${first.position.stdout}-${first.position.stderr}`, obs: { execId: id, record, ...back }, expect: 'resumed', transport: t }
      ]
    }
    const reads = await Promise.all(transports.map(async (t, i) => await readExec(base, id, {
      transport: t,
      encoding: spec.encoding,
      offsets: { stdout: 0, stderr: 0 },
      signal,
      onAttached,
      // multi: the second reader is the paused one.
      pauses: spec.kind === 'paused' || (spec.kind === 'multi' && i === 1) ? pausesFor(t) : []
    })))
    await eofSent
    const record = await getExec(base, id, signal)
    return reads.map((r, i) => ({ what: transports.length > 1 ? `reader ${i + 1} (${transports[i]!})` : transports[i]!, obs: { execId: id, record, ...r }, expect, transport: transports[i] }))
  }, diagnose)
  const problems: string[] = []
  if (oracle.signal !== null) exercised.signals++
  for (const c of checks) {
    if (c.prefixOnly === true) exercised.left++
    const gaps = STREAMS.filter((st) => c.obs.streams[st].gap !== undefined).length
    if (c.expect === 'resumed' && gaps > 0) exercised.resumedAfterGap++
    if (c.expect === 'retained') exercised.gapsAfterEnd += gaps
    if (c.obs.truncated !== undefined) exercised.truncatedResults += STREAMS.filter((st) => c.obs.truncated![st]).length
    const found = c.prefixOnly === true
      ? verifyPrefix(c.obs, oracle)
      : verify(c.obs, oracle, {
        expect: c.expect,
        retention,
        encoding: c.transport === undefined ? spec.encoding : encodingOf(c.transport),
        websocket: c.transport?.startsWith('ws') ?? false
      })
    problems.push(...found.map((m) => checks.length > 1 ? `${c.what}: ${m}` : m))
  }
  // Finished: forget it, so hundreds of retained journals do not pile up in this process.
  await deleteExec(base, checks[0]!.obs.execId)
  return { problems, ms: Date.now() - started }
}
