import { createHash } from 'node:crypto'

// A finished exec as the directory keeps it for replicas that did not run it: its JSON record
// and the retained tail of each stream, capped so one exec cannot fill Redis.

export interface FinishedInput {
  // The exec's JSON record (what GET /v1/execs/{id} answers).
  record: unknown
  stdout: Buffer
  stderr: Buffer
  // Stream offset of the first byte given (earlier bytes already dropped by retention); 0 if none.
  stdoutOffset?: number
  stderrOffset?: number
  // Bytes were already dropped before this tail.
  stdoutTruncated?: boolean
  stderrTruncated?: boolean
}

export interface FinishedRecord {
  record: unknown
  stdout: Buffer
  stderr: Buffer
  stdoutOffset: number
  stderrOffset: number
  stdoutTruncated: boolean
  stderrTruncated: boolean
}

interface Meta {
  stdoutOffset: number
  stderrOffset: number
  stdoutTruncated: boolean
  stderrTruncated: boolean
}

interface EncodedFinished {
  digest: string
  meta: string
  record: string
  stdout: Buffer
  stderr: Buffer
}

// Keeps the last capBytes: a reader resuming by offset wants the end of the output.
function tail (buf: Buffer, offset: number, truncated: boolean, capBytes: number): { buf: Buffer, offset: number, truncated: boolean } {
  if (buf.length <= capBytes) return { buf, offset, truncated }
  const drop = buf.length - capBytes
  return { buf: buf.subarray(drop), offset: offset + drop, truncated: true }
}

export function encodeFinished (input: FinishedInput, capBytes: number): EncodedFinished {
  const out = tail(input.stdout, input.stdoutOffset ?? 0, input.stdoutTruncated === true, capBytes)
  const err = tail(input.stderr, input.stderrOffset ?? 0, input.stderrTruncated === true, capBytes)
  const metaValue: Meta = { stdoutOffset: out.offset, stderrOffset: err.offset, stdoutTruncated: out.truncated, stderrTruncated: err.truncated }
  const meta = JSON.stringify(metaValue)
  const record = JSON.stringify(input.record)
  if (record === undefined) throw new TypeError('a finished record must be JSON-serializable')
  // Length-prefixed parts: no two different contents share a digest by shifting a boundary.
  const h = createHash('sha256')
  for (const part of [Buffer.from(meta), Buffer.from(record), out.buf, err.buf]) {
    h.update(`${part.length}:`)
    h.update(part)
  }
  return { digest: h.digest('hex'), meta, record, stdout: out.buf, stderr: err.buf }
}

export function decodeFinished (meta: Buffer, record: Buffer, stdout: Buffer, stderr: Buffer): FinishedRecord {
  const m = JSON.parse(meta.toString('utf8')) as Meta
  return {
    record: JSON.parse(record.toString('utf8')) as unknown,
    stdout,
    stderr,
    stdoutOffset: m.stdoutOffset,
    stderrOffset: m.stderrOffset,
    stdoutTruncated: m.stdoutTruncated,
    stderrTruncated: m.stderrTruncated
  }
}
