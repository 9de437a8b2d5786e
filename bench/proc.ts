// What the bench reads from /proc: a process's CPU ticks and RSS, its descendants, its command
// line for the recipe, the processes our execs left, and the sshd of the run with its config.
import { execFileSync } from 'node:child_process'
import { readFileSync, readdirSync } from 'node:fs'
import { EXEC_ID_ENV } from './knobs.js'

export const CLK_TCK = (() => { try { return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100 } catch { return 100 } })()

export interface ProcStat {
  comm: string
  ppid: number
  // utime + stime, in clock ticks.
  ticks: number
  // utime + stime + cutime + cstime: children already reaped count, so a parent that forks a
  // short-lived child per request is charged for it.
  ticksWithChildren: number
  // Start time after boot, in clock ticks: with the pid, it names one process across pid reuse.
  start: number
}

// Throws when the process is gone.
export function procStat (pid: number | string): ProcStat {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  // The command name may hold spaces and parentheses: split after its last ')'. f[0] is field 3
  // (state), so ppid is f[1], utime f[11], stime f[12], cutime f[13], cstime f[14], start f[19].
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  const ticks = Number(f[11]) + Number(f[12])
  return {
    comm: stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')),
    ppid: Number(f[1]),
    ticks,
    ticksWithChildren: ticks + Number(f[13]) + Number(f[14]),
    start: Number(f[19])
  }
}

// Every pid in /proc, as named there.
export function pids (): string[] {
  return readdirSync('/proc').filter((name) => /^\d+$/.test(name))
}

export function rssKiB (pid: number): number {
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  if (m === null) throw new Error(`no VmRSS for pid ${pid}`)
  return Number(m[1])
}

// utime + stime in clock ticks.
export function cpuTicks (pid: number): number {
  return procStat(pid).ticks
}

// utime + stime + cutime + cstime in clock ticks; 0 when gone.
function cpuTicksWithChildren (pid: number): number {
  try {
    return procStat(pid).ticksWithChildren
  } catch {
    return 0
  }
}

// cpuTicksWithChildren summed over pids.
export function cpuTicksOfAll (pids: readonly number[]): number {
  return pids.reduce((a, p) => a + cpuTicksWithChildren(p), 0)
}

// Every live descendant of pid.
function descendants (pid: number): number[] {
  const parent = new Map<number, number>()
  for (const name of pids()) {
    try { parent.set(Number(name), procStat(name).ppid) } catch { /* gone */ }
  }
  const out: number[] = []
  const walk = (p: number): void => { for (const [c, pp] of parent) if (pp === p) { out.push(c); walk(c) } }
  walk(pid)
  return out
}

// pid and every live descendant of it; none for no pid.
export function processTree (pid: number | undefined): number[] {
  return pid === undefined ? [] : [pid, ...descendants(pid)]
}

// The command line as a shell would take it back, for the recipe in RESULTS.md.
export function cmdline (pid: number): string {
  try {
    const args = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((a) => a !== '')
    // Supervisor and API tokens are secrets of this run's gateways; they are not the recipe.
    return args.map((a, i) => args[i - 1] === '--token' || args[i - 1] === '--api-token' ? '<token>' : /[^A-Za-z0-9_./:=,@%+-]/.test(a) ? `'${a.replaceAll("'", "'\\''")}'` : a).join(' ')
  } catch {
    return `(pid ${pid} gone)`
  }
}

// Processes that carry one of these exec ids in their environment.
export function taggedProcesses (ids: ReadonlySet<string>): number[] {
  const found: number[] = []
  for (const name of pids()) {
    let env: string
    try { env = readFileSync(`/proc/${name}/environ`, 'latin1') } catch { continue }
    const at = env.indexOf(`${EXEC_ID_ENV}=`)
    if (at === -1) continue
    const end = env.indexOf('\0', at)
    const id = env.slice(at + EXEC_ID_ENV.length + 1, end === -1 ? undefined : end)
    if (ids.has(id)) found.push(Number(name))
  }
  return found
}

export interface SshdInfo { pid: number, command: string, config: string }

// The sshd listening on this port: its pid and config (for the recipe in RESULTS.md).
export function findSshdConfig (port: number): SshdInfo | undefined {
  for (const name of pids()) {
    // sshd rewrites its title: "sshd: /usr/sbin/sshd -D -e -f <config> [listener] 0 of 10-100 startups".
    let title: string
    try { title = readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0').join(' ') } catch { continue }
    if (!title.includes('sshd')) continue
    const path = / -f (\S+)/.exec(title)?.[1]
    if (path === undefined) continue
    let config: string
    try { config = readFileSync(path, 'utf8') } catch { continue }
    if (config.includes(`ListenAddress 127.0.0.1:${port}\n`)) return { pid: Number(name), command: `${title.replace(/^sshd: /, '').replace(/ \[listener\].*$/, '')}`, config }
  }
  return undefined
}

// The 1, 5 and 15 minute load averages, as /proc/loadavg gives them.
export function loadAverage (): string {
  return readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')
}
