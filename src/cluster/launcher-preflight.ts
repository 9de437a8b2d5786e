import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { ConfigError } from '../config.js'
import { tcpAccepts } from './launcher-probes.js'

// Before the launcher starts anything: the ports it was given are free and distinct, and no
// other launcher owns this data dir's run dir.

interface PortFlags {
  freePorts: boolean
  replicas: number
  publicPort: number
  supervisorPort: number
  redisPort: number
  replicaPublicPort: number
  replicaSupervisorPort: number
  replicaInternalPort: number
}

const HOST = '127.0.0.1'
const PROBE_MS = 1000

function portsOf (flags: PortFlags): Array<{ flag: string, port: number }> {
  if (flags.freePorts) return []
  const out = [
    { flag: '--public-port', port: flags.publicPort },
    { flag: '--supervisor-port', port: flags.supervisorPort },
    { flag: '--redis-port', port: flags.redisPort }
  ]
  for (let i = 0; i < flags.replicas; i++) {
    out.push({ flag: '--replica-public-port', port: flags.replicaPublicPort === 0 ? 0 : flags.replicaPublicPort + i })
    out.push({ flag: '--replica-supervisor-port', port: flags.replicaSupervisorPort === 0 ? 0 : flags.replicaSupervisorPort + i })
    out.push({ flag: '--replica-internal-port', port: flags.replicaInternalPort === 0 ? 0 : flags.replicaInternalPort + i })
  }
  return out.filter((p) => p.port !== 0)
}

// Ports given (not picked) must be distinct, in range, and not taken already: better a clear
// word now than a bind error in some child's log.
export async function checkPorts (flags: PortFlags): Promise<void> {
  const seen = new Map<number, string>()
  for (const { flag, port } of portsOf(flags)) {
    if (port > 65535) throw new ConfigError(`${flag}: ${flags.replicas} replicas need ports up to ${port}, beyond 65535`)
    const other = seen.get(port)
    if (other !== undefined) throw new ConfigError(`port ${port} is asked for twice (${other} and ${flag}); choose other ports or --free-ports`)
    seen.set(port, flag)
  }
  for (const [port, flag] of seen) {
    if (await tcpAccepts(port, PROBE_MS)) throw new ConfigError(`port ${port} (${flag}) is already in use on ${HOST}: is another cluster running? Stop it, choose another port, or use --free-ports`)
  }
}

// A launcher that died without stopping (SIGKILL) leaves its run dir; one that is alive still owns it.
export function claimRunDir (runDir: string): void {
  const pidFile = join(runDir, 'launcher.pid')
  if (existsSync(pidFile)) {
    const pid = Number(readFileSync(pidFile, 'utf8').trim())
    let alive = false
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid) {
      try { process.kill(pid, 0); alive = true } catch (err) { alive = (err as NodeJS.ErrnoException).code === 'EPERM' }
    }
    if (alive) throw new ConfigError(`another cluster launcher (pid ${pid}) is running on this data dir (${runDir}); stop it first, or give another --data-dir`)
  }
  rmSync(runDir, { recursive: true, force: true })
  mkdirSync(runDir, { recursive: true, mode: 0o700 })
  writeFileSync(pidFile, `${process.pid}\n`, { mode: 0o600 })
}
