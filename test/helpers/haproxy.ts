// Runs a real haproxy (Debian's, /usr/sbin/haproxy) with a config from renderHaproxyConfig, on
// free loopback ports (never 80, 8080, 8081...), in a temp dir. Master-worker mode in the
// foreground (-W -db): the master is this test's child, its worker dies with it, and SIGUSR2
// reloads a new config while the old worker finishes its connections. test/global-setup.ts
// installs the package; this helper only locates and runs it.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { renderHaproxyConfig, type HaproxyConfigOptions } from '../../src/cluster/haproxy-config.js'
import { findBinary } from '../../src/cluster/launcher-binaries.js'
import { freePort } from '../../src/cluster/launcher-probes.js'

/** What the caller decides; the helper picks the binds and the admin socket. */
export type HaproxyOptions = Omit<HaproxyConfigOptions, 'publicBind' | 'supervisorBind' | 'statsSocket' | 'statsBind'>

/** One row of `show stat`: a frontend, a backend or a server. */
interface HaproxyStat {
  proxy: string
  /** FRONTEND, BACKEND or the server's name. */
  name: string
  /** UP, DOWN, "UP 1/2" (going down), "DOWN 1/2" (coming up), OPEN, no check... */
  status: string
  /** Current sessions. */
  scur: number
  /** Sessions since start. */
  stot: number
  bytesIn: number
  bytesOut: number
}

export interface Haproxy {
  publicUrl: string
  supervisorUrl: string
  /** The master's pid (the process this test spawned). */
  pid: number
  /** The config running now. */
  config: () => string
  /** stdout + stderr of master and workers (bounded tail): the traffic log is there. */
  output: () => string
  /** `show stat` over the admin socket. */
  stats: () => Promise<HaproxyStat[]>
  /** The server's status in a backend ('UP', 'DOWN', 'UP 1/2', ...). */
  serverStatus: (backend: string, server: string) => Promise<string>
  /** Polls until the server is exactly UP or DOWN; resolves with the ms it took. */
  waitServer: (backend: string, server: string, status: 'UP' | 'DOWN', timeoutMs?: number) => Promise<number>
  /** Renders, validates and loads a new config on the same ports; resolves once the new worker answers. */
  reload: (next: HaproxyOptions) => Promise<void>
  /** A signal to the master and its workers (SIGSTOP/SIGCONT to freeze the proxy). */
  signal: (sig: NodeJS.Signals) => void
  /** SIGTERM (SIGKILL after a bound), then the temp dir is removed. Idempotent. */
  stop: () => Promise<void>
}

const HOST = '127.0.0.1'
const READY_TIMEOUT_MS = 10_000
const EXIT_TIMEOUT_MS = 5000
const CHECK_TIMEOUT_MS = 10_000
const BIND_ATTEMPTS = 5
const OUTPUT_LIMIT_BYTES = 128 * 1024

// Masters still running if the test process exits without stop().
const live = new Set<ChildProcess>()
let exitHookInstalled = false
function track (child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true
    process.once('exit', () => {
      for (const c of live) {
        try { c.kill('SIGKILL') } catch { /* already gone */ }
      }
    })
  }
  live.add(child)
  child.once('exit', () => live.delete(child))
}

function findHaproxy (): string | undefined {
  return findBinary('haproxy')
}

function haproxyBinary (): string {
  const bin = findHaproxy()
  if (bin === undefined) {
    throw new Error('haproxy is required by the cluster tests and was not found at /usr/sbin/haproxy or on PATH. ' +
      'Install it with `sudo apt-get install -y haproxy` (Debian/Ubuntu), then run the tests again.')
  }
  return bin
}

/** `haproxy -c -f`: throws with HAProxy's own words when the file is not a valid config, or draws a warning. */
export function validateHaproxyConfig (path: string): void {
  const res = spawnSync(haproxyBinary(), ['-c', '-f', path], { encoding: 'utf8', timeout: CHECK_TIMEOUT_MS })
  if (res.status !== 0 || /\[(WARNING|ALERT)\]/.test(`${res.stdout}${res.stderr}`)) {
    throw new Error(`haproxy -c -f ${path} failed (${res.error?.message ?? `exit ${String(res.status ?? res.signal)}`}):\n${res.stdout}${res.stderr}`)
  }
}

/** Binds port 0 and releases it; haproxy may still lose a race for it (retried). */
/** One line to the admin socket, its whole answer back; bounded. */
function adminCommand (socketPath: string, command: string, timeoutMs = 2000): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = connect(socketPath)
    let buf = ''
    const timer = setTimeout(() => { sock.destroy(); reject(new Error(`haproxy admin socket: no answer to "${command}" within ${timeoutMs} ms`)) }, timeoutMs)
    sock.once('error', (err) => { clearTimeout(timer); reject(err) })
    sock.once('connect', () => { sock.write(command + '\n') })
    sock.on('data', (d) => { buf += d.toString() })
    sock.once('close', () => { clearTimeout(timer); resolve(buf) })
  })
}

function parseStats (csv: string): HaproxyStat[] {
  const lines = csv.split('\n').filter((l) => l.trim() !== '')
  const header = lines.shift()?.replace(/^# /, '').split(',') ?? []
  const col = (n: string): number => header.indexOf(n)
  return lines.map((l) => {
    const f = l.split(',')
    return {
      proxy: f[col('pxname')] ?? '',
      name: f[col('svname')] ?? '',
      status: f[col('status')] ?? '',
      scur: Number(f[col('scur')] ?? 0),
      stot: Number(f[col('stot')] ?? 0),
      bytesIn: Number(f[col('bin')] ?? 0),
      bytesOut: Number(f[col('bout')] ?? 0)
    }
  })
}

function tcpAccepts (port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect(port, HOST)
    const done = (ok: boolean): void => { clearTimeout(timer); sock.destroy(); resolve(ok) }
    const timer = setTimeout(() => { done(false) }, timeoutMs)
    sock.once('error', () => { done(false) })
    sock.once('connect', () => { done(true) })
  })
}

function waitExit (child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true)
  return new Promise((resolve) => {
    const timer = setTimeout(() => { resolve(false) }, timeoutMs)
    child.once('exit', () => { clearTimeout(timer); resolve(true) })
  })
}

const sleep = async (ms: number): Promise<void> => { await new Promise((resolve) => setTimeout(resolve, ms)) }

export async function startHaproxy (opts: HaproxyOptions): Promise<Haproxy> {
  const bin = haproxyBinary()
  const dir = await mkdtemp(join(tmpdir(), 'exec-gateway-haproxy-'))
  const cfgPath = join(dir, 'haproxy.cfg')
  const socketPath = join(dir, 'admin.sock')
  let out = ''
  const append = (d: Buffer | string): void => { out = (out + d.toString()).slice(-OUTPUT_LIMIT_BYTES) }

  // Writes and validates the config for these ports; every rendered config is checked.
  const writeConfig = (o: HaproxyOptions, publicPort: number, supervisorPort: number): string => {
    const text = renderHaproxyConfig({ ...o, publicBind: `${HOST}:${publicPort}`, supervisorBind: `${HOST}:${supervisorPort}`, statsSocket: socketPath })
    writeFileSync(cfgPath, text)
    validateHaproxyConfig(cfgPath)
    return text
  }

  const workerPid = async (): Promise<number | undefined> => {
    try {
      const m = /^Pid: (\d+)$/m.exec(await adminCommand(socketPath, 'show info', 1000))
      return m === null ? undefined : Number(m[1])
    } catch {
      return undefined
    }
  }

  const launch = async (publicPort: number, supervisorPort: number): Promise<ChildProcess> => {
    const c = spawn(bin, ['-W', '-db', '-f', cfgPath], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] })
    track(c)
    c.stdout?.on('data', append)
    c.stderr?.on('data', append)
    c.once('error', (err) => { append(`spawn failed: ${err.message}\n`) })
    const deadline = Date.now() + READY_TIMEOUT_MS
    while (Date.now() < deadline) {
      if (c.exitCode !== null || c.signalCode !== null) break
      if (await tcpAccepts(publicPort, 500) && await tcpAccepts(supervisorPort, 500) && await workerPid() !== undefined) return c
      await sleep(25)
    }
    c.kill('SIGKILL')
    await waitExit(c, EXIT_TIMEOUT_MS)
    throw new Error(`haproxy on ports ${publicPort}/${supervisorPort} did not come up within ${READY_TIMEOUT_MS} ms; its output:\n${out}`)
  }

  let child: ChildProcess | undefined
  let publicPort = 0
  let supervisorPort = 0
  let config = ''
  let lastError: unknown
  try {
    for (let attempt = 0; attempt < BIND_ATTEMPTS && child === undefined; attempt++) {
      publicPort = await freePort(new Set())
      supervisorPort = await freePort(new Set([publicPort]))
      config = writeConfig(opts, publicPort, supervisorPort)
      try {
        child = await launch(publicPort, supervisorPort)
      } catch (err) {
        lastError = err
        // Only a lost race for a port is worth another try.
        if (!/cannot bind|Address already in use/i.test(String(err))) break
      }
    }
  } catch (err) {
    lastError = err
  }
  if (child === undefined) {
    await rm(dir, { recursive: true, force: true })
    throw lastError instanceof Error ? lastError : new Error(String(lastError))
  }
  const master = child

  const stats = async (): Promise<HaproxyStat[]> => parseStats(await adminCommand(socketPath, 'show stat'))
  const serverStatus = async (backend: string, server: string): Promise<string> => {
    const row = (await stats()).find((s) => s.proxy === backend && s.name === server)
    if (row === undefined) throw new Error(`haproxy has no server ${backend}/${server}`)
    return row.status
  }

  let stopping: Promise<void> | undefined
  return {
    publicUrl: `http://${HOST}:${publicPort}`,
    supervisorUrl: `http://${HOST}:${supervisorPort}`,
    pid: master.pid!,
    config: () => config,
    output: () => out,
    stats,
    serverStatus,
    async waitServer (backend, server, status, timeoutMs = 10_000) {
      const started = Date.now()
      let last = ''
      while (Date.now() - started < timeoutMs) {
        last = await serverStatus(backend, server).catch((err: Error) => err.message)
        if (last === status) return Date.now() - started
        await sleep(20)
      }
      throw new Error(`haproxy server ${backend}/${server} was not ${status} within ${timeoutMs} ms (last: ${last})`)
    },
    async reload (next) {
      const before = await workerPid()
      const text = writeConfig(next, publicPort, supervisorPort)
      master.kill('SIGUSR2')
      const deadline = Date.now() + READY_TIMEOUT_MS
      while (Date.now() < deadline) {
        if (/Loading failure/.test(out.slice(-4096))) throw new Error(`haproxy reload failed; its output:\n${out}`)
        const pid = await workerPid()
        if (pid !== undefined && pid !== before) { config = text; return }
        await sleep(25)
      }
      throw new Error(`haproxy reload: no new worker within ${READY_TIMEOUT_MS} ms; its output:\n${out}`)
    },
    signal (sig) {
      // The master forwards neither SIGSTOP nor SIGCONT, so each process gets it by pid.
      for (const pid of haproxyPids(master.pid!)) {
        try { process.kill(pid, sig) } catch { /* gone */ }
      }
    },
    async stop () {
      stopping ??= (async () => {
        if (master.exitCode === null && master.signalCode === null) {
          // A frozen worker would not act on the master's SIGTERM.
          for (const pid of haproxyPids(master.pid!)) {
            try { process.kill(pid, 'SIGCONT') } catch { /* gone */ }
          }
          master.kill('SIGTERM')
          if (!await waitExit(master, EXIT_TIMEOUT_MS)) {
            master.kill('SIGKILL')
            await waitExit(master, EXIT_TIMEOUT_MS)
          }
        }
        await rm(dir, { recursive: true, force: true })
      })()
      await stopping
    }
  }
}

// The master and its workers (the master's children, by ps).
function haproxyPids (masterPid: number): number[] {
  const res = spawnSync('ps', ['-o', 'pid=', '--ppid', String(masterPid)], { encoding: 'utf8', timeout: 2000 })
  const children = (res.stdout ?? '').split('\n').map((s) => Number(s.trim())).filter((n) => Number.isInteger(n) && n > 0)
  return [masterPid, ...children]
}
