// Output chunks end wherever the sandbox's pipe and the relay cut them, often inside a UTF-8
// character. xterm.js joins such halves itself, but only when nothing comes between them; the
// dashboard writes colour escapes and the other stream's bytes between chunks, so each stream
// holds back a trailing partial character until the chunk that completes it.

const EMPTY = new Uint8Array(0)

// How many bytes at the end of `bytes` start a character that needs more bytes (0 to 3).
function partialTail (bytes) {
  for (let back = 1; back <= Math.min(3, bytes.length); back++) {
    const b = bytes[bytes.length - back]
    if ((b & 0xc0) === 0x80) continue // a continuation byte: its lead byte is further back
    const length = b >= 0xf8 ? 0 : b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1
    return length > back ? back : 0
  }
  return 0
}

export class Utf8Chunks {
  #held = EMPTY

  // The bytes of whole characters so far (invalid bytes pass through: xterm.js shows them).
  take (bytes) {
    let all = bytes
    if (this.#held.length > 0) {
      all = new Uint8Array(this.#held.length + bytes.length)
      all.set(this.#held)
      all.set(bytes, this.#held.length)
    }
    const cut = all.length - partialTail(all)
    this.#held = all.slice(cut)
    return all.subarray(0, cut)
  }

  // What is held back, for when no more bytes will come (the stream ended, or a gap follows).
  flush () {
    const held = this.#held
    this.#held = EMPTY
    return held
  }
}
