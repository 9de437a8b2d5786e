// src/execs/command.ts against real shells: the argv a client sends must be the argv the
// sandbox's shell hands to the program, byte for byte, and the tag/kill machinery must reach
// every process of an exec.
import { spawn, spawnSync, type ChildProcess, type SpawnSyncReturns } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { EXEC_ID_ENV, assembleCommand, killScript, shellQuote } from '../../src/execs/command.js'
import { SIGNALS } from '../../src/schemas/exec.js'

const SHELLS = ['/bin/sh', ...(existsSync('/bin/bash') ? ['/bin/bash'] : [])]

function runShell (shell: string, line: string, opts: { input?: Buffer, env?: NodeJS.ProcessEnv } = {}): SpawnSyncReturns<Buffer> {
  const res = spawnSync(shell, ['-c', line], { input: opts.input, env: opts.env ?? process.env, timeout: 20_000, maxBuffer: 64 * 1024 * 1024 })
  if (res.error !== undefined) throw res.error
  return res
}

// Every argument followed by a NUL, exactly as printf '%s\0' prints them.
function nulJoined (args: readonly string[]): Buffer {
  return Buffer.concat(args.flatMap((a) => [Buffer.from(a, 'utf8'), Buffer.from([0])]))
}

function roundTrip (shell: string, args: readonly string[]): void {
  const line = assembleCommand({ command: ['printf', '%s\\0', ...args] })
  const res = runShell(shell, line)
  expect(res.stderr.toString(), `stderr of ${shell}`).toBe('')
  expect(res.status).toBe(0)
  // Byte for byte: a lossy decode would hide a mangled byte.
  expect(res.stdout.equals(nulJoined(args)), `${shell}: stdout ${JSON.stringify(res.stdout.toString())}`).toBe(true)
  const parts = res.stdout.toString('utf8').split('\0')
  expect(parts.pop()).toBe('')
  expect(parts).toEqual([...args])
}

describe('shellQuote', () => {
  it.each([
    ["it's", "'it'\\''s'"],
    ['$(id)', "'$(id)'"],
    ['`id`', "'`id`'"],
    ['', "''"],
    ['a\nb', "'a\nb'"],
    ['héllo wörld 😀', "'héllo wörld 😀'"],
    ['a/b.c_d-e', 'a/b.c_d-e'],
    ['ABCxyz0189', 'ABCxyz0189'],
    ['a=b', "'a=b'"],
    ['$HOME', "'$HOME'"],
    ['*', "'*'"],
    ['a b', "'a b'"],
    ['~', "'~'"],
    ["'", "''\\'''"],
    ['\\', "'\\'"]
  ])('%j → %j', (input, quoted) => {
    expect(shellQuote(input)).toBe(quoted)
  })

  it('refuses NUL', () => {
    expect(() => shellQuote('a\0b')).toThrow(TypeError)
    expect(() => shellQuote('\0')).toThrow(/NUL/)
  })

  it('the quoted form of an assignment-looking word is never an assignment', () => {
    // `'a=b'` as a command word runs a program named "a=b" instead of setting a variable.
    const res = runShell('/bin/sh', `${shellQuote('a=b')}; echo "rc=$? a=\${a-unset}"`)
    expect(res.stdout.toString()).toBe('rc=127 a=unset\n')
  })
})

const NASTY: string[] = [
  'plain',
  "it's",
  '"double"',
  'mixed \'"\' quotes "\'"',
  '$HOME',
  // eslint-disable-next-line no-template-curly-in-string -- the literal text is the test
  '${HOME}',
  '$(id)',
  '`id`',
  '*',
  '?',
  '[a-z]*',
  '~',
  '~root',
  ';',
  'a; echo pwned',
  '&&',
  '||',
  '|',
  '&',
  '>',
  '<',
  '>/tmp/egw-should-not-exist',
  '(',
  ')',
  '{',
  '}',
  '!',
  '#comment',
  '\\',
  '\\n',
  'back\\slash\\',
  'line1\nline2',
  '\n',
  'trailing newline\n',
  '\r',
  'cr\r\nlf',
  '\t',
  'tab\there',
  ' ',
  '  leading and trailing  ',
  'héllo wörld',
  'дом',
  '中文字符',
  '😀',
  '👩‍👩‍👧 family',
  '\u0001\u001b[31mred\u007f',
  '',
  '-',
  '--',
  '-n',
  '-e',
  '--help',
  'a=b',
  'IFS=x',
  '%s%d%%',
  "'''''",
  '\'"\'"\\$`'
]

describe('assembleCommand: argv round trip through a real shell', () => {
  for (const shell of SHELLS) {
    it(`${shell}: every nasty argument arrives exactly`, () => {
      roundTrip(shell, NASTY)
    })

    it(`${shell}: each nasty argument alone`, () => {
      for (const arg of NASTY) roundTrip(shell, [arg])
    })

    it(`${shell}: lone empty strings`, () => {
      roundTrip(shell, [''])
      roundTrip(shell, ['', '', ''])
    })

    it(`${shell}: a 32768-byte argument`, () => {
      const pattern = "ab'c\"$d`e\\f g\nh😀"
      let big = ''
      while (Buffer.byteLength(big) < 32768 - 32) big += pattern
      big += 'x'.repeat(32768 - Buffer.byteLength(big))
      expect(Buffer.byteLength(big)).toBe(32768)
      roundTrip(shell, [big])
      roundTrip(shell, ['x'.repeat(32768), 'y'])
    })

    it(`${shell}: no glob expansion even when files match`, () => {
      const dir = mkdtempSync(join(tmpdir(), 'egw-glob-'))
      try {
        mkdirSync(join(dir, 'matchme'))
        const line = `cd ${shellQuote(dir)} && ` + assembleCommand({ command: ['printf', '%s\\0', '*', 'match*', '[m]atchme'] })
        const res = runShell(shell, line)
        expect(res.stdout.equals(nulJoined(['*', 'match*', '[m]atchme']))).toBe(true)
      } finally {
        rmSync(dir, { recursive: true, force: true })
      }
    })
  }

  it('the pwned redirection file was never created', () => {
    expect(existsSync('/tmp/egw-should-not-exist')).toBe(false)
  })
})

describe('assembleCommand: env, workdir, tag, exec', () => {
  it('applies env sorted by key', () => {
    const line = assembleCommand({ command: ['sh', '-c', 'echo "$B$A"'], env: { B: '2', A: '1' } })
    expect(line.indexOf('A=1')).toBeLessThan(line.indexOf('B=2'))
    expect(line.startsWith('A=1 B=2 ')).toBe(true)
    for (const shell of SHELLS) {
      const res = runShell(shell, line)
      expect(res.stdout.toString()).toBe('21\n')
      expect(res.status).toBe(0)
    }
  })

  it('env values with quotes, spaces and $ reach the process verbatim', () => {
    const env = { Z: "it's $(id) `x` \\ \"q\" 😀", _a1: '', A: ' ' }
    const line = assembleCommand({ command: ['sh', '-c', 'printf "%s\\0" "$Z" "$_a1" "$A"'], env })
    for (const shell of SHELLS) {
      const res = runShell(shell, line)
      expect(res.stdout.equals(nulJoined([env.Z, env._a1, env.A]))).toBe(true)
    }
  })

  it('env applies to the process only, and the same key sorted deterministically', () => {
    expect(assembleCommand({ command: ['true'], env: { b: '1', a: '2', C: '3', _: '4' } }))
      .toBe('C=3 _=4 a=2 b=1 exec true')
  })

  it('workdir: cd into a directory with spaces and a quote in its name', () => {
    const base = realpathSync(mkdtempSync(join(tmpdir(), 'egw-wd-')))
    try {
      const dir = join(base, "my dir's $(name) `x`")
      mkdirSync(dir)
      const line = assembleCommand({ command: ['pwd'], workdir: dir })
      expect(line.startsWith(`cd ${shellQuote(dir)} && `)).toBe(true)
      expect(line).toBe(`cd '${dir.replaceAll("'", "'\\''")}' && exec pwd`)
      for (const shell of SHELLS) {
        const res = runShell(shell, line)
        expect(res.status).toBe(0)
        expect(res.stdout.toString()).toBe(dir + '\n')
      }
    } finally {
      rmSync(base, { recursive: true, force: true })
    }
  })

  it('workdir that does not exist: the command never runs', () => {
    const line = assembleCommand({ command: ['sh', '-c', 'echo ran'], workdir: '/nonexistent/egw-dir' })
    const res = runShell('/bin/sh', line)
    expect(res.status).not.toBe(0)
    expect(res.stdout.toString()).toBe('')
  })

  it('the exec id tag is visible to the process, after the caller env', () => {
    const line = assembleCommand({ command: ['sh', '-c', `echo "$${EXEC_ID_ENV}"`], env: { ZZZ: '1' }, execId: 'ex_abc123' })
    expect(EXEC_ID_ENV).toBe('EXEC_GATEWAY_EXEC_ID')
    expect(line).toContain('EXEC_GATEWAY_EXEC_ID=ex_abc123')
    expect(line.indexOf('ZZZ=1')).toBeLessThan(line.indexOf('EXEC_GATEWAY_EXEC_ID='))
    for (const shell of SHELLS) expect(runShell(shell, line).stdout.toString()).toBe('ex_abc123\n')
  })

  it('the caller cannot override the tag through env', () => {
    const line = assembleCommand({ command: ['sh', '-c', `echo "$${EXEC_ID_ENV}"`], env: { [EXEC_ID_ENV]: 'forged' }, execId: 'ex_real' })
    expect(runShell('/bin/sh', line).stdout.toString()).toBe('ex_real\n')
  })

  it('normal commands are exec\'d: a self-KILL is reported as a signal, not 137', () => {
    const line = assembleCommand({ command: ['sh', '-c', 'kill -9 $$'] })
    expect(line).toBe("exec sh -c 'kill -9 $$'")
    for (const shell of SHELLS) {
      const res = runShell(shell, line)
      expect(res.signal, shell).toBe('SIGKILL')
      expect(res.status, shell).toBeNull()
    }
  })

  it('exec keeps the pid: the process is the shell itself', () => {
    // `$PPID` of the inner sh is the pid of whatever ran the outer shell (this test process)
    // only if the outer shell was replaced.
    const line = assembleCommand({ command: ['sh', '-c', 'echo $PPID'] })
    const res = runShell('/bin/sh', line)
    expect(res.stdout.toString().trim()).toBe(String(process.pid))
  })

  it('shell builtins are not exec\'d', () => {
    expect(assembleCommand({ command: ['exit', '3'] })).toBe('exit 3')
    expect(assembleCommand({ command: ['cd', '/'] })).toBe('cd /')
    expect(assembleCommand({ command: ['export', 'A=1'] })).toBe("export 'A=1'")
    for (const shell of SHELLS) {
      expect(runShell(shell, assembleCommand({ command: ['exit', '3'] })).status, shell).toBe(3)
      expect(runShell(shell, assembleCommand({ command: ['cd', '/'] })).status, shell).toBe(0)
      expect(runShell(shell, assembleCommand({ command: ['export', 'A=1'] })).status, shell).toBe(0)
      expect(runShell(shell, assembleCommand({ command: [':'] })).status, shell).toBe(0)
      const withEnv = runShell(shell, assembleCommand({ command: ['exit', '7'], env: { A: '1' }, workdir: '/' }))
      expect(withEnv.status, shell).toBe(7)
    }
  })

  it('a missing program gives 127 and the shell\'s message on stderr', () => {
    const res = runShell('/bin/sh', assembleCommand({ command: ['egw-no-such-program-xyz'] }))
    expect(res.status).toBe(127)
    expect(res.stderr.toString()).toMatch(/egw-no-such-program-xyz/)
  })

  it('stdin reaches the exec\'d process', () => {
    const res = runShell('/bin/sh', assembleCommand({ command: ['cat'] }), { input: Buffer.from('in\0put\n😀') })
    expect(res.stdout.equals(Buffer.from('in\0put\n😀'))).toBe(true)
  })
})

describe('SIGNALS', () => {
  it('are the contract signal names without SIG', () => {
    expect([...SIGNALS].sort()).toEqual(['HUP', 'INT', 'KILL', 'QUIT', 'TERM', 'USR1', 'USR2'])
    for (const s of SIGNALS) expect(s.startsWith('SIG')).toBe(false)
  })

  it('every one is a signal /bin/sh kill -s can send', () => {
    for (const s of SIGNALS) {
      const res = runShell('/bin/sh', assembleCommand({ command: ['sh', '-c', `kill -s ${s} $$`] }))
      expect(res.signal, s).toBe(`SIG${s}`)
    }
  })
})

// ---- killScript: real process trees, batches of execs on stdin ---------------------------------------------------------

interface ProcInfo { pid: number, ppid: number, pgid: number, state: string }

function procInfo (pid: number): ProcInfo | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    // comm is in parentheses and may contain spaces: parse from the last ')'.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return { pid, state: rest[0]!, ppid: Number(rest[1]), pgid: Number(rest[2]) }
  } catch {
    return undefined
  }
}

function groupMembers (pgid: number): number[] {
  const out: number[] = []
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    const info = procInfo(Number(name))
    if (info !== undefined && info.pgid === pgid && info.state !== 'Z') out.push(info.pid)
  }
  return out.sort((a, b) => a - b)
}

function aliveNotZombie (pid: number): boolean {
  const info = procInfo(pid)
  return info !== undefined && info.state !== 'Z' && info.state !== 'X'
}

function hasTag (pid: number, execId: string): boolean {
  try {
    return readFileSync(`/proc/${pid}/environ`).toString('utf8').split('\0').includes(`${EXEC_ID_ENV}=${execId}`)
  } catch {
    return false
  }
}

async function sleep (ms: number): Promise<void> { await new Promise((resolve) => setTimeout(resolve, ms)) }

async function waitUntil (cond: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    if (cond()) return true
    await sleep(20)
  }
  return cond()
}

const started: ChildProcess[] = []
const strayPids = new Set<number>()

afterEach(async () => {
  for (const child of started.splice(0)) {
    if (child.pid !== undefined) {
      for (const pid of groupMembers(child.pid)) strayPids.add(pid)
      try { process.kill(-child.pid, 'SIGKILL') } catch { /* already gone */ }
    }
  }
  for (const pid of strayPids) {
    try { process.kill(pid, 'SIGKILL') } catch { /* already gone */ }
  }
  strayPids.clear()
})

function startTree (execId: string, script: string): ChildProcess {
  const line = assembleCommand({ command: ['sh', '-c', script], execId })
  const child = spawn('/bin/sh', ['-c', line], { detached: true, stdio: 'ignore' })
  started.push(child)
  child.on('error', () => undefined)
  return child
}

describe('killScript', () => {
  it('KILL reaches every process of the tree and exits 0', async () => {
    const execId = 'ex_test123'
    const child = startTree(execId, 'sleep 30 & sleep 30 & wait')
    const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })))
    expect(await waitUntil(() => groupMembers(child.pid!).length >= 3, 5000)).toBe(true)
    await sleep(200)
    const pids = groupMembers(child.pid!)
    for (const pid of pids) strayPids.add(pid)
    expect(pids.length).toBe(3)
    for (const pid of pids) expect(hasTag(pid, execId), `pid ${pid} carries the tag`).toBe(true)

    const res = spawnSync('/bin/sh', ['-c', killScript('KILL')], { input: `${execId}\n`, timeout: 10_000 })
    expect(res.stderr.toString()).toBe('')
    expect(res.status).toBe(0)
    expect(res.stdout.toString()).toBe(`${execId}\n`)

    expect(await exited).toEqual({ code: null, signal: 'SIGKILL' })
    const allGone = await waitUntil(() => pids.every((pid) => !aliveNotZombie(pid)), 3000)
    expect(allGone, `still alive: ${pids.filter(aliveNotZombie).join(' ')}`).toBe(true)
  })

  it('TERM reaches children too, not just the direct child', async () => {
    const execId = 'ex_termtree'
    const child = startTree(execId, 'sleep 31 & sleep 31 & wait')
    expect(await waitUntil(() => groupMembers(child.pid!).length >= 3, 5000)).toBe(true)
    const pids = groupMembers(child.pid!)
    for (const pid of pids) strayPids.add(pid)
    const res = spawnSync('/bin/sh', ['-c', killScript('TERM')], { input: `${execId}\n`, timeout: 10_000 })
    expect(res.status).toBe(0)
    expect(await waitUntil(() => pids.every((pid) => !aliveNotZombie(pid)), 3000)).toBe(true)
  })

  it('reaches a process that left the process group (setsid)', async () => {
    const execId = 'ex_escaped'
    // The grandchild starts its own session: only the environment tag still ties it to the exec.
    const child = startTree(execId, 'setsid sleep 32 & wait')
    let escaped: number | undefined
    expect(await waitUntil(() => {
      for (const name of readdirSync('/proc')) {
        if (!/^\d+$/.test(name)) continue
        const pid = Number(name)
        const info = procInfo(pid)
        if (info !== undefined && info.pgid !== child.pid && hasTag(pid, execId) && aliveNotZombie(pid)) { escaped = pid; return true }
      }
      return false
    }, 5000)).toBe(true)
    strayPids.add(escaped!)
    const res = spawnSync('/bin/sh', ['-c', killScript('KILL')], { input: `${execId}\n`, timeout: 10_000 })
    expect(res.status).toBe(0)
    expect(await waitUntil(() => !aliveNotZombie(escaped!), 3000)).toBe(true)
  })

  it('does not touch processes of another exec', async () => {
    const victim = startTree('ex_victim', 'sleep 33 & wait')
    const bystander = startTree('ex_victim2', 'sleep 33 & wait')
    expect(await waitUntil(() => groupMembers(victim.pid!).length >= 2 && groupMembers(bystander.pid!).length >= 2, 5000)).toBe(true)
    const res = spawnSync('/bin/sh', ['-c', killScript('KILL')], { input: 'ex_victim\n', timeout: 10_000 })
    expect(res.status).toBe(0)
    expect(await waitUntil(() => groupMembers(victim.pid!).length === 0, 3000)).toBe(true)
    await sleep(100)
    expect(groupMembers(bystander.pid!).length).toBe(2)
  })

  it('one scan for a batch: signals every exec of it that has processes, and names exactly those', async () => {
    const alive = ['ex_batch1', 'ex_batch2', 'ex_batch3']
    const children = alive.map((id) => startTree(id, 'sleep 34 & wait'))
    expect(await waitUntil(() => children.every((c) => groupMembers(c.pid!).length >= 2), 5000)).toBe(true)
    const bystander = startTree('ex_batch4', 'sleep 34 & wait')
    expect(await waitUntil(() => groupMembers(bystander.pid!).length >= 2, 5000)).toBe(true)
    const res = spawnSync('/bin/sh', ['-c', killScript('KILL')], { input: 'ex_batch1\nex_gone1\nex_batch2\nex_gone2\nex_batch3\n', timeout: 10_000 })
    expect(res.stderr.toString()).toBe('')
    expect(res.status).toBe(0)
    expect(res.stdout.toString().split('\n').filter((l) => l !== '').sort()).toEqual(alive)
    expect(await waitUntil(() => children.every((c) => groupMembers(c.pid!).length === 0), 3000)).toBe(true)
    expect(groupMembers(bystander.pid!).length).toBe(2)
  })

  it('exits 3 when no process carries any of the tags, or when it is given none', () => {
    const res = spawnSync('/bin/sh', ['-c', killScript('KILL')], { input: 'ex_nobody_has_this\nex_nor_this\n', timeout: 10_000 })
    expect(res.status).toBe(3)
    expect(res.stdout.toString()).toBe('')
    const term = spawnSync('/bin/sh', ['-c', killScript('TERM')], { input: 'ex_nobody_has_this\n', timeout: 10_000 })
    expect(term.status).toBe(3)
    expect(spawnSync('/bin/sh', ['-c', killScript('KILL')], { input: '', timeout: 10_000 }).status).toBe(3)
  })

  it('matches an id literally: one with shell or pattern syntax finds nothing', () => {
    const res = spawnSync('/bin/sh', ['-c', killScript('KILL')], { input: "ex_'; exit 0; '\nex_.*\n$(echo hi)\n", timeout: 10_000 })
    expect(res.status).toBe(3)
  })
})
