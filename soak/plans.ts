// Every exec's plan: its shape, script, reader, expected output and exit code, and its bound, all
// derived from the seed, the agent and the exec index.
import { createHash } from 'node:crypto'
import { Expected } from './expected.js'
import { between, DETECTION_BOUND_MS, KNOBS, pick, rng, SEED, seededBytes, SHAPES_PCT, SLACK_MS, type Rand } from './knobs.js'

export type Mode = 'wait' | 'ws' | 'ndjson' | 'sse'

// classic: the long, mostly silent script below, read by ?wait=true, a WebSocket, NDJSON or SSE.
// The others are the large shapes: a burst of megabytes on one stream then a write to the
// other (or interleaved bursts) with nobody attached, read after the end; readers that attach
// late (while it runs, or after the end past retention); readers that stop reading for
// seconds; and interactive execs whose stdin is flooded.
const LARGE_SHAPES = [
  'burst-out-err', 'burst-err-out', 'burst-mixed', 'late-mid', 'late-end', 'paused-ws', 'paused-ndjson', 'stdin-count', 'stdin-digest', 'stdin-echo'
] as const
export type Shape = 'classic' | typeof LARGE_SHAPES[number]
export const SHAPES: readonly Shape[] = ['classic', ...LARGE_SHAPES]
// Relative weights among the large shapes: bursts are about 40% of them.
const WEIGHTS: Record<typeof LARGE_SHAPES[number], number> = {
  'burst-out-err': 1, 'burst-err-out': 1, 'burst-mixed': 1, 'late-mid': 1, 'late-end': 0.5, 'paused-ws': 1, 'paused-ndjson': 0.5, 'stdin-count': 0.5, 'stdin-digest': 0.5, 'stdin-echo': 0.5
}

export interface Plan {
  key: string
  agent: number
  seq: number
  sandbox: string
  shape: Shape
  mode: Mode
  script: string
  interactive: boolean
  stdout: Expected
  stderr: Expected
  exitCode: number
  sleepMs: number
  plannedMs: number
  boundMs: number
  // Before attaching: 'end' waits (polling GET) until the exec has ended; a number waits until
  // that many stdout bytes have arrived. Then the reader asks for these offsets.
  attachAfter?: 'end' | number
  offsets: { stdout: number, stderr: number }
  // The reader stops reading after this many bytes, for ms.
  pause?: { afterBytes: number, ms: number }
  // Sent over the WebSocket (binary frames, or JSON text frames for ASCII), then eof.
  stdin?: { data: Expected, frames: 'binary' | 'text', minChunk: number, maxChunk: number }
}

const KIB = 1024
const MIB = 1024 * KIB
const MULTIBYTE = ['é', 'ß', 'Ω', '→', '日', '本', '🙂']
// Text for inside single quotes: anything but ' and NUL; some newlines and multibyte characters.
function literal (r: Rand, bytes: number): string {
  const parts: string[] = []
  let n = 0
  while (n < bytes) {
    const x = r()
    let c: string
    if (x < 0.04) c = pick(r, MULTIBYTE)
    else if (x < 0.07) c = '\n'
    else {
      const code = 0x20 + Math.floor(r() * 95)
      c = code === 0x27 ? '"' : String.fromCharCode(code)
    }
    parts.push(c)
    n += Buffer.byteLength(c)
  }
  return parts.join('')
}
const TOKEN_CHARS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'
function token (r: Rand, len: number): string {
  let s = ''
  for (let i = 0; i < len; i++) s += TOKEN_CHARS[Math.floor(r() * TOKEN_CHARS.length)]
  return s
}

// Script lines and the expected output they produce, one stream each.
class Script {
  readonly lines: string[]
  readonly out = new Expected()
  readonly err = new Expected()
  sleepS = 0
  constructor (key: string, shape: Shape) { this.lines = [`: soak ${key}${shape === 'classic' ? '' : ` ${shape}`}`] }
  sleep (s: number): void { this.lines.push(`sleep ${s.toFixed(1)}`); this.sleepS += s }
  // printf of a literal (litBytes of seeded text).
  print (r: Rand, stream: 1 | 2, litBytes: number): void {
    const lit = literal(r, litBytes)
    this.lines.push(`printf '%s' '${lit}'${stream === 2 ? ' >&2' : ''}`)
    ;(stream === 1 ? this.out : this.err).lit(lit)
  }

  // yes | head -c: n bytes at once, as fast as a pipe goes.
  burst (r: Rand, stream: 1 | 2, n: number): void {
    const tok = token(r, 1 + Math.floor(r() * 60))
    this.lines.push(`yes '${tok}' | head -c ${n}${stream === 2 ? ' >&2' : ''}`)
    ;(stream === 1 ? this.out : this.err).rep(`${tok}\n`, n)
  }

  line (l: string): void { this.lines.push(l) }
}

const BIG_BURST_P = 0.08
// One burst of classic output: a literal, sometimes 100 KB+.
function classicBurst (r: Rand, s: Script, stream: 1 | 2, allowBig: boolean): void {
  const x = r()
  s.print(r, stream, x < 0.7 ? 1 + Math.floor(r() * 200) : x < 0.95 ? 200 + Math.floor(r() * 3800) : 4000 + Math.floor(r() * 6000))
  if (allowBig && r() < BIG_BURST_P) {
    s.burst(r, stream, 100_000 + Math.floor(r() * 300_000))
    if (r() < 0.5) s.print(r, stream, 1 + Math.floor(r() * 100))
  }
}

function sleepS (r: Rand): number {
  const v = r() < 0.6 ? 0.5 + r() * 2.5 : 3 + r() * 5
  return Math.round(v * 10) / 10
}
const shortSleep = (r: Rand, lo: number, hi: number): number => Math.round((lo + r() * (hi - lo)) * 10) / 10

function drawShape (r: Rand, agent: number, seq: number): Shape {
  if (SHAPES_PCT === 0) return 'classic'
  // Each large shape once, early, whatever the draws.
  if (seq === 0 && agent < LARGE_SHAPES.length) return LARGE_SHAPES[agent]!
  if (r() * 100 >= SHAPES_PCT) return 'classic'
  const total = LARGE_SHAPES.reduce((a, k) => a + WEIGHTS[k], 0)
  let x = r() * total
  for (const k of LARGE_SHAPES) { x -= WEIGHTS[k]; if (x < 0) return k }
  return LARGE_SHAPES[LARGE_SHAPES.length - 1]!
}

export function makePlan (agent: number, seq: number, sandbox: string): Plan {
  const r = rng(`${SEED}/exec/${agent}/${seq}`)
  const key = `a${agent}.${seq}`
  const shape = drawShape(r, agent, seq)
  const s = new Script(key, shape)
  const p: Omit<Plan, 'script' | 'stdout' | 'stderr' | 'exitCode' | 'sleepMs' | 'plannedMs' | 'boundMs'> = {
    key, agent, seq, sandbox, shape, mode: pick(r, ['ws', 'ndjson', 'sse'] as const), interactive: false, offsets: { stdout: 0, stderr: 0 }
  }
  let extraMs = 0
  switch (shape) {
    case 'classic': {
      s.sleep(sleepS(r))
      classicBurst(r, s, 1, true)
      s.sleep(sleepS(r))
      classicBurst(r, s, 2, true)
      if (r() < 0.3) classicBurst(r, s, 1, false)
      const m = r()
      p.mode = m < 0.7 ? 'wait' : m < 0.8 ? 'ws' : m < 0.9 ? 'ndjson' : 'sse'
      break
    }
    case 'burst-out-err':
    case 'burst-err-out': {
      // Megabytes on one stream, then a write to the other: the shape that once hung the
      // embedded daemon. Nobody is attached; the reader replays it after the end.
      const [a, b] = shape === 'burst-out-err' ? [1, 2] as const : [2, 1] as const
      s.sleep(shortSleep(r, 0.2, 1.5))
      if (r() < 0.5) s.print(r, a, between(r, 1, 200))
      s.burst(r, a, between(r, 3 * MIB, 7.5 * MIB))
      s.print(r, b, between(r, 1, 2000))
      if (r() < 0.4) s.burst(r, b, between(r, 64 * KIB, MIB))
      if (r() < 0.5) s.print(r, a, between(r, 1, 200))
      p.attachAfter = 'end'
      break
    }
    case 'burst-mixed': {
      // Bursts of 0.25–2 MiB alternating between the streams, each stream under 7.5 MiB.
      s.sleep(shortSleep(r, 0.2, 1.5))
      let stream: 1 | 2 = r() < 0.5 ? 1 : 2
      for (let i = between(r, 3, 6); i > 0; i--) {
        const held = (stream === 1 ? s.out : s.err).bytes
        s.burst(r, stream, Math.min(between(r, 256 * KIB, 2 * MIB), 7.5 * MIB - held))
        if (r() < 0.3) s.print(r, stream, between(r, 1, 300))
        stream = stream === 1 ? 2 : 1
      }
      p.attachAfter = 'end'
      break
    }
    case 'late-mid': {
      // Output, a pause, more output; the reader attaches once the first part is there (from 0,
      // or resuming from an offset inside it), so it gets a replay then live output, no gap.
      s.sleep(shortSleep(r, 0.2, 1))
      const first = between(r, 64 * KIB, 2 * MIB)
      s.burst(r, 1, first)
      s.print(r, 1, between(r, 1, 500))
      s.print(r, 2, between(r, 1, 500))
      s.sleep(shortSleep(r, 1.5, 3))
      s.print(r, 1, between(r, 1, 500))
      if (r() < 0.6) s.burst(r, 1, between(r, 64 * KIB, MIB))
      if (r() < 0.6) s.burst(r, 2, between(r, 64 * KIB, MIB))
      s.print(r, 2, between(r, 1, 500))
      p.attachAfter = first
      if (r() < 0.5) p.offsets.stdout = between(r, 0, first)
      break
    }
    case 'late-end': {
      // More stdout than the gateway retains; the reader attaches after the end and must get
      // one gap up to what is held (or no gap, resuming inside it), then those bytes exactly.
      s.sleep(shortSleep(r, 0.2, 1))
      const n = KNOBS.retentionBytes + between(r, 256 * KIB, 2 * MIB)
      s.burst(r, 1, n)
      s.print(r, 2, between(r, 1, 2000))
      p.attachAfter = 'end'
      const o = r()
      if (o >= 0.6) p.offsets.stdout = o < 0.8 ? between(r, 1, n - KNOBS.retentionBytes - 1) : between(r, n - KNOBS.retentionBytes, n)
      break
    }
    case 'paused-ws':
    case 'paused-ndjson': {
      // A reader attached from the start stops reading for 2–5 s in the middle of a burst:
      // the exec's flow stops, and resumes exactly.
      p.mode = shape === 'paused-ws' ? 'ws' : 'ndjson'
      s.sleep(shortSleep(r, 0.2, 1))
      const n = between(r, 2 * MIB, 6 * MIB)
      s.burst(r, 1, n)
      s.print(r, 2, between(r, 1, 2000))
      if (r() < 0.5) s.burst(r, 2, between(r, 256 * KIB, 2 * MIB))
      s.print(r, 1, between(r, 1, 500))
      p.pause = { afterBytes: between(r, 64 * KIB, MIB), ms: between(r, 2000, 5000) }
      extraMs = p.pause.ms
      break
    }
    case 'stdin-count':
    case 'stdin-digest':
    case 'stdin-echo': {
      // An interactive exec fed megabytes of stdin over its WebSocket, then eof; what it prints
      // (a byte count, a digest, or the bytes themselves) must match what was sent.
      p.mode = 'ws'
      p.interactive = true
      if (r() < 0.5) s.sleep(shortSleep(r, 0.2, 2))
      const data = new Expected()
      const unit = `${token(r, between(r, 1, 200))}\n`
      if (shape === 'stdin-digest') {
        const n = between(r, MIB, 3 * MIB)
        const bytes = seededBytes(`${SEED}/stdin/${agent}/${seq}`, n)
        data.lit(bytes)
        s.line('sha256sum')
        s.out.lit(`${createHash('sha256').update(bytes).digest('hex')}  -\n`)
      } else if (shape === 'stdin-count') {
        const n = between(r, MIB, 4 * MIB)
        data.rep(unit, n)
        s.line("wc -c | tr -d ' '")
        s.out.lit(`${n}\n`)
      } else {
        const n = between(r, MIB, 3 * MIB)
        data.rep(unit, n)
        s.line('cat')
        s.out.rep(unit, n)
      }
      s.print(r, 2, between(r, 1, 500))
      p.stdin = { data, frames: shape === 'stdin-echo' ? 'text' : 'binary', minChunk: 4 * KIB, maxChunk: 256 * KIB }
      extraMs = Math.ceil(data.bytes / 500)
      break
    }
  }
  const exitCode = Math.floor(r() * 256)
  s.line(`exit ${exitCode}`)
  const sleepMs = Math.round(s.sleepS * 1000)
  // Output at ≥ 0.5 MB/s even on a loaded machine, plus process start-up.
  const plannedMs = sleepMs + 300 + Math.ceil((s.out.bytes + s.err.bytes) / 500) + extraMs
  return {
    ...p,
    script: s.lines.join('\n'),
    stdout: s.out,
    stderr: s.err,
    exitCode,
    sleepMs,
    plannedMs,
    boundMs: plannedMs + DETECTION_BOUND_MS + KNOBS.closeWaitMs + SLACK_MS
  }
}

// Bytes a plan moves (output, and stdin sent): large ones are deleted once checked.
export const planBytes = (p: Plan): number => p.stdout.bytes + p.stderr.bytes + (p.stdin?.data.bytes ?? 0)
