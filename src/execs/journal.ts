// The output of one stream of one exec, addressed by byte offset. It keeps the newest
// retentionBytes for late joiners and replays; everything older is reported as a gap. The
// sandbox's and the gateway's retention budgets (retention-budget.ts) may take more, oldest
// first, through dropOldest: such a start is a gap like any other.

export interface JournalChunk { offset: number, data: Buffer }

// A chunk stamped with when it arrived. Offsets only order one stream; replaying stdout and
// stderr as they were streamed live needs an order across journals, so every append to any
// journal takes the next stamp, and the chunks of two journals interleave by it.
export interface SequencedChunk extends JournalChunk { seq: number }

export interface JournalGap { from: number, to: number }

// Told of a skip: the gap it made and the bytes held that it dropped.
export type SkipListener = (gap: JournalGap, freed: number) => void

// What a reader starting at some offset gets: `begin` is the offset of the first byte it can
// be sent (the requested offset, or the oldest byte held when that is later).
export interface JournalReplay { begin: number, gap: JournalGap | undefined, chunks: SequencedChunk[] }

// Process-wide rather than per exec so that stamps from any two journals compare; one number
// per chunk held, so it costs no more memory than the chunks themselves.
let nextSeq = 0

export class OutputJournal {
  readonly #retention: number
  readonly #onSkip: SkipListener | undefined
  #chunks: SequencedChunk[] = []
  #retained = 0
  #total = 0

  constructor (retentionBytes: number, onSkip?: SkipListener) {
    this.#retention = retentionBytes
    this.#onSkip = onSkip
  }

  // Offset of the next byte, i.e. the number of bytes ever written.
  get total (): number { return this.#total }

  // Offset of the oldest byte still held.
  get start (): number { return this.#total - this.#retained }

  // Bytes held.
  get retained (): number { return this.#retained }

  // Arrival stamp of the oldest byte held: an exec drops across its two journals in the order
  // their bytes arrived.
  get oldestSeq (): number | undefined { return this.#chunks[0]?.seq }

  append (data: Buffer): JournalChunk {
    const offset = this.#total
    // An empty chunk would replay as an empty event.
    if (data.length === 0) return { offset, data }
    this.#total += data.length
    this.#chunks.push({ offset, data, seq: nextSeq++ })
    this.#retained += data.length
    this.#dropFront(this.#retained - this.#retention, Infinity)
    return { offset, data }
  }

  // The next byte appended has this offset: the bytes in between are lost for good (the
  // sandbox no longer keeps them, or an exec rebuilt after a restart starts at what its daemon
  // still holds). What is held is dropped with them, since offsets must stay contiguous from
  // start to total, so a reader asking for any of it is told of one gap. Never goes back.
  skipTo (offset: number): void {
    if (offset <= this.#total) return
    const from = this.#total
    const freed = this.#dropFront(Infinity, Infinity)
    this.#total = offset
    this.#onSkip?.({ from, to: offset }, freed)
  }

  // Frees up to n of the oldest bytes held, but none that arrived at or after `untilSeq`;
  // returns how many it freed. Offsets are untouched: what was dropped replays as a gap.
  dropOldest (n: number, untilSeq = Infinity): number {
    return this.#dropFront(n, untilSeq)
  }

  // Chunks from `offset` on, with their arrival stamps; `gap` when part of what was asked for
  // is no longer held.
  replayFrom (offset: number): JournalReplay {
    const from = Math.max(0, Math.min(offset, this.#total))
    const start = this.start
    const gap = from < start ? { from, to: start } : undefined
    const begin = Math.max(from, start)
    const chunks: SequencedChunk[] = []
    for (const c of this.#chunks) {
      const end = c.offset + c.data.length
      if (end <= begin) continue
      chunks.push(c.offset >= begin ? c : { offset: begin, data: c.data.subarray(begin - c.offset), seq: c.seq })
    }
    return { begin, gap, chunks }
  }

  // The bytes alone, for readers of one stream that need no order across streams.
  readFrom (offset: number): { gap: JournalGap | undefined, chunks: JournalChunk[] } {
    const { gap, chunks } = this.replayFrom(offset)
    return { gap, chunks: chunks.map(({ offset, data }) => ({ offset, data })) }
  }

  // What is held, joined: the tail of the output, and whether its beginning was dropped.
  tail (): { data: Buffer, truncated: boolean } {
    return { data: Buffer.concat(this.#chunks.map((c) => c.data), this.#retained), truncated: this.start > 0 }
  }

  // A chunk cut at the front keeps its stamp: its remaining bytes still arrived then.
  #dropFront (n: number, untilSeq: number): number {
    let freed = 0
    while (freed < n && this.#chunks.length > 0) {
      const first = this.#chunks[0]!
      if (first.seq >= untilSeq) break
      const want = n - freed
      if (first.data.length <= want) {
        this.#chunks.shift()
        freed += first.data.length
      } else {
        this.#chunks[0] = { offset: first.offset + want, data: first.data.subarray(want), seq: first.seq }
        freed += want
      }
    }
    this.#retained -= freed
    return freed
  }
}

export type Tagged<K extends string> = SequencedChunk & { stream: K }

// The chunks of several replays in the order they arrived. Each replay is already in arrival
// order, so this is a merge, linear in the number of chunks.
export function interleave<K extends string> (replays: ReadonlyArray<{ stream: K, chunks: readonly SequencedChunk[] }>): Array<Tagged<K>> {
  return replays
    .map(({ stream, chunks }) => chunks.map((c) => ({ ...c, stream })))
    .reduce(mergeBySeq, [])
}

function mergeBySeq<T extends { seq: number }> (a: readonly T[], b: readonly T[]): T[] {
  const out: T[] = []
  let i = 0
  let j = 0
  while (i < a.length && j < b.length) out.push(a[i]!.seq < b[j]!.seq ? a[i++]! : b[j++]!)
  while (i < a.length) out.push(a[i++]!)
  while (j < b.length) out.push(b[j++]!)
  return out
}

// Length of the longest prefix of buf that ends on a UTF-8 character boundary, so that a
// character split across SSH packets is sent whole in the next event.
export function utf8CompleteLength (buf: Buffer): number {
  const n = buf.length
  for (let back = 1; back <= Math.min(3, n); back++) {
    const b = buf[n - back]!
    if ((b & 0xc0) === 0x80) continue // continuation byte: keep looking for the lead byte
    const need = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1
    return need > back ? n - back : n
  }
  return n
}

// How many UTF-8 continuation bytes (at most 3, the most a character has) a buffer starts with.
export function continuationPrefix (buf: Buffer): number {
  let n = 0
  while (n < 3 && n < buf.length && (buf[n]! & 0xc0) === 0x80) n++
  return n
}
