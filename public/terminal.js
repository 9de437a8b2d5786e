// The xterm.js terminal the output goes to, kept fitted to its box, and what it shows as text.
import { Terminal } from './assets/xterm/lib/xterm.mjs'
import { FitAddon } from './assets/xterm-addon-fit/lib/addon-fit.mjs'
import { Utf8Chunks } from './utf8.js'

const RED = new Uint8Array([0x1b, 0x5b, 0x33, 0x31, 0x6d]) // ESC[31m
const RESET = new Uint8Array([0x1b, 0x5b, 0x30, 0x6d]) // ESC[0m

export class Screen {
  #fit = new FitAddon()
  #tty = false
  // Per stream, the start of a character whose other bytes have not arrived yet.
  #held = { stdout: new Utf8Chunks(), stderr: new Utf8Chunks() }

  constructor (container) {
    this.term = new Terminal({
      convertEol: true,
      scrollback: 10000,
      cursorBlink: false,
      fontSize: 13,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
      theme: { background: '#0f1419', foreground: '#d8dee9' }
    })
    this.term.loadAddon(this.#fit)
    this.term.open(container)
    this.fit()
    new ResizeObserver(() => this.fit()).observe(container)
  }

  fit () {
    try { this.#fit.fit() } catch { /* not laid out yet */ }
  }

  // A blank terminal for the next exec's output.
  start ({ tty }) {
    this.#tty = tty
    this.#held = { stdout: new Utf8Chunks(), stderr: new Utf8Chunks() }
    this.term.reset()
    // A pty already ends lines with CRLF; plain pipes end them with LF only.
    this.term.options.convertEol = !tty
  }

  // A pty's output is one stream (its stderr is merged into it), written as it comes. A plain
  // exec's stderr is told apart from stdout by colour, so both are cut at character boundaries.
  output (stream, bytes) {
    if (this.#tty) this.term.write(bytes)
    else this.#write(stream, this.#held[stream].take(bytes))
  }

  // Writes what the streams held back, when nothing will complete it: the exec ended, or a gap
  // (bytes no longer held by the gateway) comes before the rest.
  flushOutput (streams = ['stdout', 'stderr']) {
    for (const stream of streams) this.#write(stream, this.#held[stream].flush())
  }

  #write (stream, bytes) {
    if (bytes.length === 0) return
    if (stream === 'stdout') {
      this.term.write(bytes)
      return
    }
    this.term.write(RED)
    this.term.write(bytes)
    this.term.write(RESET)
  }

  // What the terminal holds, as text (wrapped rows joined back): for tests and for copying.
  text () {
    const buf = this.term.buffer.active
    const lines = []
    for (let i = 0; i < buf.length; i++) {
      const line = buf.getLine(i)
      if (line === undefined) continue
      const text = line.translateToString(true)
      if (line.isWrapped && lines.length > 0) lines[lines.length - 1] += text
      else lines.push(text)
    }
    while (lines.length > 0 && lines[lines.length - 1] === '') lines.pop()
    return lines.join('\n')
  }

  // Resolves once xterm has parsed everything written so far.
  flushed () {
    return new Promise((resolve) => this.term.write('', resolve))
  }
}
