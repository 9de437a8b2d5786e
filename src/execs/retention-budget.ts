// Retained output across execs: each journal keeps at most its own --retention-bytes, but one
// sandbox running many execs must not hold the memory every other sandbox depends on. This
// counts what every exec holds, per sandbox and in total, and when a budget is exceeded decides
// whose output goes:
//  - per sandbox: its finished execs, the one that ended first first, down to nothing; then
//    (only running execs left) its running execs, the one created first first. Attached readers
//    get live output directly, not from the journals, so only late joiners see these gaps.
//  - in total: the sandbox holding the most gives up its oldest, in the same order, until it is
//    level with the next biggest; tied holders give up half of what is still over in turns (so
//    one may end its turn that much, at most half a chunk, below the other). A sandbox is only
//    ever trimmed for the total while it holds the most, so one sandbox cannot evict another's
//    output while it holds less than the biggest holder.
// Every change is O(1) plus a heap step: no scan of execs or sandboxes per chunk.

// What an exec lends the budget: the power to drop its oldest bytes.
export interface RetentionHolder {
  // Frees up to n of the oldest bytes held; returns how many it freed.
  dropOldest: (n: number) => number
}

// One exec's handle on the budget. The exec reports every change in what it holds through grew
// (negative when its own retention trimmed more than it appended); drops the budget asks for
// are already counted.
export interface RetentionTicket {
  grew: (delta: number) => void
  finished: () => void
  // The exec is forgotten: what it holds no longer counts (it drops it itself).
  release: () => void
}

export interface RetentionBudgetOptions {
  perSandbox: number
  total: number
}

interface Slot {
  readonly holder: RetentionHolder
  readonly account: Account
  readonly created: number
  held: number
  finished: boolean
  released: boolean
  heapIndex: number
}

interface Account {
  readonly sandboxId: string
  held: number
  // Unreleased slots: the account is forgotten when none is left.
  open: number
  // Finished slots that hold bytes, in the order they ended (a Set iterates in insertion order).
  readonly finished: Set<Slot>
  // Running slots that hold bytes, the oldest created on top.
  readonly running: IndexedHeap<Slot>
  heapIndex: number
}

export class RetentionBudget {
  readonly #perSandbox: number
  readonly #total: number
  readonly #accounts = new Map<string, Account>()
  // The biggest holder on top.
  readonly #bySize = new IndexedHeap<Account>((a, b) => a.held > b.held)
  #held = 0
  #created = 0

  constructor (opts: RetentionBudgetOptions) {
    this.#perSandbox = opts.perSandbox
    this.#total = opts.total
  }

  // Bytes retained across all sandboxes.
  get retained (): number { return this.#held }

  retainedBy (sandboxId: string): number { return this.#accounts.get(sandboxId)?.held ?? 0 }

  open (sandboxId: string, holder: RetentionHolder): RetentionTicket {
    let account = this.#accounts.get(sandboxId)
    if (account === undefined) {
      account = { sandboxId, held: 0, open: 0, finished: new Set(), running: new IndexedHeap((a, b) => a.created < b.created), heapIndex: -1 }
      this.#accounts.set(sandboxId, account)
      this.#bySize.push(account)
    }
    account.open++
    const slot: Slot = { holder, account, created: this.#created++, held: 0, finished: false, released: false, heapIndex: -1 }
    return {
      grew: (delta) => { this.#grew(slot, delta) },
      finished: () => { this.#finished(slot) },
      release: () => { this.#release(slot) }
    }
  }

  #grew (slot: Slot, delta: number): void {
    if (slot.released || delta === 0) return
    this.#change(slot, delta)
    const account = slot.account
    if (account.held > this.#perSandbox) this.#evict(account, account.held - this.#perSandbox)
    while (this.#held > this.#total) {
      const top = this.#bySize.peek()!
      const over = this.#held - this.#total
      const lead = top.held - (this.#bySize.runnerUp()?.held ?? 0)
      // Halving keeps tied holders level in a few steps per chunk, not one per byte.
      const want = lead > 0 ? Math.min(over, lead) : Math.ceil(over / 2)
      if (this.#evict(top, want) === 0) break
    }
  }

  #finished (slot: Slot): void {
    if (slot.released || slot.finished) return
    slot.finished = true
    const account = slot.account
    if (slot.heapIndex >= 0) account.running.remove(slot)
    if (slot.held > 0) account.finished.add(slot)
  }

  #release (slot: Slot): void {
    if (slot.released) return
    this.#change(slot, -slot.held)
    slot.released = true
    const account = slot.account
    if (--account.open === 0) {
      this.#accounts.delete(account.sandboxId)
      this.#bySize.remove(account)
    }
  }

  // Takes up to n bytes from the account, in eviction order; returns how many it freed.
  #evict (account: Account, n: number): number {
    let freed = 0
    while (freed < n) {
      const slot = first(account.finished) ?? account.running.peek()
      if (slot === undefined) break
      const got = slot.holder.dropOldest(Math.min(n - freed, slot.held))
      if (got <= 0) {
        // The holder holds less than it reported: a bug, but never a reason to spin here.
        this.#change(slot, -slot.held)
        account.finished.delete(slot)
        account.running.remove(slot)
        continue
      }
      this.#change(slot, -got)
      freed += got
    }
    return freed
  }

  // Keeps every count and every queue in step with a slot's new size.
  #change (slot: Slot, delta: number): void {
    if (delta === 0) return
    const account = slot.account
    slot.held += delta
    account.held += delta
    this.#held += delta
    this.#bySize.update(account)
    if (slot.finished) {
      if (slot.held === 0) account.finished.delete(slot)
    } else if (slot.held > 0 && slot.heapIndex < 0) {
      account.running.push(slot)
    } else if (slot.held === 0 && slot.heapIndex >= 0) {
      account.running.remove(slot)
    }
  }
}

function first<T> (set: Set<T>): T | undefined {
  return set.values().next().value
}

// A binary heap whose items know their position, so any one can be removed or re-placed after
// its key changed in O(log n).
class IndexedHeap<T extends { heapIndex: number }> {
  readonly #items: T[] = []
  readonly #above: (a: T, b: T) => boolean

  constructor (above: (a: T, b: T) => boolean) {
    this.#above = above
  }

  get size (): number { return this.#items.length }

  peek (): T | undefined { return this.#items[0] }

  // What would be on top without the top: the better of its two children.
  runnerUp (): T | undefined {
    const [, a, b] = this.#items
    if (a === undefined || b === undefined) return a
    return this.#above(b, a) ? b : a
  }

  push (item: T): void {
    item.heapIndex = this.#items.length
    this.#items.push(item)
    this.#up(item.heapIndex)
  }

  remove (item: T): void {
    const i = item.heapIndex
    if (i < 0 || this.#items[i] !== item) return
    const last = this.#items.pop()!
    item.heapIndex = -1
    if (last === item) return
    this.#items[i] = last
    last.heapIndex = i
    this.update(last)
  }

  update (item: T): void {
    const i = item.heapIndex
    if (i < 0 || this.#items[i] !== item) return
    this.#down(this.#up(i))
  }

  #up (i: number): number {
    const items = this.#items
    while (i > 0) {
      const parent = (i - 1) >> 1
      if (!this.#above(items[i]!, items[parent]!)) break
      this.#swap(i, parent)
      i = parent
    }
    return i
  }

  #down (i: number): void {
    const items = this.#items
    for (;;) {
      const l = 2 * i + 1
      const r = l + 1
      let best = i
      if (l < items.length && this.#above(items[l]!, items[best]!)) best = l
      if (r < items.length && this.#above(items[r]!, items[best]!)) best = r
      if (best === i) return
      this.#swap(i, best)
      i = best
    }
  }

  #swap (i: number, j: number): void {
    const items = this.#items
    const a = items[i]!
    const b = items[j]!
    items[i] = b
    items[j] = a
    a.heapIndex = j
    b.heapIndex = i
  }
}
