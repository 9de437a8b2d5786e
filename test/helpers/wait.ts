// Small timing utilities for tests. Every timer created here is cleared on every path.

export function sleep (ms: number): Promise<void> {
  return new Promise((resolve) => {
    setTimeout(resolve, ms)
  })
}

export interface WaitForOptions {
  timeoutMs: number
  intervalMs?: number
  /** Included in the timeout error so a failing test says what it was waiting for. */
  description?: string
}

/**
 * Polls `predicate` until it returns true. A predicate that throws is treated as "not yet"
 * (the last error is reported on timeout) so callers can poll things that fail while starting.
 */
export async function waitFor (
  predicate: () => boolean | Promise<boolean>,
  opts: WaitForOptions
): Promise<void> {
  const intervalMs = opts.intervalMs ?? 25
  const started = Date.now()
  let lastError: unknown
  for (;;) {
    try {
      if (await predicate()) return
      lastError = undefined
    } catch (err) {
      lastError = err
    }
    const elapsed = Date.now() - started
    if (elapsed >= opts.timeoutMs) {
      const what = opts.description ?? predicate.toString().slice(0, 200)
      const cause = lastError === undefined ? '' : `; last error: ${String(lastError)}`
      throw new Error(`waitFor timed out after ${elapsed} ms (limit ${opts.timeoutMs} ms) waiting for: ${what}${cause}`)
    }
    await sleep(Math.min(intervalMs, Math.max(1, opts.timeoutMs - elapsed)))
  }
}

/** Measures how long `p` takes to settle; a rejection propagates unchanged. */
export async function timed<T> (p: Promise<T>): Promise<{ value: T; ms: number }> {
  const started = performance.now()
  const value = await p
  return { value, ms: performance.now() - started }
}
