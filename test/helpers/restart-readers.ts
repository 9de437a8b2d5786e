import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import WebSocket from 'ws'
import { BINARY_SUBPROTOCOL } from '../../sdk/index.js'
import { readEvents } from './api.js'
import { sleep } from './wait.js'

// Readers of an exec's output that can tell a byte missed or repeated across a gateway restart:
// each one keeps the offsets it has reached, as a client resuming after a crash would.

export type StreamName = 'stdout' | 'stderr'
export interface Offsets { stdout: number, stderr: number }

export const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

// A hang fails the test with what it was waiting for instead of running into the test timeout.
export async function within<T> (p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no result within ${ms} ms`)), ms) })])
  } finally {
    clearTimeout(timer)
  }
}

export interface ShRun { stdout: Buffer, stderr: Buffer, code: number | null }

// The oracle: the same program run by /bin/sh on this host (where the embedded daemon runs its
// commands too), streams kept apart.
export async function runBySh (script: string, boundMs = 60_000): Promise<ShRun> {
  const child = spawn('/bin/sh', ['-c', script], { stdio: ['ignore', 'pipe', 'pipe'] })
  const out: Buffer[] = []
  const err: Buffer[] = []
  child.stdout.on('data', (c: Buffer) => out.push(c))
  child.stderr.on('data', (c: Buffer) => err.push(c))
  try {
    const code = await within(new Promise<number | null>((resolve, reject) => {
      child.once('error', reject)
      child.once('close', (c) => resolve(c))
    }), boundMs, `oracle /bin/sh -c ${script.slice(0, 60)}`)
    return { stdout: Buffer.concat(out), stderr: Buffer.concat(err), code }
  } finally {
    child.kill('SIGKILL')
  }
}

// Output events in base64 that must follow one another from `from`: each chunk starts where
// the previous one ended, and no gap is announced. Breaks are collected, not thrown, so a test
// can report all of them with the bytes it got.
export class OffsetJournal {
  readonly next: Offsets
  readonly problems: string[] = []
  readonly others: any[] = []
  final: any
  readonly #bytes: Record<StreamName, Buffer[]> = { stdout: [], stderr: [] }

  constructor (from: Offsets = { stdout: 0, stderr: 0 }) {
    this.next = { ...from }
  }

  add (ev: any): void {
    if (ev.type === 'stdout' || ev.type === 'stderr') {
      const stream: StreamName = ev.type
      const chunk = Buffer.from(ev.data, 'base64')
      if (ev.offset !== this.next[stream]) this.problems.push(`${stream} chunk at offset ${String(ev.offset)}, expected ${this.next[stream]} (${ev.offset < this.next[stream] ? 'duplicate' : 'missing'} bytes)`)
      this.next[stream] = ev.offset + chunk.length
      this.#bytes[stream].push(chunk)
      return
    }
    if (ev.type === 'gap') this.problems.push(`gap ${JSON.stringify(ev)}`)
    if (ev.type === 'exit' || ev.type === 'error') {
      if (this.final !== undefined) this.problems.push(`a second final event ${JSON.stringify(ev)}`)
      this.final = ev
      return
    }
    if (ev.type !== 'heartbeat') this.others.push(ev)
  }

  bytes (stream: StreamName): Buffer { return Buffer.concat(this.#bytes[stream]) }
}

export async function eventsFrom0 (baseUrl: string, execId: string, boundMs: number): Promise<OffsetJournal> {
  const j = new OffsetJournal()
  for (const ev of await within(readEvents(baseUrl, execId, 'application/x-ndjson', '?encoding=base64'), boundMs, `/events of ${execId} from offset 0`)) j.add(ev)
  return j
}

export interface OffsetReader {
  readonly journal: OffsetJournal
  readonly ws: WebSocket
  readonly opened: Promise<void>
  /** The close code (1006 when the gateway died under it); rejects when the upgrade is refused. */
  readonly closed: Promise<number>
  send: (frame: unknown) => void
}

// A JSON WebSocket attach (base64 data) from the given offsets.
export function openOffsetReader (baseUrl: string, execId: string, from: Offsets = { stdout: 0, stderr: 0 }): OffsetReader {
  const journal = new OffsetJournal(from)
  const ws = new WebSocket(`${baseUrl.replace(/^http/, 'ws')}/v1/execs/${execId}/stream?encoding=base64&stdoutOffset=${from.stdout}&stderrOffset=${from.stderr}`)
  ws.on('message', (m, isBinary) => { if (!isBinary) journal.add(JSON.parse(m.toString())) })
  const opened = new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve())
    ws.once('close', () => reject(new Error(`websocket of ${execId} closed before it opened`)))
  })
  const closed = new Promise<number>((resolve, reject) => {
    ws.on('unexpected-response', (_req, res) => reject(new Error(`websocket of ${execId} refused: HTTP ${String(res.statusCode)}`)))
    // A dying gateway may make the socket error; its close follows and tells the same.
    ws.on('error', () => {})
    ws.on('close', (code) => resolve(code))
  })
  opened.catch(() => {})
  closed.catch(() => {})
  return { journal, ws, opened, closed, send: (frame) => ws.send(JSON.stringify(frame)) }
}

interface DashboardRun {
  stdout: Buffer
  stderr: Buffer
  final: any
  reconnects: number
  /** Control events (relay, gap…) seen on the way. */
  events: any[]
}

export interface DashboardReader {
  readonly seen: Offsets
  readonly done: Promise<DashboardRun>
  readonly frames: number
}

// public/events.js as a test can run it: binary frames, bytes counted per channel, and on a
// drop a GET of the exec (retried while the gateway does not answer; 404 gives up) before a new
// socket from the counted offsets. Nothing else keeps it from showing a byte twice or missing one.
export function startDashboardReader (baseUrl: string, execId: string, boundMs: number): DashboardReader {
  const seen: Offsets = { stdout: 0, stderr: 0 }
  const chunks: Record<StreamName, Buffer[]> = { stdout: [], stderr: [] }
  const events: any[] = []
  let frames = 0
  let reconnects = 0
  const deadline = Date.now() + boundMs
  const oneSocket = async (): Promise<any> => await new Promise((resolve) => {
    const ws = new WebSocket(`${baseUrl.replace(/^http/, 'ws')}/v1/execs/${execId}/stream?stdoutOffset=${seen.stdout}&stderrOffset=${seen.stderr}`, [BINARY_SUBPROTOCOL])
    ws.binaryType = 'nodebuffer'
    let final: any
    const left = setTimeout(() => ws.terminate(), Math.max(0, deadline - Date.now()))
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      if (isBinary) {
        frames++
        const stream: StreamName = data[0] === 1 ? 'stdout' : 'stderr'
        chunks[stream].push(Buffer.from(data.subarray(1)))
        seen[stream] += data.length - 1
        return
      }
      const ev = JSON.parse(data.toString())
      if (ev.type === 'exit' || ev.type === 'error') final = ev
      else if (ev.type !== 'heartbeat') events.push(ev)
    })
    ws.on('error', () => {})
    ws.on('close', () => { clearTimeout(left); resolve(final) })
  })
  const done = (async (): Promise<DashboardRun> => {
    let failures = 0
    for (;;) {
      const final = await oneSocket()
      if (final !== undefined) return { stdout: Buffer.concat(chunks.stdout), stderr: Buffer.concat(chunks.stderr), final, reconnects, events }
      for (;;) {
        if (Date.now() >= deadline) throw new Error(`dashboard reader of ${execId}: no final event within ${boundMs} ms (seen ${JSON.stringify(seen)}, ${reconnects} reconnects)`)
        failures++
        await sleep(Math.min(3000, 200 * 2 ** (failures - 1)))
        let status: number
        try {
          status = (await fetch(`${baseUrl}/v1/execs/${execId}`, { signal: AbortSignal.timeout(Math.max(1, deadline - Date.now())) })).status
        } catch {
          continue
        }
        if (status === 404) throw new Error(`dashboard reader of ${execId}: GET answered 404 on reconnect (seen ${JSON.stringify(seen)})`)
        if (status === 200) break
      }
      failures = 0
      reconnects++
    }
  })()
  done.catch(() => {})
  return { seen, done, get frames () { return frames } }
}
