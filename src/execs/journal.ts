// The output of one stream of one exec, addressed by byte offset. It keeps the newest
// retentionBytes for late joiners and replays; everything older is reported as a gap.

export interface JournalChunk { offset: number, data: Buffer }

export class OutputJournal {
  readonly #retention: number
  #chunks: JournalChunk[] = []
  #retained = 0
  #total = 0

  constructor (retentionBytes: number) {
    this.#retention = retentionBytes
  }

  // Offset of the next byte, i.e. the number of bytes ever written.
  get total (): number { return this.#total }

  // Offset of the oldest byte still held.
  get start (): number { return this.#total - this.#retained }

  append (data: Buffer): JournalChunk {
    const chunk = { offset: this.#total, data }
    this.#total += data.length
    this.#chunks.push(chunk)
    this.#retained += data.length
    this.#trim()
    return chunk
  }

  // Chunks from `offset` on; `gap` when part of what was asked for is no longer held.
  readFrom (offset: number): { gap: { from: number, to: number } | undefined, chunks: JournalChunk[] } {
    const from = Math.max(0, Math.min(offset, this.#total))
    const start = this.start
    const gap = from < start ? { from, to: start } : undefined
    const begin = Math.max(from, start)
    const chunks: JournalChunk[] = []
    for (const c of this.#chunks) {
      const end = c.offset + c.data.length
      if (end <= begin) continue
      chunks.push(c.offset >= begin ? c : { offset: begin, data: c.data.subarray(begin - c.offset) })
    }
    return { gap, chunks }
  }

  // What is held, joined: the tail of the output, and whether its beginning was dropped.
  tail (): { data: Buffer, truncated: boolean } {
    return { data: Buffer.concat(this.#chunks.map((c) => c.data), this.#retained), truncated: this.start > 0 }
  }

  #trim (): void {
    while (this.#retained > this.#retention) {
      const first = this.#chunks[0]!
      const excess = this.#retained - this.#retention
      if (first.data.length <= excess) {
        this.#chunks.shift()
        this.#retained -= first.data.length
      } else {
        this.#chunks[0] = { offset: first.offset + excess, data: first.data.subarray(excess) }
        this.#retained -= excess
      }
    }
  }
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
