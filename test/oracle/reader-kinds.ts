// The ways of reading an exec that the oracle draws per case and daemon, from raw random
// draws (so that fast-check can shrink and replay them), and how a case names its reader.
import fc from 'fast-check'
import { MiB, type Program } from './programs.js'
import type { Encoding, Transport } from './readers.js'

export const BIG_RETENTION = 8 * MiB // the default --retention-bytes
export const SMALL_RETENTION = 200_000 // late readers: a gap and a tail without megabytes of output

export type ReaderKind =
  | 'detached' // nobody attached: poll the record until the end, then read /events (NDJSON or SSE)
  | 'wait' // POST ?wait=true
  | 'ws' // WebSocket attached from the start
  | 'late' // WebSocket attached after the end
  | 'events' // SSE or NDJSON attached from the start
  | 'paused' // attached from the start, stops reading for 1-3 s
  | 'multi' // two readers attached from the start, the second one pausing
  | 'reconnect' // attached from the start, leaves partway, comes back at its offsets

export interface ReaderSpec {
  kind: ReaderKind
  transport: Transport
  encoding: Encoding
  small: boolean // the small-retention gateway
  // The command first waits for stdin EOF, sent once the reader is attached (interactive exec):
  // the reader is certainly attached before the first byte, so it must see no gap at all.
  gated: boolean
  // After-the-end readers: resume offsets as fractions of each stream.
  resume: [number, number] | undefined
  // Paused readers: stop reading for `ms` once `at` (a fraction of the output) has arrived.
  pauses: PauseSpec[]
  // multi: the second reader's transport.
  second: Transport
  // reconnect: leave after this fraction of the output, stay away this long.
  leaveAt: number
  awayMs: number
}

export interface PauseSpec { at: number, ms: number }

const fraction = fc.integer({ min: 0, max: 1_000_000 }).map((n) => n / 1_000_000)

export const rawReaderArb = fc.record({
  kind: fc.oneof(
    { weight: 14, arbitrary: fc.constant<ReaderKind>('detached') },
    { weight: 16, arbitrary: fc.constant<ReaderKind>('wait') },
    { weight: 16, arbitrary: fc.constant<ReaderKind>('ws') },
    { weight: 14, arbitrary: fc.constant<ReaderKind>('late') },
    { weight: 14, arbitrary: fc.constant<ReaderKind>('events') },
    { weight: 12, arbitrary: fc.constant<ReaderKind>('paused') },
    { weight: 8, arbitrary: fc.constant<ReaderKind>('multi') },
    { weight: 10, arbitrary: fc.constant<ReaderKind>('reconnect') }
  ),
  pick2: fc.nat({ max: 1000 }),
  leaveAt: fraction,
  awayMs: fc.integer({ min: 0, max: 400 }),
  pick: fc.nat({ max: 1000 }),
  utf8: fc.boolean(),
  small: fc.integer({ min: 0, max: 9 }),
  gated: fc.integer({ min: 0, max: 9 }),
  resume: fc.option(fc.tuple(fraction, fraction), { freq: 3 }),
  pauses: fc.array(fc.record({ at: fraction, ms: fc.integer({ min: 700, max: 1500 }) }), { minLength: 1, maxLength: 2 })
})

type RawReader = typeof rawReaderArb extends fc.Arbitrary<infer T> ? T : never

export function readerSpec (raw: RawReader, content: Program['content']): ReaderSpec {
  const pickOf = <T>(xs: readonly T[]): T => xs[raw.pick % xs.length]!
  const kind = raw.kind
  const transport: Transport = kind === 'detached' || kind === 'events'
    ? pickOf(['ndjson', 'sse'] as const)
    : kind === 'ws' || kind === 'late' ? pickOf(['ws-json', 'ws-binary'] as const) : pickOf(['ws-binary', 'ws-json', 'ndjson', 'sse'] as const)
  const attached = kind === 'ws' || kind === 'events' || kind === 'paused' || kind === 'multi' || kind === 'reconnect'
  let pauses: PauseSpec[] = []
  if (kind === 'paused' || kind === 'multi') {
    // One pause of 1-1.5 s, or two adding up to at most 3 s, at growing byte counts.
    const ps = [...raw.pauses].sort((a, b) => a.at - b.at)
    pauses = ps.length === 1 ? [{ at: ps[0]!.at, ms: ps[0]!.ms + 300 }] : ps
  }
  return {
    kind,
    transport,
    encoding: content === 'text' && raw.utf8 ? 'utf8' : 'base64',
    // A reader that comes back to the small-retention gateway usually finds a gap.
    small: kind === 'late' ? raw.small < 8 : kind === 'detached' || kind === 'wait' ? raw.small < 3 : kind === 'reconnect' ? raw.small < 5 : false,
    gated: attached && (raw.gated < 7 || (kind === 'reconnect' && raw.small < 5)),
    resume: kind === 'detached' || kind === 'late' ? raw.resume ?? undefined : undefined,
    pauses,
    second: (['ws-binary', 'ws-json', 'ndjson', 'sse'] as const)[raw.pick2 % 4]!,
    leaveAt: raw.leaveAt,
    awayMs: kind === 'reconnect' ? raw.awayMs : 0
  }
}

export function describeSpec (r: ReaderSpec): string {
  const parts: string[] = [r.kind]
  if (r.kind !== 'wait') parts.push(r.transport)
  if (r.transport !== 'ws-binary' || r.kind === 'wait') parts.push(r.encoding)
  parts.push(r.small ? `retention ${SMALL_RETENTION}` : 'retention 8MiB')
  if (r.gated) parts.push('gated')
  if (r.resume !== undefined) parts.push(`resume@${r.resume[0].toFixed(2)},${r.resume[1].toFixed(2)}`)
  if (r.kind === 'multi') parts.push(`+ ${r.second}`)
  if (r.pauses.length > 0) parts.push('pauses ' + r.pauses.map((p) => `${p.ms}ms@${(p.at * 100).toFixed(0)}%`).join('+'))
  if (r.kind === 'reconnect') parts.push(`leaves@${(r.leaveAt * 100).toFixed(0)}% for ${r.awayMs}ms`)
  return parts.join(' ')
}
