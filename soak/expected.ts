// What a stream must carry, and the byte-exact check of what a reader received against it.
// Expected output is a list of segments (literal bytes, or a unit repeated to n bytes, which is
// what `yes UNIT | head -c N` prints), so megabytes of it cost nothing to hold; the check
// compares as the bytes arrive and keeps only the first difference.

type Segment = { data: Buffer } | { unit: Buffer, n: number, block?: Buffer }
const PIECE = 64 * 1024

export class Expected {
  readonly segments: Segment[] = []
  readonly starts: number[] = []
  bytes = 0

  lit (text: string | Buffer): this {
    const data = typeof text === 'string' ? Buffer.from(text, 'utf8') : text
    if (data.length > 0) this.#push({ data }, data.length)
    return this
  }

  // `unit` repeated and cut to n bytes.
  rep (unit: string, n: number): this {
    if (n > 0) this.#push({ unit: Buffer.from(unit, 'utf8'), n }, n)
    return this
  }

  #push (s: Segment, n: number): void {
    this.segments.push(s)
    this.starts.push(this.bytes)
    this.bytes += n
  }

  // Index of the segment holding byte `pos` (pos < bytes), searching forward from `hint`.
  locate (pos: number, hint = 0): number {
    let i = hint < this.starts.length && this.starts[hint]! <= pos ? hint : 0
    while (i + 1 < this.starts.length && this.starts[i + 1]! <= pos) i++
    return i
  }

  // A view of up to `max` (≤ 64 KiB) expected bytes from pos, all within one segment.
  view (pos: number, max: number, seg: number): Buffer {
    const s = this.segments[seg]!
    const k = pos - this.starts[seg]!
    if ('data' in s) return s.data.subarray(k, k + max)
    s.block ??= s.unit.length >= PIECE ? s.unit : Buffer.from(s.unit.toString('latin1').repeat(Math.ceil((PIECE + s.unit.length) / s.unit.length)), 'latin1')
    const len = Math.min(max, s.n - k, PIECE)
    const at = k % s.unit.length
    if (at + len <= s.block.length) return s.block.subarray(at, at + len)
    return s.unit.subarray(at, Math.min(s.unit.length, at + len))
  }

  // A copy of up to len expected bytes from pos (for messages and for stdin to send).
  slice (pos: number, len: number): Buffer {
    const parts: Buffer[] = []
    let p = pos
    const end = Math.min(this.bytes, pos + len)
    let seg = 0
    while (p < end) {
      seg = this.locate(p, seg)
      const v = this.view(p, end - p, seg)
      parts.push(v)
      p += v.length
    }
    return Buffer.concat(parts)
  }

  // Only for small outputs: the whole text.
  text (): string { return this.slice(0, this.bytes).toString('utf8') }
}

const FFFD = Buffer.from('\uFFFD', 'utf8')
const show = (b: Buffer): string => JSON.stringify(b.toString('utf8'))

export class StreamCheck {
  readonly #exp: Expected
  #offset: number
  #seg = 0
  #mismatch: { at: number, got: Buffer, want: Buffer } | undefined
  #after = 0
  #afterHead = Buffer.alloc(0)

  // `start`: the offset the reader asked for; bytes before it are not expected.
  constructor (exp: Expected, start = 0) {
    this.#exp = exp
    this.#offset = start
  }

  // Offset of the next byte the reader should receive.
  get offset (): number { return this.#offset }
  get expectedBytes (): number { return this.#exp.bytes }

  // A gap: the bytes up to `to` are not sent.
  skip (to: number): void { if (to > this.#offset && this.#mismatch === undefined) this.#offset = to }

  feed (buf: Buffer): void {
    if (this.#mismatch !== undefined) { this.#noteAfter(buf); this.#offset += buf.length; return }
    let i = 0
    while (i < buf.length) {
      const pos = this.#offset + i
      if (pos >= this.#exp.bytes) { this.#fail(buf, i, pos); return }
      this.#seg = this.#exp.locate(pos, this.#seg)
      const want = this.#exp.view(pos, buf.length - i, this.#seg)
      const got = buf.subarray(i, i + want.length)
      if (!got.equals(want)) {
        let j = 0
        while (got[j] === want[j]) j++
        this.#fail(buf, i + j, pos + j)
        return
      }
      i += want.length
    }
    this.#offset += buf.length
  }

  #fail (buf: Buffer, i: number, pos: number): void {
    this.#mismatch = { at: pos, got: Buffer.from(buf.subarray(i, i + 40)), want: this.#exp.slice(pos, 40) }
    this.#noteAfter(buf.subarray(i))
    this.#offset = pos - i + buf.length
  }

  #noteAfter (b: Buffer): void {
    this.#after += b.length
    if (this.#afterHead.length < 12) this.#afterHead = Buffer.concat([this.#afterHead, b.subarray(0, 12)]).subarray(0, 12)
  }

  // Everything expected arrived, and nothing else.
  complete (): boolean { return this.#mismatch === undefined && this.#offset === this.#exp.bytes }

  // What arrived is a beginning of what was expected: the output of a failed exec. The gateway
  // flushes a character cut by the failure as U+FFFD, so up to three of them at the very end,
  // standing where the expected text has a multibyte character, are accepted.
  prefixOk (): boolean {
    const m = this.#mismatch
    if (m === undefined) return true
    if (this.#after === 0 || this.#after > 3 * FFFD.length || this.#after % FFFD.length !== 0) return false
    for (let k = 0; k < this.#after; k += FFFD.length) if (!this.#afterHead.subarray(k, k + FFFD.length).equals(FFFD)) return false
    return (m.want[0] ?? 0) > 0x7f
  }

  describe (): string {
    const m = this.#mismatch
    const head = `${this.#offset} bytes, want ${this.#exp.bytes}`
    if (m === undefined) return `${head}; the bytes received match`
    return `${head}; first difference at byte ${m.at}: got ${show(m.got)}, want ${show(m.want)}`
  }
}
