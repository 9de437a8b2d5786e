import { Type, type Static } from '@sinclair/typebox'
import { TypeCompiler } from '@sinclair/typebox/compiler'

// The keeper protocol: how the gateway talks, over ordinary SSH session channels, to an embedded
// daemon that keeps its execs (docs/keeper-protocol.md). It is the one wire rule both sides
// share, so it lives here once: the daemon (src/sandbox-sshd/keeper/) serves it, the gateway
// (src/relay/keeper-client.ts) speaks it. OpenSSH never sees any of it: the gateway uses it only
// with a supervisor whose hello says `keepsExecs`.
//
// 1. Starting a kept exec is the usual `exec` request, preceded on the same channel by an `env`
//    request KEEP_ENV = base64url(JSON KeepMeta). The daemon keeps the exec under meta.execId
//    (the child does not see the variable). An exec id it already keeps is refused (channel
//    request failure), so a retried open can never start a command twice.
// 2. Control requests are `exec` requests whose command starts with CONTROL_PREFIX (a shell
//    comment, so no real command line can be mistaken for one):
//      `#exec-gateway list`                      → stdout: KeptList JSON, exit 0
//      `#exec-gateway status <execId> [detach]`  → stdout: KeptStatus JSON, exit 0; exit 3 unknown.
//                                                  `detach` first cuts the attached channel off
//                                                  (it gets no more output and its stdin is
//                                                  ignored), so stdinReceived is final until the
//                                                  next attach.
//      `#exec-gateway attach <execId> <stdoutOffset> <stderrOffset>`
//                                                → this channel becomes the exec's (a newer
//                                                  attach supersedes the older, which is closed
//                                                  without an exit report): output from the
//                                                  offsets (clamped up to what is kept) in the
//                                                  order it was produced, then live; channel data
//                                                  and EOF are the command's stdin, `signal` and
//                                                  `window-change` requests apply; the exit report
//                                                  comes as usual once every byte has been sent.
//                                                  An unknown exec id: the request is refused.
//      `#exec-gateway signal <execId> <SIGNAL>`  → signals the exec's process group; exit 0 when
//                                                  it was running, 3 when unknown or finished.
//      `#exec-gateway forget <execId>`           → KILLs the group if running and drops the exec
//                                                  and its spools; exit 0, 3 when unknown.
// 3. A kept exec killed by the daemon's own timeoutSeconds reports `exit-signal KILL` whose error
//    message is TIMEOUT_EXIT_MESSAGE, and its KeptStatus says timedOut.

export const KEEP_ENV = 'EXEC_GATEWAY_KEEP'
const CONTROL_PREFIX = '#exec-gateway '
export const TIMEOUT_EXIT_MESSAGE = 'timeout@exec-gateway'
// Exit status of a control request about an exec the daemon does not keep (or, for `signal`,
// no longer runs).
export const CONTROL_UNKNOWN_EXIT = 3
export const KEEPER_PROTOCOL_VERSION = 1

const ExecId = Type.String({ minLength: 1, maxLength: 128, pattern: '^[A-Za-z0-9._-]+$' })
const Offset = Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER })
const IsoTime = Type.String({ minLength: 1, maxLength: 64 })

// What the gateway tells the daemon about an exec so that a restarted gateway can rebuild its
// record from the daemon alone. No env, no stdin: nothing secret is kept beyond the process.
const KeepMetaSchema = Type.Object({
  v: Type.Literal(KEEPER_PROTOCOL_VERSION),
  execId: ExecId,
  command: Type.Array(Type.String(), { minItems: 1, maxItems: 1024 }),
  tty: Type.Boolean(),
  interactive: Type.Boolean(),
  cols: Type.Integer({ minimum: 1, maximum: 10000 }),
  rows: Type.Integer({ minimum: 1, maximum: 10000 }),
  // 0 = none. The daemon kills the group when it expires, gateway or not.
  timeoutSeconds: Type.Integer({ minimum: 0, maximum: 604800 }),
  createdAt: IsoTime
})
export type KeepMeta = Static<typeof KeepMetaSchema>

const StreamState = Type.Object({
  // First offset still kept; output below it is gone (a reader from there gets a gap).
  base: Offset,
  // Bytes the command has produced on this stream so far (the next byte's offset).
  end: Offset
})

const ExitSchema = Type.Union([
  Type.Object({ code: Type.Integer({ minimum: 0, maximum: 4294967295 }) }),
  Type.Object({ signal: Type.String({ minLength: 1, maxLength: 64 }) })
])

const KeptStatusSchema = Type.Object({
  meta: KeepMetaSchema,
  state: Type.Union([Type.Literal('running'), Type.Literal('exited')]),
  startedAt: IsoTime,
  endedAt: Type.Optional(IsoTime),
  // Set once state is 'exited'.
  exit: Type.Optional(ExitSchema),
  timedOut: Type.Boolean(),
  stdout: StreamState,
  stderr: StreamState,
  // Stdin bytes the command's side has taken from all channels so far, and whether EOF came.
  stdinReceived: Offset,
  stdinEof: Type.Boolean(),
  attached: Type.Boolean()
})
export type KeptStatus = Static<typeof KeptStatusSchema>

const KeptListSchema = Type.Object({
  v: Type.Literal(KEEPER_PROTOCOL_VERSION),
  execs: Type.Array(KeptStatusSchema)
})
export type KeptList = Static<typeof KeptListSchema>

const metaCheck = TypeCompiler.Compile(KeepMetaSchema)
const statusCheck = TypeCompiler.Compile(KeptStatusSchema)
const listCheck = TypeCompiler.Compile(KeptListSchema)

export function encodeKeepMeta (meta: KeepMeta): string {
  return Buffer.from(JSON.stringify(meta)).toString('base64url')
}

// Undefined for anything that is not a valid meta: the daemon then refuses the exec.
export function decodeKeepMeta (value: string): KeepMeta | undefined {
  const parsed = parseJson(Buffer.from(value, 'base64url').toString('utf8'))
  return metaCheck.Check(parsed) ? parsed : undefined
}

export function decodeKeptStatus (text: string): KeptStatus | undefined {
  const parsed = parseJson(text)
  return statusCheck.Check(parsed) ? parsed : undefined
}

export function decodeKeptList (text: string): KeptList | undefined {
  const parsed = parseJson(text)
  return listCheck.Check(parsed) ? parsed : undefined
}

export type ControlRequest =
  | { op: 'list' }
  | { op: 'status', execId: string, detach: boolean }
  | { op: 'attach', execId: string, stdoutOffset: number, stderrOffset: number }
  | { op: 'signal', execId: string, signal: string }
  | { op: 'forget', execId: string }

export function controlLine (req: ControlRequest): string {
  switch (req.op) {
    case 'list': return `${CONTROL_PREFIX}list`
    case 'status': return `${CONTROL_PREFIX}status ${req.execId}${req.detach ? ' detach' : ''}`
    case 'attach': return `${CONTROL_PREFIX}attach ${req.execId} ${req.stdoutOffset} ${req.stderrOffset}`
    case 'signal': return `${CONTROL_PREFIX}signal ${req.execId} ${req.signal}`
    case 'forget': return `${CONTROL_PREFIX}forget ${req.execId}`
  }
}

const ID = /^[A-Za-z0-9._-]{1,128}$/
const SIGNAL = /^[A-Z0-9]{1,16}$/

// Undefined when the line is not a control request at all, 'invalid' when it is one but malformed.
export function parseControlLine (line: string): ControlRequest | 'invalid' | undefined {
  if (!line.startsWith(CONTROL_PREFIX)) return undefined
  const words = line.slice(CONTROL_PREFIX.length).split(' ')
  const [op, id, a, b] = words
  const idOk = id !== undefined && ID.test(id)
  const offset = (s: string | undefined): number | undefined => s !== undefined && /^\d{1,16}$/.test(s) && Number.isSafeInteger(Number(s)) ? Number(s) : undefined
  switch (op) {
    case 'list':
      return words.length === 1 ? { op } : 'invalid'
    case 'status':
      if (!idOk || words.length > 3 || (a !== undefined && a !== 'detach')) return 'invalid'
      return { op, execId: id, detach: a === 'detach' }
    case 'attach': {
      const so = offset(a)
      const eo = offset(b)
      if (!idOk || words.length !== 4 || so === undefined || eo === undefined) return 'invalid'
      return { op, execId: id, stdoutOffset: so, stderrOffset: eo }
    }
    case 'signal':
      if (!idOk || words.length !== 3 || a === undefined || !SIGNAL.test(a)) return 'invalid'
      return { op, execId: id, signal: a }
    case 'forget':
      return idOk && words.length === 2 ? { op, execId: id } : 'invalid'
    default:
      return 'invalid'
  }
}

function parseJson (text: string): unknown {
  try {
    return JSON.parse(text)
  } catch {
    return undefined
  }
}
