import { Type, type Static } from '@sinclair/typebox'
import { SIGNALS } from '../execs/command.js'

// Client → server WebSocket frames on GET /v1/execs/{execId}/stream. routes/exec-stream.ts
// checks them by hand (each refusal closes the socket with 1008 and its own reason); these
// schemas publish the same rules in the OpenAPI document and the SDK's types. Fields a frame
// does not use are ignored, so none of them forbids additional properties.

export const StdinFrameSchema = Type.Object({
  type: Type.Literal('stdin'),
  data: Type.String({ description: 'UTF-8 text written to the command\'s stdin' })
}, { description: 'Only for execs created with interactive: true' })

export const EofFrameSchema = Type.Object({
  type: Type.Literal('eof')
}, { description: 'Closes the command\'s stdin; the exec still reports its exit status' })

export const ResizeFrameSchema = Type.Object({
  type: Type.Literal('resize'),
  cols: Type.Integer({ minimum: 1, maximum: 10000 }),
  rows: Type.Integer({ minimum: 1, maximum: 10000 })
}, { description: 'Resizes the pseudo-terminal of a tty exec' })

export const SignalFrameSchema = Type.Object({
  type: Type.Literal('signal'),
  signal: Type.Union(SIGNALS.map((s) => Type.Literal(s)))
}, { description: 'Signals every process of the exec; ignored once the exec has ended' })

// By name, as the OpenAPI document publishes them.
export const ClientFrameMembers = {
  StdinFrame: StdinFrameSchema,
  EofFrame: EofFrameSchema,
  ResizeFrame: ResizeFrameSchema,
  SignalFrame: SignalFrameSchema
}

export const ClientFrameSchema = Type.Union([StdinFrameSchema, EofFrameSchema, ResizeFrameSchema, SignalFrameSchema], {
  description: 'A JSON text frame from the client. Anything else closes the socket with 1008 and a reason.'
})
export type ClientFrame = Static<typeof ClientFrameSchema>

// Binary frames carry raw bytes, so JSON Schema can only name their media type; the layout is
// in the description (and in CONTRACT §4).
export const BinaryOutputFrameSchema = Type.Unsafe<Uint8Array>({
  type: 'string',
  contentMediaType: 'application/octet-stream',
  description: 'Server → client binary frame, only with the exec-gateway.v1.binary subprotocol: one channel byte (1 = stdout, 2 = stderr), then the raw output bytes, which continue each stream from the requested offset (or from a gap\'s `to`). Every other event stays a JSON text frame.'
})

export const BinaryStdinFrameSchema = Type.Unsafe<Uint8Array>({
  type: 'string',
  contentMediaType: 'application/octet-stream',
  description: 'Client → server binary frame (interactive execs): channel byte 0, then the bytes written to stdin. Any other channel byte closes the socket with 1008.'
})
