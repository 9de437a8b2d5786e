import { Type, type Static, type TSchema } from '@sinclair/typebox'
import { TypeCompiler, type TypeCheck } from '@sinclair/typebox/compiler'
import { MAX_TERMINAL_SIZE, SIGNALS, SignalNameSchema } from './exec.js'
import { BINARY_SUBPROTOCOL, CLOSE_POLICY, STDERR_CHANNEL, STDIN_CHANNEL, STDOUT_CHANNEL } from './websocket.js'

// Client → server WebSocket frames on GET /v1/execs/{execId}/stream: the schemas the OpenAPI
// document and the SDK's types publish are the ones decodeClientFrame checks with. Fields a frame
// does not use are ignored, so none of them forbids additional properties.

const StdinFrameSchema = Type.Object({
  type: Type.Literal('stdin'),
  data: Type.String({ description: 'UTF-8 text written to the command\'s stdin' })
}, { description: 'Only for execs created with interactive: true' })

const EofFrameSchema = Type.Object({
  type: Type.Literal('eof')
}, { description: 'Closes the command\'s stdin; the exec still reports its exit status' })

const ResizeFrameSchema = Type.Object({
  type: Type.Literal('resize'),
  cols: Type.Integer({ minimum: 1, maximum: MAX_TERMINAL_SIZE }),
  rows: Type.Integer({ minimum: 1, maximum: MAX_TERMINAL_SIZE })
}, { description: 'Resizes the pseudo-terminal of a tty exec' })

const SignalFrameSchema = Type.Object({
  type: Type.Literal('signal'),
  signal: SignalNameSchema
}, { description: 'Signals every process of the exec; ignored once the exec has ended' })

// By name, as the OpenAPI document publishes them.
export const ClientFrameMembers = {
  StdinFrame: StdinFrameSchema,
  EofFrame: EofFrameSchema,
  ResizeFrame: ResizeFrameSchema,
  SignalFrame: SignalFrameSchema
}

// The OpenAPI document publishes their union as ClientFrame (src/http/openapi.ts).
type ClientFrame =
  | Static<typeof StdinFrameSchema> | Static<typeof EofFrameSchema>
  | Static<typeof ResizeFrameSchema> | Static<typeof SignalFrameSchema>

// Binary frames carry raw bytes, so JSON Schema can only name their media type; the layout is
// in the description (and in docs/api.md §4).
export const BinaryOutputFrameSchema = Type.Unsafe<Uint8Array>({
  type: 'string',
  contentMediaType: 'application/octet-stream',
  description: `Server → client binary frame, only with the ${BINARY_SUBPROTOCOL} subprotocol: one channel byte (${STDOUT_CHANNEL} = stdout, ${STDERR_CHANNEL} = stderr), then the raw output bytes, which continue each stream from the requested offset (or from a gap's \`to\`). Every other event stays a JSON text frame.`
})

export const BinaryStdinFrameSchema = Type.Unsafe<Uint8Array>({
  type: 'string',
  contentMediaType: 'application/octet-stream',
  description: `Client → server binary frame (interactive execs): channel byte ${STDIN_CHANNEL}, then the bytes written to stdin. Any other channel byte closes the socket with ${CLOSE_POLICY}.`
})

// One compiled checker per frame type, chosen by `type` first, each with the reason a client
// reads in the 1008 close when its frame breaks that schema.
const byType = new Map<string, { check: TypeCheck<TSchema>, refusal: string }>([
  ['stdin', { check: TypeCompiler.Compile(StdinFrameSchema), refusal: 'stdin frames need a string "data"' }],
  ['eof', { check: TypeCompiler.Compile(EofFrameSchema), refusal: 'invalid eof frame' }],
  ['resize', { check: TypeCompiler.Compile(ResizeFrameSchema), refusal: `resize needs integer cols and rows in 1..${MAX_TERMINAL_SIZE}` }],
  ['signal', { check: TypeCompiler.Compile(SignalFrameSchema), refusal: `signal must be one of ${SIGNALS.join(', ')}` }]
])

type DecodedFrame = { ok: true, frame: ClientFrame } | { ok: false, why: string }

// A text frame's payload → a frame that matches its schema, or the reason it is refused.
// Never throws.
export function decodeClientFrame (text: string): DecodedFrame {
  let raw: unknown
  try { raw = JSON.parse(text) } catch { raw = undefined }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) return { ok: false, why: 'frames must be JSON objects with a "type"' }
  const type = (raw as { type?: unknown }).type
  // A Map: a "type" of "constructor" or "__proto__" finds nothing.
  const entry = typeof type === 'string' ? byType.get(type) : undefined
  if (entry === undefined) return { ok: false, why: 'unknown frame type; use stdin, eof, resize or signal' }
  return entry.check.Check(raw) ? { ok: true, frame: raw as ClientFrame } : { ok: false, why: entry.refusal }
}
