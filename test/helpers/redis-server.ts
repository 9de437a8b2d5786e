// Runs a real redis-server (Debian's redis-server) on a free loopback port, never 6379, with no
// persistence: a restart loses everything, as a crashed cache would. test/global-setup.ts makes
// sure the binary exists; this helper only locates and runs it.
import { spawn, type ChildProcess } from 'node:child_process'
import { findBinary } from '../../src/cluster/launcher-binaries.js'
import { freePort } from '../../src/cluster/launcher-probes.js'
import { mkdtemp, rm } from 'node:fs/promises'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export interface RedisServer {
  url: string
  port: number
  /** The current process; restart() changes it. */
  readonly pid: number
  /** SIGSTOP: the socket stays open and accepts bytes, nothing answers. */
  pause(): void
  /** SIGCONT. */
  resume(): void
  /** Kills it (SIGKILL, as a crash) and starts a fresh, empty one on the same port. */
  restart(): Promise<void>
  stop(): Promise<void>
  /** The server's own output (bounded tail), for diagnosing a failing test. */
  logs(): string
}

const HOST = '127.0.0.1'
const READY_TIMEOUT_MS = 10_000
const EXIT_TIMEOUT_MS = 5000
const BIND_ATTEMPTS = 5
const LOG_LIMIT_BYTES = 32 * 1024

// Servers still running if the test process exits without stop(): they would outlive a crashed
// worker and hold their port.
const live = new Set<ChildProcess>()
let exitHookInstalled = false
function track (child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true
    process.once('exit', () => {
      for (const c of live) {
        try {
          c.kill('SIGKILL')
        } catch {
          // already gone
        }
      }
    })
  }
  live.add(child)
  child.once('exit', () => live.delete(child))
}

export function findRedisServer (): string | undefined {
  return findBinary('redis-server')
}

/** One PING over a raw socket, bounded: true on +PONG. */
function ping (port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect(port, HOST)
    let buf = ''
    const done = (ok: boolean): void => {
      clearTimeout(timer)
      sock.destroy()
      resolve(ok)
    }
    const timer = setTimeout(() => { done(false) }, timeoutMs)
    sock.once('error', () => { done(false) })
    sock.once('connect', () => { sock.write('PING\r\n') })
    sock.on('data', (d) => {
      buf += d.toString()
      if (buf.includes('+PONG')) done(true)
    })
  })
}

function waitExit (child: ChildProcess, timeoutMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve()
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { reject(new Error(`redis-server pid ${child.pid} did not exit within ${timeoutMs} ms`)) }, timeoutMs)
    child.once('exit', () => {
      clearTimeout(timer)
      resolve()
    })
  })
}

export async function startRedisServer (): Promise<RedisServer> {
  const bin = findRedisServer()
  if (bin === undefined) {
    throw new Error('redis-server is required by the cluster tests and was not found at /usr/bin/redis-server or on PATH. ' +
      'Install it with `sudo apt-get install -y redis-server` (Debian/Ubuntu), then run the tests again.')
  }
  const dir = await mkdtemp(join(tmpdir(), 'exec-gateway-redis-'))
  let log = ''
  let child: ChildProcess | undefined

  const spawnOn = async (port: number): Promise<ChildProcess> => {
    const c = spawn(bin, [
      '--port', String(port), '--bind', HOST, '--save', '', '--appendonly', 'no',
      '--dir', dir, '--daemonize', 'no', '--protected-mode', 'yes', '--loglevel', 'warning'
    ], { stdio: ['ignore', 'pipe', 'pipe'] })
    track(c)
    const append = (d: Buffer): void => { log = (log + d.toString()).slice(-LOG_LIMIT_BYTES) }
    c.stdout?.on('data', append)
    c.stderr?.on('data', append)
    c.once('error', (err) => { append(Buffer.from(`spawn failed: ${err.message}\n`)) })
    const deadline = Date.now() + READY_TIMEOUT_MS
    while (Date.now() < deadline) {
      if (c.exitCode !== null || c.signalCode !== null) break
      if (await ping(port, 500)) return c
      await new Promise((resolve) => setTimeout(resolve, 25))
    }
    c.kill('SIGKILL')
    await waitExit(c, EXIT_TIMEOUT_MS).catch(() => {})
    throw new Error(`redis-server on port ${port} did not answer PING within ${READY_TIMEOUT_MS} ms; its output:\n${log}`)
  }

  let port = 0
  let lastError: unknown
  for (let attempt = 0; attempt < BIND_ATTEMPTS && child === undefined; attempt++) {
    port = await freePort(new Set())
    try {
      child = await spawnOn(port)
    } catch (err) {
      lastError = err
    }
  }
  if (child === undefined) {
    await rm(dir, { recursive: true, force: true })
    throw lastError instanceof Error ? lastError : new Error(String(lastError))
  }

  const kill = async (c: ChildProcess): Promise<void> => {
    // SIGKILL reaches a stopped process too.
    c.kill('SIGKILL')
    await waitExit(c, EXIT_TIMEOUT_MS)
  }
  let current: ChildProcess = child
  return {
    url: `redis://${HOST}:${port}`,
    port,
    get pid () { return current.pid ?? -1 },
    pause () { current.kill('SIGSTOP') },
    resume () { current.kill('SIGCONT') },
    async restart () {
      await kill(current)
      current = await spawnOn(port)
    },
    async stop () {
      await kill(current)
      await rm(dir, { recursive: true, force: true })
    },
    logs () { return log }
  }
}
