import { Type, type Static } from '@sinclair/typebox'
import { ErrorCodeSchema, ErrorTextSchema } from './problem.js'

// Server → client events, the same on the WebSocket, in SSE and in NDJSON.
const OutputEventSchema = (stream: 'stdout' | 'stderr') => Type.Object({
  type: Type.Literal(stream),
  offset: Type.Integer({ minimum: 0, description: 'byte offset of this chunk in its stream' }),
  data: Type.String({ description: 'UTF-8 text never splitting a character, or base64 with encoding=base64' })
})
const GapEventSchema = Type.Object({
  type: Type.Literal('gap'),
  stream: Type.Union([Type.Literal('stdout'), Type.Literal('stderr')]),
  from: Type.Integer({ minimum: 0 }),
  to: Type.Integer({ minimum: 0 })
})
const HeartbeatEventSchema = Type.Object({ type: Type.Literal('heartbeat'), time: Type.String({ format: 'date-time' }) })
// Not final: the relay to the sandbox of a kept exec was lost, or is back (docs/api.md §5 rule 4).
// The exec keeps running meanwhile; output resumes where it stopped, with no gap.
const RelayEventSchema = Type.Object({
  type: Type.Literal('relay'),
  state: Type.Union([Type.Literal('lost'), Type.Literal('restored')])
})
const ExitEventSchema = Type.Object({
  type: Type.Literal('exit'),
  exitCode: Type.Union([Type.Integer(), Type.Null()]),
  signal: Type.Union([Type.String(), Type.Null()]),
  timedOut: Type.Boolean()
})
const ErrorEventSchema = Type.Object({
  type: Type.Literal('error'),
  code: Type.Ref(ErrorCodeSchema),
  status: Type.Integer(),
  // The exec record's `error.detail`, under the name a problem body gives it too, so one
  // reader handles both; `message` carries the same text under its first name, for clients
  // written before `detail` was added.
  detail: ErrorTextSchema,
  message: ErrorTextSchema
})

// By name: the OpenAPI document publishes each member as a component of its own.
export const ExecEventMembers = {
  StdoutEvent: OutputEventSchema('stdout'),
  StderrEvent: OutputEventSchema('stderr'),
  GapEvent: GapEventSchema,
  HeartbeatEvent: HeartbeatEventSchema,
  RelayEvent: RelayEventSchema,
  ExitEvent: ExitEventSchema,
  ErrorEvent: ErrorEventSchema
}

export const ExecEventSchema = Type.Union([
  ExecEventMembers.StdoutEvent, ExecEventMembers.StderrEvent, ExecEventMembers.GapEvent,
  ExecEventMembers.HeartbeatEvent, ExecEventMembers.RelayEvent, ExecEventMembers.ExitEvent, ExecEventMembers.ErrorEvent
], { $id: 'ExecEvent' })
export type ExecEvent = Static<typeof ExecEventSchema>
export type FinalEvent = Static<typeof ExitEventSchema> | Static<typeof ErrorEventSchema>
