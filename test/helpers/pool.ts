// Bounded concurrency for the bench and the oracle: many requests or cases, a few at a time, so
// that the machine measures them instead of queueing them.

// Calls fn(i) for i in 0..count-1, at most `limit` at a time. Once stopWhen() holds, no new call
// starts (the ones in flight finish). Resolves with how many calls were started.
export async function runPool (count: number, limit: number, fn: (i: number) => Promise<void>, stopWhen: () => boolean = () => false): Promise<number> {
  let next = 0
  const worker = async (): Promise<void> => {
    while (next < count && !stopWhen()) await fn(next++)
  }
  await Promise.all(Array.from({ length: Math.min(limit, count) }, worker))
  return next
}

// fn(i) for i in 0..count-1, at most `limit` at a time; the results in order of i.
export async function inParallel<T> (count: number, limit: number, fn: (i: number) => Promise<T>): Promise<T[]> {
  const out = new Array<T>(count)
  await runPool(count, limit, async (i) => { out[i] = await fn(i) })
  return out
}
