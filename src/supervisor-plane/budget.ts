// Token buckets for what a peer may do per unit of time. take() never waits: a caller that
// gets false refuses, and what it refuses is the peer's problem, not a queue of ours.

export class TokenBucket {
  readonly #capacity: number
  readonly #perMs: number
  #tokens: number
  #at: number

  constructor (capacity: number, refillPerSecond: number, now: number = performance.now()) {
    this.#capacity = capacity
    this.#perMs = refillPerSecond / 1000
    this.#tokens = capacity
    this.#at = now
  }

  take (n = 1, now: number = performance.now()): boolean {
    this.#tokens = Math.min(this.#capacity, this.#tokens + (now - this.#at) * this.#perMs)
    this.#at = now
    if (this.#tokens < n) return false
    this.#tokens -= n
    return true
  }

  full (now: number = performance.now()): boolean {
    return this.#tokens + (now - this.#at) * this.#perMs >= this.#capacity
  }
}

// One bucket per key (a sandbox): a peer that reconnects or opens another stream gets its old
// bucket back, not a fresh one. Keys are sandboxes with valid tokens, so the map holds as many
// as the operator issued; past maxKeys, refilled buckets are forgotten first (forgetting those
// gives nobody more than the rate), and only then the least recently used.
export class KeyedBuckets {
  readonly #make: () => TokenBucket
  readonly #max: number
  readonly #buckets = new Map<string, TokenBucket>()

  constructor (make: () => TokenBucket, maxKeys = 10_000) {
    this.#make = make
    this.#max = maxKeys
  }

  get (key: string): TokenBucket {
    let b = this.#buckets.get(key)
    if (b !== undefined) {
      this.#buckets.delete(key)
      this.#buckets.set(key, b)
      return b
    }
    if (this.#buckets.size >= this.#max) this.#prune()
    b = this.#make()
    this.#buckets.set(key, b)
    return b
  }

  take (key: string, n = 1): boolean { return this.get(key).take(n) }

  get size (): number { return this.#buckets.size }

  // Least recently used first: full buckets go until a tenth of the room is free; if none is
  // full, the least recently used goes.
  #prune (): void {
    for (const [k, b] of this.#buckets) {
      if (b.full()) this.#buckets.delete(k)
      if (this.#buckets.size < this.#max * 0.9) return
    }
    const oldest = this.#buckets.keys().next()
    if (oldest.done !== true) this.#buckets.delete(oldest.value)
  }
}
