import type { Http2Session } from 'node:http2'

// Liveness of one supervisor HTTP/2 connection. A half-dead peer (SIGSTOPped, blackholed,
// gone without a FIN) sends nothing; after intervalMs of inbound silence we PING, and a PING
// not acknowledged within timeoutMs destroys the connection, which fails every relay on it.

export interface H2PingOptions {
  intervalMs: number
  timeoutMs: number
  onDead: (reason: string) => void
  onRtt?: (ms: number) => void
}

export class H2Pinger {
  readonly #session: Http2Session
  readonly #opts: H2PingOptions
  #lastInbound = Date.now()
  #timer: NodeJS.Timeout | undefined
  #stopped = false

  constructor (session: Http2Session, opts: H2PingOptions) {
    this.#session = session
    this.#opts = opts
    session.once('close', () => this.stop())
    this.#schedule(opts.intervalMs)
  }

  // Called on inbound traffic: a peer that talks to us is alive, no PING needed.
  touch (): void {
    this.#lastInbound = Date.now()
  }

  stop (): void {
    this.#stopped = true
    clearTimeout(this.#timer)
  }

  #schedule (delayMs: number): void {
    if (this.#stopped) return
    clearTimeout(this.#timer)
    this.#timer = setTimeout(() => this.#check(), Math.max(1, delayMs))
    this.#timer.unref()
  }

  #check (): void {
    if (this.#stopped) return
    const idle = Date.now() - this.#lastInbound
    if (idle < this.#opts.intervalMs) { this.#schedule(this.#opts.intervalMs - idle); return }
    const session = this.#session
    if (session.destroyed || session.closed) { this.stop(); return }
    let answered = false
    const deadline = setTimeout(() => {
      if (answered || this.#stopped) return
      this.stop()
      this.#opts.onDead(`no HTTP/2 PING acknowledgement within ${this.#opts.timeoutMs} ms after ${idle} ms of silence`)
    }, this.#opts.timeoutMs)
    deadline.unref()
    this.#timer = deadline
    try {
      session.ping((err, duration) => {
        answered = true
        clearTimeout(deadline)
        if (this.#stopped) return
        if (err !== null) { this.stop(); this.#opts.onDead(`HTTP/2 PING failed: ${err.message}`); return }
        this.#opts.onRtt?.(duration)
        this.touch()
        this.#schedule(this.#opts.intervalMs)
      })
    } catch (err) {
      clearTimeout(deadline)
      this.stop()
      this.#opts.onDead(`HTTP/2 PING could not be sent: ${(err as Error).message}`)
    }
  }
}
