// Compares what a reader observed through the gateway with what /bin/sh produced directly.
// Returns the list of differences (empty: the run matches the oracle).
import { STREAMS, sha256, type OracleResult, type StreamName } from './programs.js'
import type { Encoding, Observation } from './readers.js'

// How much of each stream the reader must have seen:
// - 'all': every byte from its requested offset, never a gap (a reader attached from the start
//   of a command that waited for it; docs/api.md §4: an attached reader never sees a gap);
// - 'attached': the same, except that a command that outran retention before the reader attached
//   may show one gap from offset 0 (then the rest exactly);
// - 'retained': read after the end: a gap exactly up to the oldest byte retention kept (when the
//   requested offset is older), then exactly the retained bytes (also ExecResult tails);
// - 'resumed': a reader that came back at the offsets it had reached: everything from there,
//   after at most one gap starting exactly there (output retention dropped while it was away).
export type Expect = 'all' | 'attached' | 'retained' | 'resumed'

export interface VerifyContext {
  expect: Expect
  retention: number
  // utf8 text drops the continuation bytes at the head of a retained tail (the half character
  // after a gap belongs to the gap); base64 and binary frames do not.
  encoding: Encoding | 'binary'
  websocket: boolean
}

function continuationPrefix (buf: Buffer, at: number): number {
  let n = 0
  while (n < 3 && at + n < buf.length && (buf[at + n]! & 0xc0) === 0x80) n++
  return n
}

export function describeBytes (b: Buffer): string {
  return `${b.length} bytes sha256 ${sha256(b).slice(0, 16)}`
}

function firstDifference (a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length)
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i
  return n
}

function compareBytes (what: string, got: Buffer, want: Buffer, base: number, out: string[]): void {
  if (got.equals(want)) return
  const at = firstDifference(got, want)
  out.push(`${what}: got ${describeBytes(got)}, want ${describeBytes(want)}; first difference at stream offset ${base + at}` +
    (got.length > want.length ? ` (${got.length - want.length} extra bytes)` : got.length < want.length ? ` (${want.length - got.length} missing bytes)` : ''))
}

export function verify (obs: Observation, oracle: OracleResult, ctx: VerifyContext): string[] {
  const out: string[] = [...obs.problems]
  const rec = obs.record ?? {}
  const want = { exitCode: oracle.exitCode, signal: oracle.signal }
  if (rec.status !== 'exited') out.push(`status ${String(rec.status)}, want exited (error ${JSON.stringify(rec.error)})`)
  if (rec.exitCode !== want.exitCode || rec.signal !== want.signal) {
    out.push(`record exitCode ${String(rec.exitCode)} signal ${String(rec.signal)}, want exitCode ${String(want.exitCode)} signal ${String(want.signal)}`)
  }
  if (rec.timedOut !== false) out.push(`record timedOut ${String(rec.timedOut)}`)
  if (rec.error !== null) out.push(`record error ${JSON.stringify(rec.error)}`)
  const finalWant = { type: 'exit', exitCode: want.exitCode, signal: want.signal, timedOut: false }
  if (JSON.stringify(obs.final) !== JSON.stringify(finalWant)) out.push(`final event ${JSON.stringify(obs.final)}, want ${JSON.stringify(finalWant)}`)
  if (ctx.websocket && obs.closeCode !== 1000) out.push(`WebSocket closed with ${String(obs.closeCode)}, want 1000`)
  for (const s of STREAMS) verifyStream(s, obs, oracle[s], ctx, rec, out)
  return out
}

function verifyStream (s: StreamName, obs: Observation, full: Buffer, ctx: VerifyContext, rec: any, out: string[]): void {
  const total = full.length
  if (rec[`${s}Bytes`] !== total) out.push(`record ${s}Bytes ${String(rec[`${s}Bytes`])}, want ${total}`)
  const o = obs.streams[s]
  const r = Math.min(o.requested, total)
  if (obs.truncated !== undefined) {
    // ExecResult: the newest `retention` bytes, and whether the beginning was dropped.
    const truncated = total > ctx.retention
    if (obs.truncated[s] !== truncated) out.push(`${s}Truncated ${String(obs.truncated[s])}, want ${String(truncated)} (${total} bytes, retention ${ctx.retention})`)
    let from = truncated ? total - ctx.retention : 0
    if (truncated && ctx.encoding === 'utf8') from += continuationPrefix(full, from)
    compareBytes(`${s} (ExecResult tail from ${from})`, o.data, full.subarray(from), from, out)
    return
  }
  switch (ctx.expect) {
    case 'all':
      if (o.gap !== undefined) out.push(`${s}: gap ${JSON.stringify(o.gap)} seen by a reader attached from the start`)
      compareBytes(`${s} from ${r}`, o.data, full.subarray(o.gap?.to ?? r), o.gap?.to ?? r, out)
      return
    case 'attached': {
      if (o.gap !== undefined && !(o.gap.from === 0 && r === 0 && total > ctx.retention)) {
        out.push(`${s}: gap ${JSON.stringify(o.gap)} seen by an attached reader (${total} bytes, retention ${ctx.retention})`)
      }
      const from = o.gap?.to ?? r
      compareBytes(`${s} from ${from}`, o.data, full.subarray(from), from, out)
      return
    }
    case 'resumed': {
      if (o.gap !== undefined && o.gap.from !== r) out.push(`${s}: gap ${JSON.stringify(o.gap)} for a reader resuming at ${r}`)
      const from = o.gap?.to ?? r
      compareBytes(`${s} from ${from} (resumed at ${r})`, o.data, full.subarray(from), from, out)
      return
    }
    case 'retained': {
      const held = Math.max(0, total - ctx.retention)
      if (r < held) {
        const to = held + (ctx.encoding === 'utf8' ? continuationPrefix(full, held) : 0)
        if (o.gap === undefined || o.gap.from !== r || o.gap.to !== to) out.push(`${s}: gap ${JSON.stringify(o.gap)}, want {"from":${r},"to":${to}} (${total} bytes, retention ${ctx.retention})`)
        compareBytes(`${s} after the gap (from ${to})`, o.data, full.subarray(to), to, out)
      } else {
        if (o.gap !== undefined) out.push(`${s}: gap ${JSON.stringify(o.gap)} though offset ${r} is retained (${total} bytes, retention ${ctx.retention})`)
        compareBytes(`${s} from ${r}`, o.data, full.subarray(r), r, out)
      }
    }
  }
}

/** A reader that left before the end: what it got must be the start of each stream, exactly. */
export function verifyPrefix (obs: { streams: Observation['streams'], problems: string[] }, oracle: OracleResult): string[] {
  const out: string[] = [...obs.problems]
  for (const s of STREAMS) {
    const o = obs.streams[s]
    if (o.gap !== undefined) out.push(`${s}: gap ${JSON.stringify(o.gap)} seen by a reader attached from the start`)
    if (o.data.length > oracle[s].length) out.push(`${s}: ${o.data.length} bytes before leaving, more than the oracle's ${oracle[s].length}`)
    compareBytes(`${s} before leaving`, o.data, oracle[s].subarray(0, o.data.length), 0, out)
  }
  return out
}
