// Programs for the output oracle: sequences of steps (writes of 0 B to 16 MiB to stdout or
// stderr, slow trickles, two streams written at once, sleeps, background children, a stream
// closed early) and an ending (exit code 0-255, death by signal, or the last step's status),
// rendered as one /bin/sh script whose output is deterministic: every byte comes from seeded pool
// files written before the run (or /dev/zero, `yes`, printf literals), so the oracle (the same
// script run here by /bin/sh with pipes) and the gateway see the same bytes on each stream.
// Interleaving between the two streams is not deterministic and not compared; each stream is.
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'

const KiB = 1024
export const MiB = 1024 * KiB

export type StreamName = 'stdout' | 'stderr'
export const STREAMS = ['stdout', 'stderr'] as const

// ---------------------------------------------------------------------------------------------
// Pools: the bytes programs write

// Larger than the largest write, so a write can start anywhere in the first part.
const POOL_BYTES = 17 * MiB

export interface Pools {
  dir: string
  bin: string // seeded random bytes (not UTF-8)
  txt: string // seeded UTF-8 text: ASCII, 2-, 3- and 4-byte characters, newlines
  txtBytes: Buffer
  close: () => void
}

// xorshift32: seeded, fast, and the same bytes on every machine.
function prng (seed: number): () => number {
  let x = (seed | 0) || 0x9e3779b9
  return () => {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5
    return x >>> 0
  }
}

function randomPool (seed: number, size: number): Buffer {
  const next = prng(seed)
  const buf = Buffer.allocUnsafe(size)
  for (let i = 0; i + 4 <= size; i += 4) buf.writeUInt32LE(next(), i)
  return buf
}

const TEXT_ALPHABET = [
  ...'abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?-_()[]{}<>\'"\\/$`*'.split(''),
  '\n', '\n', '\t', 'é', 'ß', 'Ω', 'ж', '€', '☃', '中', '文', 'ア', '😀', '🦀', '𝄞'
].map((c) => Buffer.from(c, 'utf8'))

function textPool (seed: number, size: number): Buffer {
  const next = prng(seed ^ 0x5bd1e995)
  const out = Buffer.allocUnsafe(size + 8)
  let n = 0
  while (n < size) {
    const c = TEXT_ALPHABET[next() % TEXT_ALPHABET.length]!
    c.copy(out, n)
    n += c.length
  }
  // Cut at the last whole character at or before `size`.
  let end = n
  while (end > size) { end--; while ((out[end]! & 0xc0) === 0x80) end-- }
  return out.subarray(0, end)
}

export function writePools (seed: number): Pools {
  const dir = mkdtempSync(join(tmpdir(), 'egw-oracle-'))
  // OpenSSH runs commands as the sandbox account: the pools must be readable by it.
  chmodSync(dir, 0o755)
  const bin = join(dir, 'bin.pool')
  const txt = join(dir, 'txt.pool')
  writeFileSync(bin, randomPool(seed, POOL_BYTES), { mode: 0o644 })
  const txtBytes = textPool(seed, POOL_BYTES)
  writeFileSync(txt, txtBytes, { mode: 0o644 })
  return { dir, bin, txt, txtBytes, close: () => rmSync(dir, { recursive: true, force: true }) }
}

// ---------------------------------------------------------------------------------------------
// Programs

type Source = 'bin' | 'txt' | 'zero' | 'yes' | 'lit'
type Tool = 'head' | 'dd' | 'tail'

interface Write {
  stream: StreamName
  size: number
  source: Source
  tool: Tool
  // Where in the pool the write starts, as a fraction of the room left after it.
  at: number
  // dd block size (how big each write(2) of the producer is).
  bs: number
  literal: string
}

type Step =
  | { kind: 'write', w: Write }
  // Several small writes with short sleeps between them.
  | { kind: 'slow', stream: StreamName, pieces: Write[], sleepMs: number }
  // stdout and stderr written at the same time by two processes.
  | { kind: 'parallel', out: Write, err: Write }
  | { kind: 'sleep', ms: number }
  // A background child: `quiet` keeps the shell's stdout/stderr open and writes nothing
  // (it may outlive the shell by up to 0.8 s); `null` has its output on /dev/null and outlives
  // the shell by seconds. Neither changes what the streams carry.
  | { kind: 'bg', mode: 'quiet' | 'null', ms: number }
  // `exec >&-` (or 2>&-): the stream ends early; later writes to it go to the other stream.
  | { kind: 'close', stream: StreamName }

type Ending =
  | { kind: 'exit', code: number }
  | { kind: 'signal', name: SignalName, via: 'kill' | 'exec' }
  | { kind: 'fall' } // the status of the last step

// Only signals both daemons report by name (RFC 4254's list) and that dump no core.
const SIGNALS = ['TERM', 'KILL', 'INT', 'HUP', 'USR1', 'USR2', 'ALRM', 'PIPE'] as const
type SignalName = typeof SIGNALS[number]

export interface Program {
  content: 'binary' | 'text'
  steps: Step[]
  ending: Ending
}

// ---------------------------------------------------------------------------------------------
// Arbitraries. Sizes: mostly small and medium, some bursts past the 2 MiB SSH window, rarely up
// to 16 MiB; a program's total is capped so a run's byte count stays bounded.

const MAX_WRITE = 16 * MiB
const PROGRAM_BYTES_CAP = 24 * MiB

const sizeArb: fc.Arbitrary<number> = fc.oneof(
  { weight: 16, arbitrary: fc.constant(0) },
  { weight: 80, arbitrary: fc.integer({ min: 1, max: 4 * KiB }) },
  { weight: 60, arbitrary: fc.integer({ min: 4 * KiB + 1, max: 192 * KiB }) },
  { weight: 24, arbitrary: fc.integer({ min: 192 * KiB + 1, max: 3 * MiB / 2 }) },
  { weight: 7, arbitrary: fc.integer({ min: 5 * MiB / 2, max: 5 * MiB }) },
  { weight: 1, arbitrary: fc.integer({ min: 5 * MiB + 1, max: MAX_WRITE }) }
)

const streamArb = fc.constantFrom<StreamName>('stdout', 'stderr')
const literalArb = fc.string({ unit: fc.constantFrom('a', 'z', ' ', '\n', '\'', '"', '\\', '%', '$', 'é', '☃', '😀', '\t'), maxLength: 40 })

function writeArb (size: fc.Arbitrary<number>, stream: fc.Arbitrary<StreamName> = streamArb): fc.Arbitrary<Write> {
  return fc.record({
    stream,
    size,
    source: fc.constantFrom<Source>('bin', 'bin', 'bin', 'txt', 'txt', 'zero', 'yes', 'lit'),
    tool: fc.constantFrom<Tool>('head', 'dd', 'dd', 'tail'),
    at: fc.integer({ min: 0, max: 1_000_000 }).map((n) => n / 1_000_000),
    bs: fc.constantFrom(512, 4096, 65536, 1048576),
    literal: literalArb
  })
}

const smallSize = fc.integer({ min: 1, max: 3000 })

const stepArb: fc.Arbitrary<Step> = fc.oneof(
  { weight: 50, arbitrary: writeArb(sizeArb).map((w) => ({ kind: 'write' as const, w })) },
  {
    weight: 8,
    arbitrary: fc.tuple(streamArb, fc.array(writeArb(smallSize), { minLength: 2, maxLength: 6 }), fc.integer({ min: 5, max: 60 }))
      .map(([stream, pieces, sleepMs]) => ({ kind: 'slow' as const, stream, pieces: pieces.map((p) => ({ ...p, stream })), sleepMs }))
  },
  {
    weight: 8,
    arbitrary: fc.tuple(writeArb(sizeArb, fc.constant('stdout')), writeArb(sizeArb, fc.constant('stderr')))
      .map(([out, err]) => ({ kind: 'parallel' as const, out, err }))
  },
  { weight: 7, arbitrary: fc.integer({ min: 1, max: 300 }).map((ms) => ({ kind: 'sleep' as const, ms })) },
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('bg' as const), mode: fc.constantFrom<'quiet' | 'null'>('quiet', 'null'), ms: fc.integer({ min: 50, max: 800 }) }) },
  { weight: 2, arbitrary: streamArb.map((stream) => ({ kind: 'close' as const, stream })) }
)

const endingArb: fc.Arbitrary<Ending> = fc.oneof(
  { weight: 6, arbitrary: fc.integer({ min: 0, max: 255 }).map((code) => ({ kind: 'exit' as const, code })) },
  { weight: 2, arbitrary: fc.constant({ kind: 'exit' as const, code: 0 }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('signal' as const), name: fc.constantFrom(...SIGNALS), via: fc.constantFrom<'kill' | 'exec'>('kill', 'kill', 'exec') }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'fall' as const }) }
)

// The shape of the original hang: a burst past the window on one stream, then a write to the
// other one (and maybe more).
const burstThenSwitchArb: fc.Arbitrary<Step[]> = fc.tuple(
  streamArb,
  fc.integer({ min: 2 * MiB + 1, max: 4 * MiB }),
  fc.integer({ min: 1, max: 200 * KiB }),
  writeArb(fc.constant(0)),
  fc.array(stepArb, { maxLength: 2 })
).map(([a, burst, small, w, rest]) => {
  const b: StreamName = a === 'stdout' ? 'stderr' : 'stdout'
  return [
    { kind: 'write' as const, w: { ...w, stream: a, size: burst } },
    { kind: 'write' as const, w: { ...w, stream: b, size: small, source: w.source === 'lit' ? 'bin' as const : w.source } },
    ...rest
  ]
})

export const programArb: fc.Arbitrary<Program> = fc.record({
  content: fc.constantFrom<'binary' | 'text'>('binary', 'binary', 'text'),
  steps: fc.oneof(
    { weight: 85, arbitrary: fc.array(stepArb, { minLength: 1, maxLength: 8 }) },
    { weight: 15, arbitrary: burstThenSwitchArb }
  ),
  ending: endingArb
}).map(capProgram)

// Writes past the program's byte cap keep only their last 12 bits of size.
function capProgram (p: Program): Program {
  let total = 0
  const cap = (w: Write): Write => {
    const size = total + w.size > PROGRAM_BYTES_CAP ? w.size % 4096 : w.size
    total += size
    return { ...w, size }
  }
  const steps = p.steps.map((s): Step => {
    if (s.kind === 'write') return { ...s, w: cap(s.w) }
    if (s.kind === 'slow') return { ...s, pieces: s.pieces.map(cap) }
    if (s.kind === 'parallel') return { ...s, out: cap(s.out), err: cap(s.err) }
    return s
  })
  return { ...p, steps }
}

// ---------------------------------------------------------------------------------------------
// Rendering

export interface Rendered {
  script: string
  // What the script writes per stream (as rendered; the oracle's run is the truth).
  bytes: Record<StreamName, number>
  // Time the script spends sleeping in the foreground, ms.
  sleepMs: number
}

function sq (s: string): string {
  return "'" + s.replaceAll("'", "'\\''") + "'"
}

function isContinuation (b: number | undefined): boolean {
  return b !== undefined && (b & 0xc0) === 0x80
}

// One write as a shell command (without its redirection), and the bytes it writes.
function renderWrite (w: Write, content: Program['content'], pools: Pools): { cmd: string, bytes: number } {
  let source = w.source
  // Text programs write only valid UTF-8, whole characters per write.
  if (content === 'text' && source === 'bin') source = 'txt'
  if (source === 'lit') {
    const lit = w.literal.slice(0, 40)
    return { cmd: `printf '%s' ${sq(lit)}`, bytes: Buffer.byteLength(lit) }
  }
  if (source === 'zero') return { cmd: `head -c ${w.size} /dev/zero`, bytes: w.size }
  if (source === 'yes') return { cmd: `yes ${sq('yes, oracle line ' + String(w.bs))} | head -c ${w.size}`, bytes: w.size }
  const file = source === 'bin' ? pools.bin : pools.txt
  let size = Math.min(w.size, MAX_WRITE)
  let offset = w.tool === 'head' ? 0 : Math.floor(w.at * (POOL_BYTES - MAX_WRITE - 64))
  if (source === 'txt') {
    const t = pools.txtBytes
    while (isContinuation(t[offset])) offset++
    let end = offset + size
    while (end < t.length && isContinuation(t[end])) end++
    size = end - offset
  }
  switch (w.tool) {
    case 'head': return { cmd: `head -c ${size} ${file}`, bytes: size }
    case 'dd': return { cmd: `dd if=${file} bs=${w.bs} iflag=skip_bytes,count_bytes skip=${offset} count=${size} status=none`, bytes: size }
    case 'tail': return { cmd: `tail -c +${offset + 1} ${file} | head -c ${size}`, bytes: size }
  }
}

const REDIRECT: Record<StreamName, string> = { stdout: '', stderr: ' >&2' }

export function renderProgram (p: Program, pools: Pools): Rendered {
  const lines: string[] = []
  const bytes: Record<StreamName, number> = { stdout: 0, stderr: 0 }
  const closed = new Set<StreamName>()
  let sleepMs = 0
  // Where a write to `stream` goes once streams may have been closed; undefined: nowhere.
  const route = (stream: StreamName): StreamName | undefined => {
    if (!closed.has(stream)) return stream
    const other: StreamName = stream === 'stdout' ? 'stderr' : 'stdout'
    return closed.has(other) ? undefined : other
  }
  const write = (w: Write): string | undefined => {
    const to = route(w.stream)
    if (to === undefined) return undefined
    const r = renderWrite(w, p.content, pools)
    bytes[to] += r.bytes
    return `{ ${r.cmd}; }${REDIRECT[to]}`
  }
  for (const s of p.steps) {
    switch (s.kind) {
      case 'write': {
        const c = write(s.w)
        if (c !== undefined) lines.push(c)
        break
      }
      case 'slow':
        s.pieces.forEach((piece, i) => {
          const c = write(piece)
          if (c !== undefined) lines.push(c)
          if (i < s.pieces.length - 1) { lines.push(`sleep ${(s.sleepMs / 1000).toFixed(3)}`); sleepMs += s.sleepMs }
        })
        break
      case 'parallel': {
        if (closed.size > 0) {
          for (const w of [s.out, s.err]) { const c = write(w); if (c !== undefined) lines.push(c) }
          break
        }
        const a = write(s.out)!
        const b = write(s.err)!
        lines.push(`${a} & p1=$!; ${b} & p2=$!; wait $p1 $p2`)
        break
      }
      case 'sleep':
        lines.push(`sleep ${(s.ms / 1000).toFixed(3)}`)
        sleepMs += s.ms
        break
      case 'bg':
        if (s.mode === 'quiet') lines.push(`sleep ${(s.ms / 1000).toFixed(3)} &`)
        else lines.push(`(sleep ${(2 + s.ms / 1000).toFixed(3)}; head -c 1000 ${pools.bin}; echo late >&2) >/dev/null 2>&1 &`)
        break
      case 'close':
        if (closed.has(s.stream)) break
        closed.add(s.stream)
        lines.push(s.stream === 'stdout' ? 'exec >&-' : 'exec 2>&-')
        break
    }
  }
  switch (p.ending.kind) {
    case 'exit': lines.push(`exit ${p.ending.code}`); break
    case 'signal':
      lines.push(p.ending.via === 'kill' ? `kill -${p.ending.name} $$` : `exec /bin/sh -c 'kill -${p.ending.name} $$'`)
      // Only reached if the signal did not end the shell: make that visible as a wrong status.
      lines.push('exit 199')
      break
    case 'fall': break
  }
  return { script: lines.join('\n') + '\n', bytes, sleepMs }
}

// ---------------------------------------------------------------------------------------------
// The oracle: the script run directly by /bin/sh with pipes, as the daemons run it.

export interface OracleResult {
  stdout: Buffer
  stderr: Buffer
  exitCode: number | null
  signal: string | null
  ms: number
}

export function sha256 (b: Buffer): string {
  return createHash('sha256').update(b).digest('hex')
}

/** Runs `script` with /bin/sh -c, stdin /dev/null; rejects if it does not end within boundMs. */
export async function runDirect (script: string, boundMs: number): Promise<OracleResult> {
  const started = Date.now()
  const child = spawn('/bin/sh', ['-c', script], { stdio: ['ignore', 'pipe', 'pipe'], detached: true })
  const out: Buffer[] = []
  const err: Buffer[] = []
  child.stdout.on('data', (b: Buffer) => out.push(b))
  child.stderr.on('data', (b: Buffer) => err.push(b))
  let timer: NodeJS.Timeout | undefined
  try {
    return await new Promise<OracleResult>((resolve, reject) => {
      timer = setTimeout(() => {
        try { process.kill(-child.pid!, 'SIGKILL') } catch { /* gone */ }
        reject(new Error(`hang: the oracle's own /bin/sh run exceeded ${boundMs} ms`))
      }, boundMs)
      child.once('error', reject)
      // 'close': after the exit and both pipes' EOF, like a daemon that waits for the output.
      child.once('close', (code, signal) => {
        resolve({
          stdout: Buffer.concat(out),
          stderr: Buffer.concat(err),
          exitCode: signal === null ? code : null,
          signal: signal === null ? null : signal.replace(/^SIG/, ''),
          ms: Date.now() - started
        })
      })
    })
  } finally {
    clearTimeout(timer)
  }
}
