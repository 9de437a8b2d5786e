import type { SshConnection } from './ssh-connection.js'

// Signals that reach the whole process tree of a command, through a script that scans the
// sandbox's /proc (see killScript). A scan costs about the same for one command as for a
// thousand, so the signals asked of one sandbox close together share one: those that come
// within windowMs of the first, or while a scan of their sandbox and signal is under way, go
// in the next. Each caller still learns whether its own command had processes (when not, it
// falls back to an SSH signal request on its channel).

export interface TreeSignalsOptions {
  // The script for one signal: reads the members' ids on stdin, one a line; signals their
  // processes; prints the ids it found processes of, one a line; exits 0 when it found any,
  // 3 when none.
  script: (signal: string) => string
  // Bound on one batch's script: no answer within it is "found nothing" for the whole batch.
  boundMs: number
  // How long the first signal of a batch waits for others.
  windowMs: number
  // Members per script; more wait for the next batch.
  maxBatch: number
}

interface Ask {
  member: string
  // The connection its command runs on: one of the batch's carries the script.
  conn: SshConnection
  resolve: (found: boolean) => void
}

// The signals of one sandbox and one signal name: the batch being gathered, and whether a scan
// is under way.
interface Lane {
  asks: Ask[]
  timer: NodeJS.Timeout | undefined
  running: boolean
}

export class TreeSignals {
  readonly #opts: TreeSignalsOptions
  readonly #lanes = new Map<string, Lane>()
  #closed = false

  constructor (opts: TreeSignalsOptions) {
    this.#opts = opts
  }

  // True when the sandbox said it signalled processes of this member. Never rejects; bounded by
  // the window and at most two scans' bounds (the one under way, then its own).
  async signal (sandboxId: string, conn: SshConnection, member: string, signal: string): Promise<boolean> {
    if (this.#closed) return false
    const key = `${sandboxId}\0${signal}`
    let lane = this.#lanes.get(key)
    if (lane === undefined) {
      lane = { asks: [], timer: undefined, running: false }
      this.#lanes.set(key, lane)
    }
    const l = lane
    return await new Promise<boolean>((resolve) => {
      l.asks.push({ member, conn, resolve })
      if (l.running || l.timer !== undefined) return
      l.timer = setTimeout(() => {
        l.timer = undefined
        void this.#run(key, l, signal)
      }, this.#opts.windowMs)
    })
  }

  // Answers every signal still waiting with false (nothing was confirmed).
  close (): void {
    this.#closed = true
    for (const lane of this.#lanes.values()) {
      clearTimeout(lane.timer)
      lane.timer = undefined
      for (const a of lane.asks.splice(0)) a.resolve(false)
    }
    this.#lanes.clear()
  }

  async #run (key: string, lane: Lane, signal: string): Promise<void> {
    lane.running = true
    const batch = lane.asks.splice(0, this.#opts.maxBatch)
    const found = await this.#scan(batch, signal)
    for (const a of batch) a.resolve(found.has(a.member))
    lane.running = false
    if (this.#closed) return
    // Those that came during the scan have waited for it already: their batch starts at once.
    if (lane.asks.length > 0) { void this.#run(key, lane, signal); return }
    if (this.#lanes.get(key) === lane) this.#lanes.delete(key)
  }

  async #scan (batch: Ask[], signal: string): Promise<Set<string>> {
    const conn = batch.find((a) => a.conn.alive)?.conn
    if (conn === undefined) return new Set()
    const asked = new Set(batch.map((a) => a.member))
    const input = [...asked].map((m) => `${m}\n`).join('')
    // An honest answer lists each member at most once.
    const r = await conn.runSide(this.#opts.script(signal), Buffer.from(input), this.#opts.boundMs, Buffer.byteLength(input))
    if (r === undefined || r.code !== 0) return new Set()
    const lines = r.stdout.split('\n')
    // A cut answer's last line may be part of an id.
    if (r.truncated) lines.pop()
    return new Set(lines.filter((line) => asked.has(line)))
  }
}
