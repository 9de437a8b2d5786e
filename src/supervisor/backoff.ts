// Capped exponential backoff with full jitter: reconnecting supervisors of a restarted gateway
// spread out instead of arriving together.
export class Backoff {
  readonly #baseMs: number
  readonly #maxMs: number
  #attempt = 0

  constructor ({ baseMs, maxMs }: { baseMs: number, maxMs: number }) {
    this.#baseMs = baseMs
    this.#maxMs = maxMs
  }

  next (): number {
    const ceiling = Math.min(this.#maxMs, this.#baseMs * 2 ** Math.min(this.#attempt, 20))
    this.#attempt++
    return Math.round(ceiling / 2 + Math.random() * ceiling / 2)
  }

  reset (): void { this.#attempt = 0 }
}
