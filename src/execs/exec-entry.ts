import { EventEmitter } from 'node:events'
import type { GatewayError } from '../errors.js'
import type { Outcome } from '../relay/outcome.js'
import type { Exec, ExecResult } from '../schemas/exec.js'
import type { ExecEvent, FinalEvent } from '../schemas/events.js'
import { continuationPrefix, interleave, OutputJournal, utf8CompleteLength, type JournalChunk, type JournalGap } from './journal.js'
import type { RetentionBudget, RetentionTicket } from './retention-budget.js'
import type { ValidExec } from './validate.js'

// One exec: its record, its two output journals, and the readers attached to it. Every way of
// ending goes through finish(), once.

export type StreamName = 'stdout' | 'stderr'
export type Encoding = 'utf8' | 'base64'
// 'binary' is internal: output events carry their bytes in the raw argument, not in data.
type AttachEncoding = Encoding | 'binary'

export interface AttachOptions {
  stdoutOffset?: number | undefined
  stderrOffset?: number | undefined
  encoding?: AttachEncoding | undefined
}

export class ExecEntry extends EventEmitter {
  readonly id: string
  readonly sandboxId: string
  readonly spec: ValidExec
  readonly createdAt: Date
  status: Exec['status'] = 'pending'
  startedAt: Date | undefined
  endedAt: Date | undefined
  outcome: Outcome | undefined
  // The stdin offset: bytes taken for the command, in order (its run keeps it).
  stdinBytes = 0
  // The sandbox's daemon keeps this exec (its run says so): it outlives this gateway.
  kept = false
  readonly stdout: OutputJournal
  readonly stderr: OutputJournal
  // Readers that cannot keep up. While any holds the flow, the exec reads from the sandbox no
  // faster than they drain (the SSH window closes and the command blocks on its writes).
  readonly #holders = new Set<object>()
  // What this exec holds counts against its sandbox's and the gateway's retention budgets,
  // which may take its oldest bytes to make room for others.
  readonly #ticket: RetentionTicket | undefined
  // Readers following live output (attach() until its detach or the final event).
  readonly #followers = new Set<Follower>()
  #discarded = false
  #relayLost = false
  #movedAway = false

  // createdAt is given for an exec rebuilt after a restart from what its sandbox keeps.
  constructor (id: string, sandboxId: string, spec: ValidExec, retentionBytes: number, budget?: RetentionBudget, createdAt?: Date) {
    super()
    this.setMaxListeners(0)
    this.id = id
    this.sandboxId = sandboxId
    this.spec = spec
    this.createdAt = createdAt ?? new Date()
    this.stdout = new OutputJournal(retentionBytes, (gap, freed) => { this.#skipped('stdout', gap, freed) })
    this.stderr = new OutputJournal(retentionBytes, (gap, freed) => { this.#skipped('stderr', gap, freed) })
    this.#ticket = budget?.open(sandboxId, this)
  }

  // The relay of a kept exec is gone; the exec runs on in its sandbox while the run reattaches.
  relayLost (): void { this.#setRelay(true) }

  relayRestored (): void { this.#setRelay(false) }

  #setRelay (lost: boolean): void {
    if (this.finished || this.#relayLost === lost) return
    this.#relayLost = lost
    const ev: ExecEvent = { type: 'relay', state: lost ? 'lost' : 'restored' }
    for (const f of [...this.#followers]) f.relay(ev)
    this.emit('relay', ev)
  }

  #skipped (stream: StreamName, gap: JournalGap, freed: number): void {
    if (freed > 0 && !this.#discarded) this.#ticket?.grew(-freed)
    for (const f of [...this.#followers]) f.gap(stream, gap)
  }

  // Bytes held in both journals.
  get retained (): number { return this.stdout.retained + this.stderr.retained }

  get finished (): boolean { return this.outcome !== undefined }

  get flowHeld (): boolean { return this.#holders.size > 0 }

  // Readers attached to live output: each is let go at its detach or after the final event.
  get readers (): number { return this.#followers.size }

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

  // Live readers get the chunk itself, never the journal's copy of it: the budget may drop it
  // from the journal before they are called, and they still see every byte, with no gap.
  append (stream: StreamName, data: Buffer): void {
    if (this.finished || data.length === 0) return
    // Output only comes over a relay: a reattached channel's first bytes can arrive before the
    // run has heard that its attach succeeded, and readers must see `restored` before them.
    if (this.#relayLost) this.#setRelay(false)
    const journal = this[stream]
    const before = journal.retained
    const chunk = journal.append(data)
    if (this.#discarded) journal.dropOldest(Infinity)
    else this.#ticket?.grew(journal.retained - before)
    // A snapshot: a reader attached from inside a send has this chunk in its replay already.
    if (this.#followers.size > 0) for (const f of [...this.#followers]) f.output(stream, chunk.offset, chunk.data)
  }

  // Frees up to n of the oldest bytes across both streams, in the order they arrived, so what
  // is left replays as the newest part of what a live reader saw. For the budget; returns the
  // bytes freed.
  dropOldest (n: number): number {
    let freed = 0
    while (freed < n) {
      const out = this.stdout.oldestSeq
      const err = this.stderr.oldestSeq
      if (out === undefined && err === undefined) break
      freed += err === undefined || (out !== undefined && out < err)
        ? this.stdout.dropOldest(n - freed, err)
        : this.stderr.dropOldest(n - freed, out)
    }
    return freed
  }

  // The record is forgotten (DELETE, or its TTL passed): its output stops counting against
  // the budgets and is not kept. A run that has not ended yet still streams live to readers
  // already attached.
  discard (): void {
    if (this.#discarded) return
    this.#discarded = true
    this.#ticket?.release()
    this.stdout.dropOldest(Infinity)
    this.stderr.dropOldest(Infinity)
  }

  get movedAway (): boolean { return this.#movedAway }

  // Cluster mode: the exec's sandbox moved to another replica, whose record of it goes on from
  // its daemon. This one never ends (no outcome is written here): its readers are let go with
  // 'moved' and reconnect, and the record is dropped.
  moveAway (): void {
    if (this.finished || this.#movedAway) return
    this.#movedAway = true
    this.#followers.clear()
    this.emit('moved')
    this.discard()
  }

  finish (outcome: Outcome): void {
    if (this.outcome !== undefined || this.#movedAway) return
    this.outcome = outcome
    this.status = outcome.kind === 'failed' ? 'failed' : 'exited'
    this.endedAt = new Date()
    this.#ticket?.finished()
    const final = this.finalEvent()!
    for (const f of [...this.#followers]) f.end(final)
    this.emit('end', final)
  }

  get error (): GatewayError | undefined {
    return this.outcome?.kind === 'failed' ? this.outcome.error : undefined
  }

  finalEvent (): FinalEvent | undefined {
    const o = this.outcome
    if (o === undefined) return undefined
    if (o.kind === 'failed') return { type: 'error', code: o.error.code, status: o.error.status, detail: o.error.detail, message: o.error.detail }
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
      stderrBytes: this.stderr.total,
      stdinBytes: this.stdinBytes
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

  // Replays what is held from the given offsets, in the order it arrived across both streams
  // (so a reloaded terminal shows what the live one showed), then follows live output, then
  // the one final event. Returns the detach function; `send` is never called after it. Output
  // events come with the byte offset just past them (their text length can differ from their
  // byte count).
  attach (opts: AttachOptions, send: SendEvent): () => void {
    const encoding = opts.encoding ?? 'utf8'
    if (this.#relayLost && !this.finished) send({ type: 'relay', state: 'lost' })
    const replays = STREAMS.map((stream) => ({ stream, ...this[stream].replayFrom(startOffset(opts, stream)) }))
    // A reader may resume past what the journal holds yet: an exec rebuilt after a restart
    // refills its journal from the daemon's replay, from before the reader's offset. What it
    // has already seen is never sent again.
    const begins = { stdout: Math.max(replays[0].begin, startOffset(opts, 'stdout')), stderr: Math.max(replays[1].begin, startOffset(opts, 'stderr')) }
    const output = new ReaderOutput(encoding, send, begins)
    for (const r of replays) {
      if (r.gap !== undefined) send({ type: 'gap', stream: r.stream, from: r.gap.from, to: r.gap.to + (encoding === 'utf8' ? orphanBytes(r.chunks) : 0) })
    }
    for (const c of interleave(replays)) output.write(c.stream, c)
    const final = this.finalEvent()
    if (final === undefined) return this.#follow(output, send)
    output.flush()
    send(final)
    return () => {}
  }

  #follow (output: ReaderOutput, send: SendEvent): () => void {
    // A reader detached from inside another's send is still in the snapshot: it gets nothing more.
    const follower: Follower = {
      output: (stream, offset, data) => { if (this.#followers.has(follower)) output.write(stream, { offset, data }) },
      gap: (stream, gap) => {
        if (!this.#followers.has(follower)) return
        output.restart(stream, gap.to)
        send({ type: 'gap', stream, from: gap.from, to: gap.to })
      },
      relay: (ev) => { if (this.#followers.has(follower)) send(ev) },
      end: (ev) => {
        if (!this.#followers.has(follower)) return
        output.flush()
        detach()
        send(ev)
      }
    }
    const detach = (): void => { this.#followers.delete(follower) }
    this.#followers.add(follower)
    return detach
  }
}

type SendEvent = (ev: ExecEvent, endOffset?: number, raw?: Buffer) => void

interface Follower {
  output: (stream: StreamName, offset: number, data: Buffer) => void
  end: (ev: FinalEvent) => void
  gap: (stream: StreamName, gap: JournalGap) => void
  relay: (ev: ExecEvent) => void
}

const STREAMS = ['stdout', 'stderr'] as const

function startOffset (opts: AttachOptions, stream: StreamName): number {
  return (stream === 'stdout' ? opts.stdoutOffset : opts.stderrOffset) ?? 0
}

// One reader's output events in its encoding. Bytes (base64, binary) go out exactly as held;
// text goes through one Utf8Framer per stream, since each stream has its own characters in
// flight however the two interleave.
class ReaderOutput {
  readonly #encoding: AttachEncoding
  readonly #send: SendEvent
  readonly #begins: Record<StreamName, number>
  #text: Record<StreamName, Utf8Framer>

  constructor (encoding: AttachEncoding, send: SendEvent, begins: Record<StreamName, number>) {
    this.#encoding = encoding
    this.#send = send
    this.#begins = begins
    this.#text = { stdout: new Utf8Framer(begins.stdout), stderr: new Utf8Framer(begins.stderr) }
  }

  write (stream: StreamName, whole: JournalChunk): void {
    const begin = this.#begins[stream]
    const chunk = whole.offset >= begin ? whole : { offset: begin, data: whole.data.subarray(begin - whole.offset) }
    if (chunk.data.length === 0) return
    const end = chunk.offset + chunk.data.length
    if (this.#encoding === 'binary') this.#send({ type: stream, offset: chunk.offset, data: '' }, end, chunk.data)
    else if (this.#encoding === 'base64') this.#send({ type: stream, offset: chunk.offset, data: chunk.data.toString('base64') }, end)
    else this.#sendText(stream, this.#text[stream].push(chunk))
  }

  // The stream jumps to `begin` (a skip): what waits for the rest of a character is sent as
  // it is, and the stream starts over as a reader beginning there would.
  restart (stream: StreamName, begin: number): void {
    if (this.#encoding !== 'utf8') return
    this.#sendText(stream, this.#text[stream].flush())
    this.#text[stream] = new Utf8Framer(begin)
  }

  // The output has ended: a character still waiting for its end never gets it.
  flush (): void {
    for (const stream of STREAMS) this.#sendText(stream, this.#text[stream].flush())
  }

  #sendText (stream: StreamName, chunk: JournalChunk | undefined): void {
    if (chunk === undefined) return
    this.#send({ type: stream, offset: chunk.offset, data: chunk.data.toString('utf8') }, chunk.offset + chunk.data.length)
  }
}

// Cuts one stream's bytes into whole UTF-8 characters. A character split across chunks waits
// for its end, so events never split one. A reader that begins past byte 0 may begin inside a
// character: the continuation bytes it would start with belong to a character it cannot be
// sent whole, so they are dropped (the next event's offset says where the text resumes)
// instead of going out as U+FFFD. That holds for bytes that are still to arrive too, when the
// reader begins at the end of what is held.
class Utf8Framer {
  #carry: JournalChunk | undefined
  #orphans: number

  constructor (begin: number) {
    this.#orphans = begin > 0 ? 3 : 0
  }

  // The whole characters this chunk completes, if any.
  push (chunk: JournalChunk): JournalChunk | undefined {
    const fresh = this.#dropOrphans(chunk)
    if (fresh.data.length === 0) return undefined
    const held = this.#carry
    const start = held?.offset ?? fresh.offset
    const bytes = held === undefined ? fresh.data : Buffer.concat([held.data, fresh.data])
    const cut = utf8CompleteLength(bytes)
    // A copy, so a held half character does not pin the journal's whole chunk.
    this.#carry = cut < bytes.length ? { offset: start + cut, data: Buffer.from(bytes.subarray(cut)) } : undefined
    return cut > 0 ? { offset: start, data: bytes.subarray(0, cut) } : undefined
  }

  flush (): JournalChunk | undefined {
    const held = this.#carry
    this.#carry = undefined
    return held
  }

  #dropOrphans (chunk: JournalChunk): JournalChunk {
    if (this.#orphans === 0) return chunk
    const n = Math.min(continuationPrefix(chunk.data), this.#orphans)
    // Anything but a continuation byte is a character boundary: from there on, nothing is dropped.
    this.#orphans = n === chunk.data.length ? this.#orphans - n : 0
    return n === 0 ? chunk : { offset: chunk.offset + n, data: chunk.data.subarray(n) }
  }
}

// The continuation bytes a text replay starts with (at most 3): after a gap, Utf8Framer drops
// them, so they are reported as part of the gap and the first event starts where it ends.
function orphanBytes (chunks: readonly JournalChunk[]): number {
  let n = 0
  for (const c of chunks) {
    const k = Math.min(continuationPrefix(c.data), 3 - n)
    n += k
    if (k < c.data.length || n === 3) break
  }
  return n
}
