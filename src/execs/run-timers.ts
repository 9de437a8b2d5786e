// The timers of one exec run. The run owns exactly one of these and disposes it once, on its way
// out; a timer asked for after that (by an await that resolved after the run ended) is never armed,
// so no run leaves a timer behind to fire on a finished exec or hold the process.

export type RunTimerName = 'timeout' | 'killBound'

export class RunTimers {
  readonly #timers = new Map<RunTimerName, NodeJS.Timeout>()
  #disposed = false

  get disposed (): boolean { return this.#disposed }

  /** Timers armed and not yet fired or cleared. */
  get armed (): number { return this.#timers.size }

  /** Arms `name` (replacing an earlier one of that name); a no-op once disposed. */
  arm (name: RunTimerName, ms: number, fire: () => void): void {
    if (this.#disposed) return
    clearTimeout(this.#timers.get(name))
    this.#timers.set(name, setTimeout(() => {
      this.#timers.delete(name)
      fire()
    }, ms))
  }

  dispose (): void {
    if (this.#disposed) return
    this.#disposed = true
    for (const t of this.#timers.values()) clearTimeout(t)
    this.#timers.clear()
  }
}
