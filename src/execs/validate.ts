import { GatewayError } from '../errors.js'
import {
  DEFAULT_COLS, DEFAULT_ROWS, MAX_ARG_BYTES, MAX_ENV_VALUE_BYTES, MAX_STDIN_BYTES, MAX_WORKDIR_BYTES, type ExecRequest
} from '../schemas/exec.js'
import { MAX_COMMAND_LINE_BYTES, assembleCommand } from './command.js'

// The rules JSON Schema cannot say (byte lengths, forbidden bytes, cross-field rules), each
// failing with invalid_argument and the field's name.

export interface ValidExec {
  command: string[]
  env: Record<string, string>
  workdir: string | undefined
  stdin: Buffer | undefined
  interactive: boolean
  tty: boolean
  cols: number
  rows: number
  timeoutSeconds: number
}

const ENV_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/
const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/

function bad (field: string, why: string): never {
  throw new GatewayError('invalid_argument', `${field}: ${why}`)
}

// JSON can carry "\ud800", UTF-8 cannot: sent on, it would silently become U+FFFD, and the
// process would not receive what the client sent.
const LONE_SURROGATE = /\p{Cs}/u
function wellFormed (field: string, value: string): void {
  if (LONE_SURROGATE.test(value)) bad(field, 'is not valid Unicode (a lone UTF-16 surrogate)')
}

export function validateExecRequest (req: ExecRequest): ValidExec {
  req.command.forEach((arg, i) => {
    if (Buffer.byteLength(arg) > MAX_ARG_BYTES) bad(`command[${i}]`, `exceeds ${MAX_ARG_BYTES} bytes`)
    if (arg.includes('\0')) bad(`command[${i}]`, 'contains a NUL byte')
    wellFormed(`command[${i}]`, arg)
  })
  const env = req.env ?? {}
  for (const [key, value] of Object.entries(env)) {
    if (!ENV_KEY.test(key)) bad(`env.${key}`, 'keys must match ^[A-Za-z_][A-Za-z0-9_]*$')
    if (Buffer.byteLength(value) > MAX_ENV_VALUE_BYTES) bad(`env.${key}`, `value exceeds ${MAX_ENV_VALUE_BYTES} bytes`)
    if (/[\0\r\n]/.test(value)) bad(`env.${key}`, 'value contains NUL, CR or LF')
    wellFormed(`env.${key}`, value)
  }
  if (req.workdir !== undefined) {
    if (Buffer.byteLength(req.workdir) > MAX_WORKDIR_BYTES) bad('workdir', `exceeds ${MAX_WORKDIR_BYTES} bytes`)
    if (/[\0\r\n]/.test(req.workdir)) bad('workdir', 'contains NUL, CR or LF')
    wellFormed('workdir', req.workdir)
  }
  const interactive = req.interactive ?? false
  if (req.stdin !== undefined && req.stdinBase64 !== undefined) bad('stdinBase64', 'give stdin or stdinBase64, not both')
  let stdin: Buffer | undefined
  if (req.stdin !== undefined) {
    wellFormed('stdin', req.stdin)
    stdin = Buffer.from(req.stdin, 'utf8')
  }
  if (req.stdinBase64 !== undefined) {
    if (!BASE64.test(req.stdinBase64) || req.stdinBase64.length % 4 !== 0) bad('stdinBase64', 'is not valid base64')
    stdin = Buffer.from(req.stdinBase64, 'base64')
  }
  if (stdin !== undefined) {
    if (interactive) bad(req.stdin !== undefined ? 'stdin' : 'stdinBase64', 'not allowed with interactive: true (send stdin frames on the WebSocket)')
    if (stdin.length > MAX_STDIN_BYTES) bad(req.stdin !== undefined ? 'stdin' : 'stdinBase64', `exceeds ${MAX_STDIN_BYTES} bytes`)
  }
  const tty = req.tty ?? false
  const valid: ValidExec = {
    command: [...req.command],
    env: { ...env },
    workdir: req.workdir,
    stdin,
    interactive,
    tty,
    cols: req.cols ?? DEFAULT_COLS,
    rows: req.rows ?? DEFAULT_ROWS,
    timeoutSeconds: req.timeoutSeconds ?? 0
  }
  // The caller's own line; the gateway's exec tag is not counted against them.
  const line = assembleCommand({ command: valid.command, env: valid.env, workdir: valid.workdir })
  if (Buffer.byteLength(line) > MAX_COMMAND_LINE_BYTES) bad('command', `the assembled command line exceeds ${MAX_COMMAND_LINE_BYTES} bytes`)
  return valid
}
