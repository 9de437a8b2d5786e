// The one timeout race of the close paths: ask politely, and force what has not gone within
// the bound. The timer is cleared on every path, so a close that finished early leaves nothing
// armed behind it, and it is unref'd: a bound never keeps a process alive by itself.

export type CloseOutcome = 'polite' | 'forced'

// Runs polite(); if it has not settled within ms (or it failed), runs force(). Resolves once
// polite() has settled or force() has finished, and says which.
export async function closeWithin (ms: number, polite: () => unknown, force: () => unknown): Promise<CloseOutcome> {
  let timer: NodeJS.Timeout | undefined
  const expired = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms)
    timer.unref()
  })
  let settled: boolean
  try {
    settled = await Promise.race([Promise.resolve().then(polite).then(() => true), expired])
  } catch {
    // A polite close that throws has not closed anything we can count on: force it.
    settled = false
  } finally {
    clearTimeout(timer)
  }
  if (settled) return 'polite'
  await force()
  return 'forced'
}
