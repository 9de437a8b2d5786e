import { Type, type Static } from '@sinclair/typebox'
import { ExecErrorSchema } from './problem.js'

const MAX_ARGS = 1024
export const MAX_ARG_BYTES = 32768
export const MAX_ENV_VALUE_BYTES = 32768
export const MAX_WORKDIR_BYTES = 4096
export const MAX_STDIN_BYTES = 1024 * 1024
const MAX_TIMEOUT_SECONDS = 604800
// cols and rows of a pseudo-terminal, at creation and in resize frames.
export const MAX_TERMINAL_SIZE = 10000
export const DEFAULT_COLS = 80
export const DEFAULT_ROWS = 24
// Byte offsets are exact counts: JSON Schema's "integer" admits 1e23 (coerced from the query
// string), which no stream reaches and an SSE id would carry back as "1e+23-0".
const MAX_OFFSET = Number.MAX_SAFE_INTEGER
// Exec read tokens (POST /v1/execs/{execId}/read-token): short-lived, since a URL ends up in
// browser history and Referer headers.
export const READ_TOKEN_DEFAULT_TTL_S = 300
const READ_TOKEN_MAX_TTL_S = 3600

// The signals a client may send, named as SSH names them (no SIG prefix).
export const SIGNALS = ['TERM', 'KILL', 'INT', 'HUP', 'QUIT', 'USR1', 'USR2'] as const
export const SignalNameSchema = Type.Union(SIGNALS.map((s) => Type.Literal(s)))
export type SignalName = Static<typeof SignalNameSchema>

const TerminalSize = (defaultSize: number): ReturnType<typeof Type.Integer> => Type.Integer({ minimum: 1, maximum: MAX_TERMINAL_SIZE, default: defaultSize })

// Shapes only; byte lengths, NUL/CR/LF rules and cross-field rules are checked in
// src/execs/validate.ts, which names the field in its error.
export const ExecRequestSchema = Type.Object({
  command: Type.Array(Type.String({ maxLength: MAX_ARG_BYTES }), { minItems: 1, maxItems: MAX_ARGS, description: 'argv; each element is shell-quoted, so the sandbox receives exactly these strings' }),
  env: Type.Optional(Type.Record(Type.String(), Type.String({ maxLength: MAX_ENV_VALUE_BYTES }), { description: 'keys ^[A-Za-z_][A-Za-z0-9_]*$; values without NUL, CR or LF' })),
  workdir: Type.Optional(Type.String({ maxLength: MAX_WORKDIR_BYTES })),
  stdin: Type.Optional(Type.String({ description: 'UTF-8 text sent to the command, then EOF (at most 1 MiB)' })),
  stdinBase64: Type.Optional(Type.String({ description: 'bytes sent to the command, then EOF (at most 1 MiB decoded)' })),
  interactive: Type.Optional(Type.Boolean({ default: false, description: 'keep stdin open for WebSocket stdin frames' })),
  tty: Type.Optional(Type.Boolean({ default: false })),
  cols: Type.Optional(TerminalSize(DEFAULT_COLS)),
  rows: Type.Optional(TerminalSize(DEFAULT_ROWS)),
  timeoutSeconds: Type.Optional(Type.Integer({ minimum: 0, maximum: MAX_TIMEOUT_SECONDS, default: 0, description: '0 = none; on expiry the process is killed and the exec ends with exitCode 124, timedOut true' }))
}, { $id: 'ExecRequest', additionalProperties: false })
export type ExecRequest = Static<typeof ExecRequestSchema>

const Nullable = <T extends ReturnType<typeof Type.String> | ReturnType<typeof Type.Integer>>(t: T) => Type.Union([t, Type.Null()])

const ExecStatusSchema = Type.Union([Type.Literal('pending'), Type.Literal('running'), Type.Literal('exited'), Type.Literal('failed')])

const execProperties = {
  id: Type.String(),
  sandboxId: Type.String(),
  command: Type.Array(Type.String()),
  tty: Type.Boolean(),
  interactive: Type.Boolean(),
  status: ExecStatusSchema,
  exitCode: Nullable(Type.Integer({ description: 'the SSH exit-status; set when status is exited and no signal ended the process' })),
  signal: Nullable(Type.String({ description: 'the SSH exit-signal without SIG, e.g. KILL' })),
  timedOut: Type.Boolean(),
  error: Type.Union([Type.Ref(ExecErrorSchema), Type.Null()], { description: 'why no exit status will ever come (status failed)' }),
  createdAt: Type.String({ format: 'date-time' }),
  startedAt: Nullable(Type.String({ format: 'date-time' })),
  endedAt: Nullable(Type.String({ format: 'date-time' })),
  stdoutBytes: Type.Integer({ minimum: 0 }),
  stderrBytes: Type.Integer({ minimum: 0 }),
  stdinBytes: Type.Integer({
    minimum: 0,
    description: 'the stdin offset: bytes taken for the command, in order (the request\'s stdin, then stdin frames); the gateway delivers them through a lost relay. After a gateway restart it is what the sandbox had received: a client whose connection was cut resends its stdin from this offset'
  })
}

export const ExecSchema = Type.Object(execProperties, { $id: 'Exec' })
export type Exec = Static<typeof ExecSchema>

export const ExecResultSchema = Type.Object({
  ...execProperties,
  stdout: Type.String({ description: 'the retained tail of stdout, UTF-8 (or base64 with ?encoding=base64)' }),
  stderr: Type.String(),
  stdoutTruncated: Type.Boolean({ description: 'the beginning of stdout was dropped (over --retention-bytes)' }),
  stderrTruncated: Type.Boolean()
}, { $id: 'ExecResult' })
export type ExecResult = Static<typeof ExecResultSchema>

export const ExecListSchema = Type.Object({ execs: Type.Array(Type.Ref(ExecSchema)) })

export const ExecParamsSchema = Type.Object({ execId: Type.String({ minLength: 1, maxLength: 128 }) })

const EncodingSchema = Type.Union([Type.Literal('utf8'), Type.Literal('base64')], { default: 'utf8' })

export const CreateExecQuerySchema = Type.Object({
  wait: Type.Optional(Type.Boolean({ default: false, deprecated: true, description: 'deprecated, still honoured: wait for the end and answer as runExec (POST .../execs/run) does' })),
  encoding: Type.Optional(EncodingSchema)
}, { additionalProperties: false })

export const RunExecQuerySchema = Type.Object({
  encoding: Type.Optional(EncodingSchema)
}, { additionalProperties: false })

export const ListExecsQuerySchema = Type.Object({
  sandboxId: Type.Optional(Type.String()),
  status: Type.Optional(ExecStatusSchema)
}, { additionalProperties: false })

export const AttachQuerySchema = Type.Object({
  stdoutOffset: Type.Optional(Type.Integer({ minimum: 0, maximum: MAX_OFFSET, default: 0 })),
  stderrOffset: Type.Optional(Type.Integer({ minimum: 0, maximum: MAX_OFFSET, default: 0 })),
  encoding: Type.Optional(EncodingSchema),
  access_token: Type.Optional(Type.String({ description: 'a read token from POST /v1/execs/{execId}/read-token, for clients that cannot send Authorization (a browser\'s EventSource): this exec only, until it expires, read-only; never logged' }))
}, { additionalProperties: false })

export const ReadTokenQuerySchema = Type.Object({
  ttlSeconds: Type.Optional(Type.Integer({ minimum: 1, maximum: READ_TOKEN_MAX_TTL_S, default: READ_TOKEN_DEFAULT_TTL_S, description: `how long the token opens a stream, in seconds (at most ${READ_TOKEN_MAX_TTL_S})` }))
}, { additionalProperties: false })

export const ReadTokenSchema = Type.Object({
  token: Type.String({ description: 'pass as ?access_token= on GET /v1/execs/{execId}/events and /stream' }),
  execId: Type.String(),
  expiresAt: Type.String({ format: 'date-time', description: 'streams may begin (or resume) until then; one already open is not cut at expiry' }),
  eventsUrl: Type.String({ description: 'the events path with the token, relative to the gateway' }),
  streamUrl: Type.String({ description: 'the WebSocket path with the token, relative to the gateway' })
}, { $id: 'ReadToken' })

export const SignalRequestSchema = Type.Object({
  signal: SignalNameSchema
}, { $id: 'SignalRequest', additionalProperties: false })
