// The clients the bench measures with: the gateway's HTTP API on pooled connections, a WebSocket
// reader that hashes every byte of a stream, and the OpenSSH client of the peer.
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import http from 'node:http'
import WebSocket from 'ws'
import { requestJson } from '../test/helpers/http.js'
import type { OpenSshd } from '../test/helpers/openssh.js'
import { waitFor } from '../test/helpers/wait.js'
import { BINARY_SUBPROTOCOL } from '../src/schemas/websocket.js'
import { CURL, SSH } from './knobs.js'

export interface Reply<T> { status: number, body: T }

// ms: start to end; streamMs: first output byte to end.
export interface StreamRun { ms: number, streamMs: number, bytes: number, sha256: string, frames: number }

export type StreamMode = 'binary' | 'base64'

// stdout events carry offset and data, the exit event exitCode.
interface StreamEvent { type: string, offset?: number, data: string, exitCode?: number | null }

// The gateway API on keep-alive connections of its own, closed by close().
export class GatewayApi {
  readonly #agent = new http.Agent({ keepAlive: true, maxSockets: 1024 })

  // The body's type is what the caller expects of this route, not checked.
  async json<T = unknown> (base: string, method: string, path: string, body?: unknown, timeoutMs = 120_000): Promise<Reply<T>> {
    const r = await requestJson(base + path, { method, body, agent: this.#agent, timeoutMs })
    return { status: r.status, body: r.body as T }
  }

  // One `true`, ?wait=true; returns the round trip in ms.
  async execTrue (base: string, sandboxId: string): Promise<number> {
    const t0 = performance.now()
    const r = await this.json<{ exitCode?: number } | undefined>(base, 'POST', `/v1/sandboxes/${sandboxId}/execs?wait=true`, { command: ['true'] })
    const elapsed = performance.now() - t0
    if (r.status !== 200 || r.body?.exitCode !== 0) throw new Error(`exec true on ${sandboxId}: ${r.status} ${JSON.stringify(r.body).slice(0, 300)}`)
    return elapsed
  }

  // apiToken: for a gateway started with --api-token (requestJson sends no headers of its own).
  async waitConnected (base: string, sandboxId: string, apiToken?: string): Promise<void> {
    await waitFor(async () => {
      const r = apiToken === undefined
        ? await this.json<{ status?: string }>(base, 'GET', `/v1/sandboxes/${sandboxId}`)
        : await fetch(`${base}/v1/sandboxes/${sandboxId}`, { headers: { authorization: `Bearer ${apiToken}` }, signal: AbortSignal.timeout(10_000) }).then(async (res) => ({ status: res.status, body: await res.json() as { status?: string } }))
      return r.status === 200 && r.body.status === 'connected'
    }, { timeoutMs: 20_000, intervalMs: 200, description: `sandbox ${sandboxId} to connect` })
  }

  async activeExecs (base: string): Promise<number> {
    const r = await this.json(base, 'GET', '/metrics')
    const m = /^exec_gateway_active_execs (\d+)/m.exec(String(r.body))
    if (m === null) throw new Error('no exec_gateway_active_execs in /metrics')
    return Number(m[1])
  }

  // Starts `cat file` as an interactive exec that waits for one stdin line, attaches a WebSocket,
  // then lets it go: every byte is read by the attached reader (no retention, no gap). Times the
  // whole thing from the POST to the close, as `ssh … cat` is timed from spawn to exit.
  async websocketCat (base: string, sandboxId: string, file: string, mode: StreamMode): Promise<StreamRun> {
    const t0 = performance.now()
    const created = await this.json<{ id: string }>(base, 'POST', `/v1/sandboxes/${sandboxId}/execs`, {
      command: ['sh', '-c', 'read _ && exec cat "$1"', 'sh', file],
      interactive: true
    })
    if (created.status !== 201) throw new Error(`start cat: ${created.status} ${JSON.stringify(created.body)}`)
    const url = `${base.replace(/^http/, 'ws')}/v1/execs/${created.body.id}/stream${mode === 'base64' ? '?encoding=base64' : ''}`
    return await hashStream(url, mode, file, t0)
  }

  close (): void {
    this.#agent.destroy()
  }
}

async function hashStream (url: string, mode: StreamMode, file: string, t0: number): Promise<StreamRun> {
  return await new Promise<StreamRun>((resolve, reject) => {
    const ws = new WebSocket(url, mode === 'binary' ? [BINARY_SUBPROTOCOL] : [])
    const hash = createHash('sha256')
    let bytes = 0
    let frames = 0
    let firstByte: number | undefined
    let exit: StreamEvent | undefined
    const problems: string[] = []
    const timer = setTimeout(() => { ws.terminate(); reject(new Error(`${mode} stream of ${file} did not end within 300 s`)) }, 300_000)
    ws.on('open', () => {
      if (mode === 'binary' && ws.protocol !== BINARY_SUBPROTOCOL) problems.push(`server selected subprotocol ${JSON.stringify(ws.protocol)}`)
      ws.send(JSON.stringify({ type: 'stdin', data: 'go\n' }))
      ws.send(JSON.stringify({ type: 'eof' }))
    })
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      frames++
      firstByte ??= performance.now()
      if (isBinary) {
        if (data[0] === 1) { hash.update(data.subarray(1)); bytes += data.length - 1 } else problems.push(`binary frame on channel ${data[0]}`)
        return
      }
      const ev = JSON.parse(data.toString('utf8')) as StreamEvent
      if (ev.type === 'stdout') {
        if (ev.offset !== bytes) problems.push(`stdout offset ${ev.offset}, expected ${bytes}`)
        const b = Buffer.from(ev.data, 'base64')
        hash.update(b)
        bytes += b.length
      } else if (ev.type === 'exit') {
        exit = ev
      } else if (ev.type !== 'heartbeat') {
        problems.push(JSON.stringify(ev).slice(0, 300))
      }
    })
    ws.on('unexpected-response', (_req, res) => { clearTimeout(timer); reject(new Error(`websocket refused: ${res.statusCode}`)) })
    ws.on('error', (err) => { clearTimeout(timer); reject(err) })
    ws.on('close', (code) => {
      clearTimeout(timer)
      const elapsed = performance.now() - t0
      if (code !== 1000) problems.push(`close code ${code}`)
      if (exit?.exitCode !== 0) problems.push(`exit ${JSON.stringify(exit)}`)
      if (problems.length > 0) { reject(new Error(`${mode} stream: ${problems.slice(0, 5).join('; ')}`)); return }
      resolve({ ms: elapsed, streamMs: performance.now() - (firstByte ?? t0), bytes, sha256: hash.digest('hex'), frames })
    })
  })
}

// ---------------------------------------------------------------- curl

export interface CurlExec { ms: number, status: number, exitCode: unknown, body: string }

// One whole `curl` process doing `POST …/execs?wait=true` `{"command":["true"]}` with a bearer
// token, timed from spawn to exit: what a shell script pays, connection and process start
// included, as `ssh -S … true` is timed.
export function curlArgs (base: string, sandboxId: string, apiToken: string): string[] {
  return ['-s', '-S', '--max-time', '30', '-X', 'POST', '-H', `authorization: Bearer ${apiToken}`, '-H', 'content-type: application/json',
    '--data', '{"command":["true"]}', '-w', '\\n%{http_code}', `${base}/v1/sandboxes/${sandboxId}/execs?wait=true`]
}

export async function curlExecTrue (args: readonly string[]): Promise<CurlExec> {
  // curl's own --max-time bounds it; this is in case curl itself hangs.
  const { ms, code, out, stderr } = await timedRun(CURL, args, 40_000)
  if (code !== 0) throw new Error(`curl exited ${code}: ${stderr.trim()}`)
  const nl = out.lastIndexOf('\n')
  const body = out.slice(0, nl)
  let exitCode: unknown
  try { exitCode = (JSON.parse(body) as { exitCode?: unknown }).exitCode } catch { exitCode = undefined }
  return { ms, status: Number(out.slice(nl + 1)), exitCode, body }
}

interface TimedRun { ms: number, code: number | null, out: string, stderr: string }

// A whole process, timed from spawn to exit (not to the close of its pipes), with the tails of
// what it printed; killed after timeoutMs in case it hangs.
async function timedRun (file: string, args: readonly string[], timeoutMs: number): Promise<TimedRun> {
  const t0 = performance.now()
  const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let stderr = ''
  child.stdout.on('data', (c: Buffer) => { out = (out + c.toString()).slice(-16_000) })
  child.stderr.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-4000) })
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
  let ms = 0
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject)
    child.once('exit', () => { ms = performance.now() - t0 })
    child.once('close', (c) => resolve(c))
  }).finally(() => clearTimeout(timer))
  return { ms, code, out, stderr }
}

// A whole process that does no exec (`curl --version`, `ssh -V`), timed from spawn to exit:
// what a client pays before it sends anything.
export async function timeProcess (file: string, args: readonly string[]): Promise<number> {
  const { ms, code } = await timedRun(file, args, 10_000)
  if (code !== 0) throw new Error(`${file} ${args.join(' ')} exited ${code}`)
  return ms
}

// ---------------------------------------------------------------- the OpenSSH client

export interface SshRun { ms: number, code: number | null, stderr: string }

// cpuS: user + system seconds of the ssh process.
export interface SshCpuRun { ms: number, cpuS: number }

const SSH_OPTIONS = ['-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null']

// A fresh `ssh` client to the run's sshd each time, as the peer of every measurement.
export class SshPeer {
  readonly #key: string
  readonly #sshd: OpenSshd

  constructor (clientKey: string, sshd: OpenSshd) {
    this.#key = clientKey
    this.#sshd = sshd
  }

  args (remote: string[], options: string[] = []): string[] {
    return [...SSH_OPTIONS, ...options, '-i', this.#key, '-p', String(this.#sshd.port), `${this.#sshd.user}@127.0.0.1`, ...remote]
  }

  // The same as one line, for the recipe in RESULTS.md.
  commandLine (remote: string, options = ''): string {
    return `${SSH} ${SSH_OPTIONS.join(' ')} ${options === '' ? '' : `${options} `}-i ${this.#key} -p ${this.#sshd.port} ${this.#sshd.user}@127.0.0.1 ${remote}`
  }

  // `ssh … <remote>`, timed from spawn to exit; stdout goes to stdoutFd.
  async run (remote: string[], opts: { options?: string[], stdoutFd?: number | 'ignore', timeoutMs?: number } = {}): Promise<SshRun> {
    const t0 = performance.now()
    const child = spawn(SSH, this.args(remote, opts.options), { stdio: ['ignore', opts.stdoutFd ?? 'ignore', 'pipe'] })
    let stderr = ''
    child.stderr!.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-4000) })
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 300_000)
    return await new Promise((resolve, reject) => {
      child.once('error', (err) => { clearTimeout(timer); reject(err) })
      child.once('exit', (code) => { clearTimeout(timer); resolve({ ms: performance.now() - t0, code, stderr }) })
    })
  }

  // `ssh … <remote>` > /dev/null, with its CPU: node has no rusage per child and /proc/<pid> is
  // gone once ssh has exited, so bash runs it and its `times` prints what its reaped child used
  // (getrusage, not rounded to clock ticks). The timing includes bash's start, ~2 ms.
  async runWithCpu (remote: string[], options: string[] = []): Promise<SshCpuRun> {
    const { ms, code, out, stderr } = await timedRun('bash', ['-c', '"$@" > /dev/null; s=$?; times; exit $s', 'bash', SSH, ...this.args(remote, options)], 300_000)
    if (code !== 0) throw new Error(`ssh ${remote.join(' ')} exited ${code}: ${stderr.trim()}`)
    // Line 1: the shell's own user and system time; line 2: its children's, e.g. "0m0.412s 0m0.118s".
    const m = /^(\d+)m([\d.]+)s (\d+)m([\d.]+)s$/m.exec(out.trim().split('\n')[1] ?? '')
    if (m === null) throw new Error(`bash times printed ${JSON.stringify(out)}`)
    return { ms, cpuS: Number(m[1]) * 60 + Number(m[2]) + Number(m[3]) * 60 + Number(m[4]) }
  }

  // `ssh … cat file` into this process, hashed like the WebSocket client does.
  async catPiped (file: string): Promise<StreamRun> {
    const t0 = performance.now()
    const child = spawn(SSH, this.args(['cat', file]), { stdio: ['ignore', 'pipe', 'pipe'] })
    const hash = createHash('sha256')
    let bytes = 0
    let frames = 0
    let firstByte: number | undefined
    let stderr = ''
    child.stdout.on('data', (c: Buffer) => { firstByte ??= performance.now(); frames++; bytes += c.length; hash.update(c) })
    child.stderr.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-4000) })
    const timer = setTimeout(() => child.kill('SIGKILL'), 300_000)
    const code = await new Promise<number | null>((resolve, reject) => {
      child.once('error', reject)
      child.once('close', (c) => resolve(c))
    }).finally(() => clearTimeout(timer))
    const end = performance.now()
    if (code !== 0) throw new Error(`ssh cat exited ${code}: ${stderr}`)
    return { ms: end - t0, streamMs: end - (firstByte ?? t0), bytes, sha256: hash.digest('hex'), frames }
  }
}
