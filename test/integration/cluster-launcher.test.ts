import { spawn, type ChildProcess } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

// `exec-gateway cluster` (npm run cluster) as a newcomer runs it, from dist: real redis-server,
// haproxy, three replicas and a supervisor, all on free ports. It must print one JSON line once
// the cluster answers, stop everything on SIGTERM (exit 0, nothing left behind), and stop
// everything when one of its children dies on its own (exit 1, naming it).

const BIN = fileURLToPath(new URL('../../bin/exec-gateway.js', import.meta.url))
const READY_MS = 45_000
const EXIT_MS = 30_000
const OUTPUT_LIMIT = 256 * 1024

interface ClusterLine {
  msg: string
  publicUrl: string
  supervisorUrl: string
  dataDir: string
  replicas: Array<{ replicaId: string, publicUrl: string, pid: number }>
  redis: { url: string, pid: number }
  haproxy: { pid: number }
  supervisor: { pid: number }
  logDir: string
  runDir: string
}

interface Launcher {
  proc: ChildProcess
  dataDir: string
  line: ClusterLine
  stdout: () => string
  stderr: () => string
  exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
  /** Whatever is still running (the launcher, then every child it named) gets SIGKILL; the data dir goes. */
  cleanup: () => Promise<void>
}

function alive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

function childPids (line: ClusterLine): number[] {
  return [...line.replicas.map((r) => r.pid), line.redis.pid, line.haproxy.pid, line.supervisor.pid]
}

async function within<T> (ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => { timer = setTimeout(() => { reject(new Error(`${what}: not within ${ms} ms`)) }, ms) })])
  } finally {
    clearTimeout(timer)
  }
}

async function portFree (port: number): Promise<boolean> {
  return await new Promise((resolve) => {
    const srv = createServer()
    srv.once('error', () => { resolve(false) })
    srv.listen(port, '127.0.0.1', () => { srv.close(() => { resolve(true) }) })
  })
}

function portOf (url: string): number {
  return Number(new URL(url).port)
}

async function startLauncher (): Promise<Launcher> {
  const dataDir = mkdtempSync(join(tmpdir(), 'egw-cluster-'))
  const proc = spawn(process.execPath, [
    BIN, 'cluster', '--free-ports', '--data-dir', dataDir, '--shutdown-grace-ms', '1000', '--ready-timeout-ms', String(READY_MS - 5000)
  ], { stdio: ['ignore', 'pipe', 'pipe'] })
  proc.on('error', () => {})
  let out = ''
  let err = ''
  proc.stdout!.on('data', (d: Buffer) => { out = (out + d.toString()).slice(-OUTPUT_LIMIT) })
  proc.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-OUTPUT_LIMIT) })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>((resolve) => {
    proc.once('exit', (code, signal) => { resolve({ code, signal }) })
  })
  let line: ClusterLine | undefined
  // A crashed test worker must not leave a cluster behind.
  const onParentExit = (): void => {
    try { proc.kill('SIGKILL') } catch { /* gone */ }
    for (const pid of line === undefined ? [] : childPids(line)) {
      try { process.kill(pid, 'SIGKILL') } catch { /* gone */ }
    }
  }
  process.once('exit', onParentExit)
  const cleanup = async (): Promise<void> => {
    onParentExit()
    await within(EXIT_MS, 'launcher exit after SIGKILL', exited)
    process.off('exit', onParentExit)
    rmSync(dataDir, { recursive: true, force: true })
  }
  try {
    line = await within(READY_MS, 'the cluster JSON line', new Promise<ClusterLine>((resolve, reject) => {
      const onData = (): void => {
        const nl = out.indexOf('\n')
        if (nl === -1) return
        proc.stdout!.off('data', onData)
        try { resolve(JSON.parse(out.slice(0, nl)) as ClusterLine) } catch (e) { reject(new Error(`stdout's first line is not JSON: ${out.slice(0, nl)} (${String(e)})`)) }
      }
      proc.stdout!.on('data', onData)
      void exited.then((e) => { reject(new Error(`launcher exited (${JSON.stringify(e)}) before its JSON line; stderr:\n${err}`)) })
    })).catch((e: Error) => { throw new Error(`${e.message}\nstderr:\n${err}`) })
  } catch (e) {
    await cleanup()
    throw e
  }
  return { proc, dataDir, line, stdout: () => out, stderr: () => err, exited, cleanup }
}

async function getJson (url: string): Promise<{ status: number, body: any }> {
  const res = await fetch(url, { signal: AbortSignal.timeout(10_000) })
  return { status: res.status, body: await res.json().catch(() => undefined) }
}

describe('npm run cluster: start, answer, stop', () => {
  let l: Launcher

  beforeAll(async () => { l = await startLauncher() }, READY_MS + 10_000)
  afterAll(async () => { await l?.cleanup() }, EXIT_MS + 5000)

  it('prints one JSON line: the load balancer, the data dir and three live replicas', async () => {
    const { line } = l
    expect(line.msg).toBe('cluster')
    expect(line.publicUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/)
    expect(line.supervisorUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/)
    expect(line.publicUrl).not.toBe(line.supervisorUrl)
    expect(line.dataDir).toBe(l.dataDir)
    expect(existsSync(join(l.dataDir, 'token_secret'))).toBe(true)
    expect(line.replicas).toHaveLength(3)
    expect(new Set(line.replicas.map((r) => r.replicaId)).size).toBe(3)
    expect(new Set(line.replicas.map((r) => r.pid)).size).toBe(3)
    expect(new Set(line.replicas.map((r) => r.publicUrl)).size).toBe(3)
    for (const pid of childPids(line)) expect(alive(pid), `pid ${pid}`).toBe(true)
    expect(existsSync(line.runDir)).toBe(true)
    // Each replica answers on its own too.
    for (const r of line.replicas) expect((await getJson(`${r.publicUrl}/readyz`)).status).toBe(200)
    // Through haproxy.
    expect((await getJson(`${line.publicUrl}/readyz`)).status).toBe(200)
  })

  // The next two need the forwarding between replicas (a request that lands on a replica not
  // holding the sandbox goes to the one that does): each is asked several times, so haproxy
  // spreads them over the replicas.
  it('GET /v1/sandboxes/local through the load balancer: connected, from whichever replica answers', async () => {
    for (let i = 0; i < 4; i++) {
      const { status, body } = await getJson(`${l.line.publicUrl}/v1/sandboxes/local`)
      expect(status, JSON.stringify(body)).toBe(200)
      expect(body.status).toBe('connected')
    }
  })

  it('an exec through the load balancer runs in the sandbox: exit 0, "hello\\n"', async () => {
    for (let i = 0; i < 4; i++) {
      const res = await fetch(`${l.line.publicUrl}/v1/sandboxes/local/execs?wait=true`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ command: ['echo', 'hello'] }),
        signal: AbortSignal.timeout(15_000)
      })
      const body = await res.json() as { exitCode?: number, stdout?: string, status?: string }
      expect(res.status, JSON.stringify(body)).toBe(200)
      expect(body.status).toBe('exited')
      expect(body.exitCode).toBe(0)
      expect(body.stdout).toBe('hello\n')
    }
  })

  it('SIGTERM stops everything: exit 0, every child gone, its ports free, its run dir removed', async () => {
    const { line } = l
    l.proc.kill('SIGTERM')
    const e = await within(EXIT_MS, 'launcher exit after SIGTERM', l.exited)
    expect(e, l.stderr()).toEqual({ code: 0, signal: null })
    for (const pid of childPids(line)) expect(alive(pid), `pid ${pid} still alive`).toBe(false)
    const ports = [line.publicUrl, line.supervisorUrl, line.redis.url, ...line.replicas.map((r) => r.publicUrl)].map(portOf)
    for (const port of ports) expect(await portFree(port), `port ${port}`).toBe(true)
    expect(existsSync(line.runDir)).toBe(false)
    // The logs stay for whoever wants to know what happened; the identity stays for the next run.
    expect(existsSync(join(line.logDir, 'replica-1.log'))).toBe(true)
    expect(existsSync(join(l.dataDir, 'token_secret'))).toBe(true)
    // stdout carried exactly the one line.
    expect(l.stdout().trimEnd().split('\n')).toHaveLength(1)
  }, EXIT_MS + 5000)
})

describe('npm run cluster: a child that dies', () => {
  let l: Launcher

  beforeAll(async () => { l = await startLauncher() }, READY_MS + 10_000)
  afterAll(async () => { await l?.cleanup() }, EXIT_MS + 5000)

  it('a SIGKILLed replica: the launcher stops the rest and exits non-zero naming it', async () => {
    const { line } = l
    const victim = line.replicas[1]!
    process.kill(victim.pid, 'SIGKILL')
    const e = await within(EXIT_MS, 'launcher exit after a replica died', l.exited)
    expect(e.code, l.stderr()).toBe(1)
    expect(l.stderr()).toMatch(new RegExp(`${victim.replicaId} \\(pid ${victim.pid}\\) exited unexpectedly \\(signal SIGKILL\\)`))
    for (const pid of childPids(line)) expect(alive(pid), `pid ${pid} still alive`).toBe(false)
    expect(existsSync(line.runDir)).toBe(false)
  }, EXIT_MS + 5000)
})
