// How the oracle runs its cases, whatever they are: each one against a deadline that turns a hang
// into a failure with a diagnosis, a few at a time until too many fail, a result shared by the
// cases that compare against it, and greedy shrinking of a failing program.
import { setMaxListeners } from 'node:events'
import { runPool } from '../helpers/pool.js'
import type { Program } from './programs.js'

export class HangError extends Error {}

/**
 * Runs fn against a deadline. Past it, the exec's state is recorded (diagnose), fn's signal
 * aborts (its readers let go) and this rejects with "hang: ...", whatever fn does afterwards.
 */
export async function bounded<T> (ms: number, what: string, fn: (signal: AbortSignal) => Promise<T>, diagnose: () => Promise<string>): Promise<T> {
  const ac = new AbortController()
  // One case's readers, polls and requests all listen on this signal at once.
  setMaxListeners(0, ac.signal)
  let timer: NodeJS.Timeout | undefined
  let timedOut = false
  const deadline = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => {
      timedOut = true
      void diagnose().catch((err) => `diagnosis failed: ${String(err)}`).then((d) => {
        ac.abort(new HangError(`bound of ${ms} ms exceeded`))
        reject(new HangError(`hang: ${what} exceeded its bound of ${ms} ms; ${d}`))
      })
    }, ms)
  })
  deadline.catch(() => {})
  const work = fn(ac.signal).then((v) => timedOut ? deadline : v, async (err) => timedOut ? await deadline : await Promise.reject(err))
  try {
    return await Promise.race([work, deadline])
  } finally {
    clearTimeout(timer)
  }
}

export interface Failure<T> { task: T, messages: string[] }

/**
 * Runs every task, `concurrency` at a time; once `maxFailures` have failed no new one starts
 * (the ones running finish). run() resolves with a task's problems: none is a pass.
 */
export async function runUntilFailures<T> (tasks: readonly T[], opts: { concurrency: number, maxFailures: number }, run: (task: T) => Promise<string[]>): Promise<{ failures: Array<Failure<T>>, notStarted: number }> {
  const failures: Array<Failure<T>> = []
  const started = await runPool(tasks.length, opts.concurrency, async (i) => {
    const task = tasks[i]!
    const messages = await run(task)
    if (messages.length > 0) failures.push({ task, messages })
  }, () => failures.length >= opts.maxFailures)
  return { failures, notStarted: tasks.length - started }
}

// One result computed on first use and shared by `users` cases, then dropped once the last of
// them is done: at scale 10 the outputs of thousands of programs would otherwise stay in memory.
export interface Shared<T> { get: () => Promise<T>, done: () => void }

export function shared<T> (make: () => Promise<T>, users: number): Shared<T> {
  let result: Promise<T> | undefined
  let left = users
  return {
    get: () => (result ??= make()),
    done: () => { if (--left <= 0) result = undefined }
  }
}

// The smaller programs one step away: a step dropped, a plain exit 0, a big write halved.
function smallerPrograms (p: Program): Program[] {
  const out: Program[] = []
  for (let i = 0; i < p.steps.length; i++) if (p.steps.length > 1) out.push({ ...p, steps: p.steps.filter((_s, j) => j !== i) })
  if (!(p.ending.kind === 'exit' && p.ending.code === 0)) out.push({ ...p, ending: { kind: 'exit', code: 0 } })
  p.steps.forEach((s, i) => {
    if (s.kind === 'write' && s.w.size > 1024) out.push({ ...p, steps: p.steps.map((x, j) => j === i ? { ...s, w: { ...s.w, size: Math.ceil(s.w.size / 2) } } : x) })
  })
  return out
}

/**
 * Greedy shrinking of a failing program: moves to the first smaller program that still fails
 * (run() resolves with its problems), and again from there, until none does or the deadline
 * (a Date.now() value) passes. Resolves with the smallest failing program found.
 */
export async function shrinkProgram (start: Program, problems: string[], run: (p: Program) => Promise<string[]>, deadline: number): Promise<{ program: Program, problems: string[], tries: number }> {
  let best = start
  let bestProblems = problems
  let tries = 0
  let improved = true
  while (improved && Date.now() < deadline) {
    improved = false
    for (const c of smallerPrograms(best)) {
      if (Date.now() >= deadline) break
      tries++
      const found = await run(c)
      if (found.length > 0) { best = c; bestProblems = found; improved = true; break }
    }
  }
  return { program: best, problems: bestProblems, tries }
}
