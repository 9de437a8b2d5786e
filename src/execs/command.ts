// Turns an exec request into the one command string sent in the SSH `exec` request. The sandbox's
// shell parses it back into exactly the argv the client sent: every element is single-quoted
// unless it is made only of bytes no shell treats specially.

import type { SignalName } from '../schemas/exec.js'

export const MAX_COMMAND_LINE_BYTES = 262144
export const EXEC_ID_ENV = 'EXEC_GATEWAY_EXEC_ID'

const SAFE = /^[A-Za-z0-9./_-]+$/

export function shellQuote (value: string): string {
  if (value.includes('\0')) throw new TypeError('a shell argument cannot contain NUL')
  if (value === '') return "''"
  if (SAFE.test(value)) return value
  return "'" + value.replaceAll("'", "'\\''") + "'"
}

export interface CommandSpec {
  command: readonly string[]
  env?: Readonly<Record<string, string>> | undefined
  workdir?: string | undefined
  // Tags every process of the exec so that signals can reach the whole tree (see killScript).
  execId?: string | undefined
}

// Names that only exist inside a shell: `exec` cannot run them.
const SHELL_ONLY = new Set([
  '.', ':', 'break', 'continue', 'eval', 'exec', 'exit', 'export', 'readonly', 'return', 'set', 'shift', 'times',
  'trap', 'unset', 'cd', 'alias', 'unalias', 'command', 'getopts', 'read', 'type', 'ulimit', 'umask', 'wait',
  'jobs', 'fg', 'bg', 'hash', 'fc', 'local', 'source', 'declare', 'typeset', 'let', 'shopt', 'builtin', 'enable',
  'history', 'logout', 'pushd', 'popd', 'dirs', 'suspend', 'disown', 'mapfile', 'readarray',
  'if', 'then', 'else', 'elif', 'fi', 'for', 'while', 'until', 'do', 'done', 'case', 'esac', '{', '}', '!', '[[',
  'function', 'select', 'time', 'coproc', 'caller', 'help', 'bind', 'compgen', 'complete', 'compopt'
])

export function assembleCommand ({ command, env, workdir, execId }: CommandSpec): string {
  const parts: string[] = []
  for (const key of Object.keys(env ?? {}).sort()) parts.push(`${key}=${shellQuote(env![key]!)}`)
  // After the caller's env so that a caller cannot override the tag by accident.
  if (execId !== undefined) parts.push(`${EXEC_ID_ENV}=${shellQuote(execId)}`)
  // The command replaces the shell (dash would otherwise stay as its parent): signals reach it
  // directly and a signal death is reported as exit-signal, not as the shell's 128+N.
  // A leading "-" would be read as an option of exec itself.
  const first = command[0] ?? ''
  if (!SHELL_ONLY.has(first) && !first.startsWith('-')) parts.push('exec')
  for (const arg of command) parts.push(shellQuote(arg))
  const line = parts.join(' ')
  return workdir === undefined ? line : `cd ${shellQuote(workdir)} && ${line}`
}

// The signal list is a wire rule and lives with its schema; the exec layer names it from here.
export type { SignalName }

// Run in the sandbox on a side SSH channel, for a batch of execs at once (see TreeSignals): it
// reads their ids on stdin, one a line. sshd signals only its direct child, and a command's
// children would outlive it; every process an exec started inherits its tag, so one scan of
// /proc finds the processes of every exec in the batch. KILL is repeated to catch processes
// forked mid-scan. Prints the ids of the execs whose processes it signalled, one a line; exits 3
// when nothing carried any of the tags (then each caller falls back to an SSH signal request).
export function killScript (signal: SignalName): string {
  const passes = signal === 'KILL' ? 5 : 1
  return [
    `tags=$(sed 's/^/${EXEC_ID_ENV}=/')`,
    '[ -n "$tags" ] || exit 3',
    'found=',
    `for i in $(seq 1 ${passes}); do`,
    `  hits=$(printf '%s\\n' "$tags" | grep -HzxF -f - /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | sed -n 's|^/proc/\\([0-9]*\\)/environ:${EXEC_ID_ENV}=|\\1 |p')`,
    '  [ -z "$hits" ] && break',
    `  kill -s ${signal} $(printf '%s\\n' "$hits" | cut -d' ' -f1) 2>/dev/null`,
    '  found="$found',
    '$hits"',
    `  [ $i -lt ${passes} ] && sleep 0.05`,
    'done',
    '[ -n "$found" ] || exit 3',
    'printf \'%s\\n\' "$found" | sed -n \'s/^[0-9]* //p\' | sort -u'
  ].join('\n')
}
