// Interference check. Every ~2 s during a phase the bench reads every process's CPU
// (utime + stime + cutime + cstime, so short-lived children reaped by a long-lived parent count)
// and adds up what processes that are not its own used: its own are its descendants and its
// ancestors (vitest, npx), plus sshd session processes that their monitor left to init when the
// bench's ssh connections ended. PID 1 is left out too (it reaps those orphans).
import { readFileSync } from 'node:fs'
import os from 'node:os'
import { CLK_TCK, pids, procStat, type ProcStat } from './proc.js'

export interface Foreign { cpuS: number, wallS: number, pct: number, top: string[] }

export class ForeignMeter {
  readonly #last = new Map<string, number>()
  readonly #used = new Map<string, { ticks: number, cmd: string }>()
  readonly #startWall = performance.now()
  readonly #startBootTicks = Number(readFileSync('/proc/uptime', 'utf8').split(' ')[0]) * CLK_TCK
  readonly #timer: NodeJS.Timeout
  #first = true

  constructor () {
    this.#sample()
    this.#first = false
    this.#timer = setInterval(() => this.#sample(), 2000)
    this.#timer.unref()
  }

  stop (): Foreign {
    clearInterval(this.#timer)
    this.#sample()
    const wallS = (performance.now() - this.#startWall) / 1000
    let ticks = 0
    for (const u of this.#used.values()) ticks += u.ticks
    const byCmd = new Map<string, number>()
    for (const u of this.#used.values()) byCmd.set(u.cmd, (byCmd.get(u.cmd) ?? 0) + u.ticks)
    const top = [...byCmd.entries()].sort((a, b) => b[1] - a[1]).slice(0, 3).filter(([, t]) => t > 0).map(([c, t]) => `${(t / CLK_TCK).toFixed(1)} s ${c}`)
    return { cpuS: ticks / CLK_TCK, wallS, pct: ticks / CLK_TCK / (wallS * os.availableParallelism()) * 100, top }
  }

  #sample (): void {
    const procs = new Map<number, ProcStat>()
    for (const name of pids()) {
      try { procs.set(Number(name), procStat(name)) } catch { /* gone */ }
    }
    const ours = new Set<number>([1, process.pid])
    for (let p = process.ppid; p > 1 && !ours.has(p); p = procs.get(p)?.ppid ?? 1) ours.add(p)
    const children = new Map<number, number[]>()
    for (const [pid, pr] of procs) { const l = children.get(pr.ppid) ?? []; l.push(pid); children.set(pr.ppid, l) }
    const walk = (p: number): void => { for (const c of children.get(p) ?? []) { ours.add(c); walk(c) } }
    walk(process.pid)
    for (const [pid, pr] of procs) {
      if (ours.has(pid) || (pr.ppid === 1 && pr.comm === 'sshd')) continue
      const key = `${pid}:${pr.start}`
      // A process first seen after the meter started began within the phase: all of its CPU
      // counts. One that was there before counts from the first sample that saw it.
      const last = this.#last.get(key) ?? (this.#first || pr.start < this.#startBootTicks ? undefined : 0)
      this.#last.set(key, pr.ticksWithChildren)
      if (last === undefined) continue
      const prev = this.#used.get(key)
      let cmd = prev?.cmd
      if (cmd === undefined) {
        try { cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ').trim().slice(0, 80) } catch { cmd = '' }
        if (cmd === '') cmd = `[${pr.comm}]`
      }
      this.#used.set(key, { ticks: (prev?.ticks ?? 0) + Math.max(0, pr.ticksWithChildren - last), cmd })
    }
  }
}
