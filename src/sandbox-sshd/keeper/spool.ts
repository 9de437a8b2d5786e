// One output stream of a kept exec: the bytes it produced, addressed by offset, from `base` (the
// first still kept) to `end` (the next to come). Chunks carry the exec's arrival number, shared
// by both streams, so a replay can interleave them in the order the command wrote them.

interface Chunk { seq: number, offset: number, data: Buffer }

export interface Piece { seq: number, data: Buffer }

// Consumed chunks stay in the array until this many have piled up, then it is compacted: a
// shift() per trimmed chunk would make trimming quadratic in long runs.
const COMPACT_AT = 1024

export class Spool {
  #chunks: Chunk[] = []
  #head = 0
  #base = 0
  #end = 0

  get base (): number { return this.#base }
  get end (): number { return this.#end }
  get keptBytes (): number { return this.#end - this.#base }

  append (seq: number, data: Buffer): void {
    if (data.length === 0) return
    this.#chunks.push({ seq, offset: this.#end, data })
    this.#end += data.length
  }

  /** What is kept from `offset` to the end of its chunk, or undefined when nothing is. */
  pieceAt (offset: number): Piece | undefined {
    if (offset >= this.#end) return undefined
    const from = Math.max(offset, this.#base)
    const chunks = this.#chunks
    let lo = this.#head
    let hi = chunks.length - 1
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1
      if (chunks[mid]!.offset <= from) lo = mid
      else hi = mid - 1
    }
    const chunk = chunks[lo]!
    return { seq: chunk.seq, data: chunk.data.subarray(from - chunk.offset) }
  }

  /**
   * Drops whole chunks from the front while more than `limit` bytes are kept, but only chunks
   * that end at or below `upTo` (what has been handed to a reader). Returns the bytes freed.
   */
  trim (limit: number, upTo: number): number {
    let freed = 0
    const chunks = this.#chunks
    while (this.#head < chunks.length && this.keptBytes > limit) {
      const chunk = chunks[this.#head]!
      if (chunk.offset + chunk.data.length > upTo) break
      this.#head++
      this.#base = chunk.offset + chunk.data.length
      freed += chunk.data.length
    }
    if (this.#head >= COMPACT_AT && this.#head * 2 >= chunks.length) {
      this.#chunks = chunks.slice(this.#head)
      this.#head = 0
    }
    return freed
  }

  /** Drops everything (the exec is forgotten); returns the bytes freed. */
  clear (): number {
    const freed = this.keptBytes
    this.#chunks = []
    this.#head = 0
    this.#base = this.#end
    return freed
  }
}
