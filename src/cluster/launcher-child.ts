import { spawn, type ChildProcess } from 'node:child_process'
import { createWriteStream, type WriteStream } from 'node:fs'

// One process the cluster launcher runs: its output goes to a log file (and a short tail kept
// for error messages), its exit is one promise, and stopping it is bounded.

export interface ChildExit { code: number | null, signal: NodeJS.Signals | null }

interface ChildOptions {
  /** Who it is in messages: "redis-server", "replica-2", ... */
  name: string
  command: string
  args: readonly string[]
  env: NodeJS.ProcessEnv
  logPath: string
}

const TAIL_BYTES = 8 * 1024

export class LaunchedChild {
  readonly name: string
  readonly logPath: string
  readonly pid: number
  readonly exited: Promise<ChildExit>
  private readonly proc: ChildProcess
  private readonly log: WriteStream
  private tailText = ''
  private readonly lineWatchers = new Set<(line: string) => void>()
  private pending = ''

  constructor (opts: ChildOptions) {
    this.name = opts.name
    this.logPath = opts.logPath
    this.log = createWriteStream(opts.logPath, { flags: 'w', mode: 0o600 })
    // A log file that cannot be written must not take the launcher down; the tail still works.
    this.log.on('error', () => {})
    // Not detached: a Ctrl-C reaches the whole process group, and a `kill -- -PID` of the
    // launcher's group takes its children with it.
    this.proc = spawn(opts.command, [...opts.args], { env: opts.env, stdio: ['ignore', 'pipe', 'pipe'] })
    let spawnError: Error | undefined
    this.proc.on('error', (err) => { spawnError = err; this.keep(`spawn failed: ${err.message}\n`) })
    this.proc.stdout!.on('data', (d: Buffer) => { this.keep(d); this.scan(d) })
    this.proc.stderr!.on('data', (d: Buffer) => { this.keep(d) })
    this.exited = new Promise((resolve) => {
      // 'close' (not 'exit'): every byte of its output has been read by then.
      this.proc.once('close', (code, signal) => {
        this.log.end()
        resolve({ code: spawnError !== undefined && code === null && signal === null ? -1 : code, signal })
      })
    })
    this.pid = this.proc.pid ?? -1
  }

  get running (): boolean { return this.proc.exitCode === null && this.proc.signalCode === null }

  /** The last few KiB of its output. */
  tail (): string { return this.tailText }

  /** Resolves with the first stdout line that pick() maps to a value; rejects on exit or after timeoutMs. */
  async waitForLine<T> (pick: (line: string) => T | undefined, timeoutMs: number): Promise<T> {
    return await new Promise<T>((resolve, reject) => {
      const done = (err: Error | undefined, value?: T): void => {
        clearTimeout(timer)
        this.lineWatchers.delete(watch)
        if (err !== undefined) reject(err)
        else resolve(value as T)
      }
      const watch = (line: string): void => {
        const v = pick(line)
        if (v !== undefined) done(undefined, v)
      }
      const timer = setTimeout(() => { done(new Error(`${this.name} printed no ready line within ${timeoutMs} ms`)) }, timeoutMs)
      this.lineWatchers.add(watch)
      void this.exited.then((e) => { done(new Error(`${this.name} exited (${describeExit(e)}) before it was ready`)) })
    })
  }

  signal (sig: NodeJS.Signals): void {
    if (!this.running) return
    try { this.proc.kill(sig) } catch { /* gone meanwhile */ }
  }

  /** sig, then SIGKILL if it has not exited within boundMs. Resolves once it has exited; says whether it needed the SIGKILL. */
  async stop (sig: NodeJS.Signals, boundMs: number): Promise<'polite' | 'forced'> {
    if (!this.running) { await this.exited; return 'polite' }
    this.signal(sig)
    let timer: NodeJS.Timeout | undefined
    const expired = new Promise<false>((resolve) => { timer = setTimeout(() => { resolve(false) }, boundMs) })
    const polite = await Promise.race([this.exited.then(() => true), expired])
    clearTimeout(timer)
    if (polite) return 'polite'
    // SIGKILL reaches a stopped process too.
    this.signal('SIGKILL')
    await this.exited
    return 'forced'
  }

  private keep (d: Buffer | string): void {
    this.log.write(d)
    this.tailText = (this.tailText + d.toString()).slice(-TAIL_BYTES)
  }

  private scan (d: Buffer): void {
    if (this.lineWatchers.size === 0) { this.pending = ''; return }
    this.pending += d.toString()
    let nl: number
    while ((nl = this.pending.indexOf('\n')) !== -1) {
      const line = this.pending.slice(0, nl)
      this.pending = this.pending.slice(nl + 1)
      for (const w of [...this.lineWatchers]) w(line)
    }
    // A ready line is short; a long line without a newline is someone's output, not ours.
    if (this.pending.length > 64 * 1024) this.pending = ''
  }
}

export function describeExit (e: ChildExit): string {
  return e.signal !== null ? `signal ${e.signal}` : `code ${String(e.code)}`
}
