import { EventEmitter } from 'node:events'
import type { GatewayError } from '../errors.js'
import type { Outcome } from '../relay/outcome.js'
import type { Exec, ExecResult } from '../schemas/exec.js'
import type { ExecEvent, FinalEvent } from '../schemas/events.js'
import { OutputJournal, utf8CompleteLength } from './journal.js'
import type { ValidExec } from './validate.js'

// One exec: its record, its two output journals, and the readers attached to it. Every way of
// ending goes through finish(), once.

export type StreamName = 'stdout' | 'stderr'
export type Encoding = 'utf8' | 'base64'
// 'binary' is internal: output events carry their bytes in the raw argument, not in data.
export type AttachEncoding = Encoding | 'binary'

export interface AttachOptions {
  stdoutOffset?: number | undefined
  stderrOffset?: number | undefined
  encoding?: AttachEncoding | undefined
}

export class ExecEntry extends EventEmitter {
  readonly id: string
  readonly sandboxId: string
  readonly spec: ValidExec
  readonly createdAt = new Date()
  status: Exec['status'] = 'pending'
  startedAt: Date | undefined
  endedAt: Date | undefined
  outcome: Outcome | undefined
  readonly stdout: OutputJournal
  readonly stderr: OutputJournal
  // Readers that cannot keep up. While any holds the flow, the exec reads from the sandbox no
  // faster than they drain (the SSH window closes and the command blocks on its writes).
  readonly #holders = new Set<object>()

  constructor (id: string, sandboxId: string, spec: ValidExec, retentionBytes: number) {
    super()
    this.setMaxListeners(0)
    this.id = id
    this.sandboxId = sandboxId
    this.spec = spec
    this.stdout = new OutputJournal(retentionBytes)
    this.stderr = new OutputJournal(retentionBytes)
  }

  get finished (): boolean { return this.outcome !== undefined }

  get flowHeld (): boolean { return this.#holders.size > 0 }

  holdFlow (reader: object): void {
    if (this.#holders.has(reader)) return
    this.#holders.add(reader)
    if (this.#holders.size === 1) this.emit('flow', true)
  }

  releaseFlow (reader: object): void {
    if (!this.#holders.delete(reader)) return
    if (this.#holders.size === 0) this.emit('flow', false)
  }

  markStarted (): void {
    if (this.status !== 'pending') return
    this.status = 'running'
    this.startedAt = new Date()
    this.emit('started')
  }

  append (stream: StreamName, data: Buffer): void {
    if (this.finished || data.length === 0) return
    const chunk = this[stream].append(data)
    this.emit('output', stream, chunk.offset, chunk.data)
  }

  finish (outcome: Outcome): void {
    if (this.outcome !== undefined) return
    this.outcome = outcome
    this.status = outcome.kind === 'failed' ? 'failed' : 'exited'
    this.endedAt = new Date()
    this.emit('end', this.finalEvent()!)
  }

  get error (): GatewayError | undefined {
    return this.outcome?.kind === 'failed' ? this.outcome.error : undefined
  }

  finalEvent (): FinalEvent | undefined {
    const o = this.outcome
    if (o === undefined) return undefined
    if (o.kind === 'failed') return { type: 'error', code: o.error.code, status: o.error.status, message: o.error.detail }
    return { type: 'exit', exitCode: o.exitCode, signal: o.signal, timedOut: o.timedOut }
  }

  toJSON (): Exec {
    const o = this.outcome
    const err = this.error
    return {
      id: this.id,
      sandboxId: this.sandboxId,
      command: this.spec.command,
      tty: this.spec.tty,
      interactive: this.spec.interactive,
      status: this.status,
      exitCode: o !== undefined && o.kind !== 'failed' ? o.exitCode : null,
      signal: o !== undefined && o.kind !== 'failed' ? o.signal : null,
      timedOut: o !== undefined && o.kind !== 'failed' ? o.timedOut : false,
      error: err === undefined ? null : { code: err.code, status: err.status, detail: err.detail },
      createdAt: this.createdAt.toISOString(),
      startedAt: this.startedAt?.toISOString() ?? null,
      endedAt: this.endedAt?.toISOString() ?? null,
      stdoutBytes: this.stdout.total,
      stderrBytes: this.stderr.total
    }
  }

  toResult (encoding: Encoding): ExecResult {
    const text = (t: { data: Buffer, truncated: boolean }): string =>
      encoding === 'utf8' && t.truncated ? t.data.subarray(continuationPrefix(t.data)).toString('utf8') : t.data.toString(encoding)
    const out = this.stdout.tail()
    const err = this.stderr.tail()
    return {
      ...this.toJSON(),
      stdout: text(out),
      stderr: text(err),
      stdoutTruncated: out.truncated,
      stderrTruncated: err.truncated
    }
  }

  // Replays what is held from the given offsets, then follows live output, then the one final
  // event. Returns the detach function; `send` is never called after it. Output events come
  // with the byte offset just past them (their text length can differ from their byte count).
  attach (opts: AttachOptions, send: (ev: ExecEvent, endOffset?: number, raw?: Buffer) => void): () => void {
    const encoding = opts.encoding ?? 'utf8'
    const carry: Record<StreamName, { offset: number, data: Buffer } | undefined> = { stdout: undefined, stderr: undefined }
    let detached = false
    const emitChunk = (stream: StreamName, offset: number, data: Buffer, flush: boolean): void => {
      if (encoding === 'binary') { send({ type: stream, offset, data: '' }, offset + data.length, data); return }
      if (encoding === 'base64') { send({ type: stream, offset, data: data.toString('base64') }, offset + data.length); return }
      const held = carry[stream]
      let start = offset
      let bytes = data
      if (held !== undefined) { start = held.offset; bytes = Buffer.concat([held.data, data]) }
      const cut = flush ? bytes.length : utf8CompleteLength(bytes)
      carry[stream] = cut < bytes.length ? { offset: start + cut, data: Buffer.from(bytes.subarray(cut)) } : undefined
      if (cut > 0) send({ type: stream, offset: start, data: bytes.subarray(0, cut).toString('utf8') }, start + cut)
    }
    const flushCarry = (): void => {
      for (const s of ['stdout', 'stderr'] as const) {
        const held = carry[s]
        if (held !== undefined) { carry[s] = undefined; emitChunk(s, held.offset, held.data, true) }
      }
    }
    for (const stream of ['stdout', 'stderr'] as const) {
      const from = stream === 'stdout' ? opts.stdoutOffset : opts.stderrOffset
      const { gap, chunks } = this[stream].readFrom(from ?? 0)
      // Retention cuts bytes, not characters: as text, the half character after a gap is part
      // of the gap, so data never starts with a broken character.
      if (gap !== undefined && encoding === 'utf8') gap.to += dropLeadingContinuation(chunks)
      if (gap !== undefined) send({ type: 'gap', stream, from: gap.from, to: gap.to })
      for (const c of chunks) emitChunk(stream, c.offset, c.data, false)
    }
    const final = this.finalEvent()
    if (final !== undefined) {
      flushCarry()
      send(final)
      return () => {}
    }
    const onOutput = (stream: StreamName, offset: number, data: Buffer): void => {
      if (!detached) emitChunk(stream, offset, data, false)
    }
    const onEnd = (ev: FinalEvent): void => {
      if (detached) return
      flushCarry()
      detach()
      send(ev)
    }
    const detach = (): void => {
      detached = true
      this.off('output', onOutput)
      this.off('end', onEnd)
    }
    this.on('output', onOutput)
    this.on('end', onEnd)
    return detach
  }
}

// How many UTF-8 continuation bytes (at most 3) a buffer starts with.
function continuationPrefix (buf: Buffer): number {
  let n = 0
  while (n < 3 && n < buf.length && (buf[n]! & 0xc0) === 0x80) n++
  return n
}

// Drops the continuation bytes at the head of a replay (in place); returns how many.
function dropLeadingContinuation (chunks: Array<{ offset: number, data: Buffer }>): number {
  let dropped = 0
  while (chunks.length > 0 && dropped < 3) {
    const first = chunks[0]!
    const n = Math.min(continuationPrefix(first.data), 3 - dropped)
    if (n === 0) break
    dropped += n
    if (n === first.data.length) chunks.shift()
    else { chunks[0] = { offset: first.offset + n, data: first.data.subarray(n) }; break }
  }
  return dropped
}
