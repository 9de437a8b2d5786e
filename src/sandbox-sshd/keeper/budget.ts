// The bytes all kept execs of one daemon hold, against --keep-total-bytes. Whoever adds makes
// room first (the keeper's reclaim: finished execs oldest first, then sent history); a writer
// that still does not fit waits, and is woken when bytes are freed.

export interface BudgetWaiter { retry: () => void }

export class KeepBudget {
  readonly limit: number
  #used = 0
  #reclaim: () => void = () => {}
  readonly #waiters = new Set<BudgetWaiter>()
  #waking = false

  constructor (limit: number) { this.limit = limit }

  get used (): number { return this.#used }
  fits (): boolean { return this.#used <= this.limit }

  setReclaim (reclaim: () => void): void { this.#reclaim = reclaim }

  add (n: number): void {
    this.#used += n
    if (!this.fits()) this.#reclaim()
  }

  free (n: number): void {
    if (n <= 0) return
    this.#used -= n
    this.#wake()
  }

  wait (waiter: BudgetWaiter): void { this.#waiters.add(waiter) }
  unwait (waiter: BudgetWaiter): void { this.#waiters.delete(waiter) }

  #wake (): void {
    if (this.#waking || !this.fits() || this.#waiters.size === 0) return
    this.#waking = true
    try {
      for (const w of [...this.#waiters]) {
        if (!this.fits()) break
        this.#waiters.delete(w)
        w.retry()
      }
    } finally {
      this.#waking = false
    }
  }
}
