// The embedded SSH daemon, driven by a real ssh2 client over real TCP: no mocks.
import { createHash } from 'node:crypto'
import ssh2 from 'ssh2'
import type { Client as SshClient, ClientChannel, PseudoTtyOptions } from 'ssh2'
import { afterEach, describe, expect, it } from 'vitest'
import { generateEd25519KeyPair } from '../../src/ssh-keys.js'
import { startEmbeddedSshd, type EmbeddedSshd, type EmbeddedSshdOptions } from '../../src/sandbox-sshd/server.js'

const { Client, utils } = ssh2

const cleanups: Array<() => unknown> = []
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!()
})

/** Kills a process group (or a single pid) the test left behind; it may already be gone. */
function killLater (pid: number): void {
  cleanups.push(() => {
    try { process.kill(pid, 'SIGKILL') } catch { /* already gone */ }
  })
}

interface Daemon {
  sshd: EmbeddedSshd
  clientKey: string
}

async function startDaemon (opts: Partial<EmbeddedSshdOptions> = {}): Promise<Daemon> {
  const keys = generateEd25519KeyPair()
  const sshd = await startEmbeddedSshd({ authorizedKeys: [keys.public], ...opts })
  cleanups.push(() => sshd.close())
  return { sshd, clientKey: keys.private }
}

function connect (sshd: EmbeddedSshd, privateKey: string): Promise<SshClient> {
  const client = new Client()
  cleanups.push(() => client.end())
  const hostBlob = Buffer.from(sshd.hostPublicKey.split(' ')[1]!, 'base64')
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => { reject(err) }
    client.once('error', onError)
    client.once('ready', () => {
      client.off('error', onError)
      client.on('error', () => undefined)
      resolve(client)
    })
    client.connect({
      host: sshd.host,
      port: sshd.port,
      username: 'whoever',
      privateKey,
      // Also proves hostPublicKey is the key the daemon actually presents.
      hostVerifier: (key: Buffer) => key.equals(hostBlob),
      readyTimeout: 5000
    })
  })
}

async function connected (opts: Partial<EmbeddedSshdOptions> = {}): Promise<SshClient> {
  const { sshd, clientKey } = await startDaemon(opts)
  return connect(sshd, clientKey)
}

interface RunResult {
  stdout: Buffer
  stderr: Buffer
  code: number | null | undefined
  signal: string | undefined
  events: string[]
  elapsedMs: number
}

interface RunOptions {
  env?: Record<string, string>
  pty?: PseudoTtyOptions
  stdin?: string
  /** Sees the channel and every stdout chunk, e.g. to send a signal once the command is ready. */
  onStdout?: (chunk: Buffer, channel: ClientChannel) => void
  onChannel?: (channel: ClientChannel) => void
}

function run (client: SshClient, command: string, opts: RunOptions = {}): Promise<RunResult> {
  const started = Date.now()
  return new Promise((resolve, reject) => {
    client.exec(command, { env: opts.env, pty: opts.pty }, (err, channel) => {
      if (err) {
        reject(err)
        return
      }
      const stdout: Buffer[] = []
      const stderr: Buffer[] = []
      const events: string[] = []
      let code: number | null | undefined
      let signal: string | undefined
      channel.on('data', (chunk: Buffer) => {
        stdout.push(chunk)
        opts.onStdout?.(chunk, channel)
      })
      channel.stderr.on('data', (chunk: Buffer) => { stderr.push(chunk) })
      channel.on('exit', (c: number | null, s?: string) => {
        events.push('exit')
        code = c
        signal = s
      })
      channel.on('close', () => {
        events.push('close')
        resolve({
          stdout: Buffer.concat(stdout),
          stderr: Buffer.concat(stderr),
          code,
          signal,
          events,
          elapsedMs: Date.now() - started
        })
      })
      opts.onChannel?.(channel)
      if (opts.stdin !== undefined) channel.end(opts.stdin)
    })
  })
}

function errnoOf (fn: () => void): string | undefined {
  try {
    fn()
    return undefined
  } catch (err) {
    return (err as NodeJS.ErrnoException).code
  }
}

async function waitUntil (predicate: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`)
    await new Promise((resolve) => setTimeout(resolve, 25))
  }
}

describe('embedded sshd: exec', () => {
  it('reports exit codes 0 and 7, stdout and stderr separately, exit before close', async () => {
    const client = await connected()
    const ok = await run(client, 'echo out; echo err >&2')
    expect(ok.code).toBe(0)
    expect(ok.stdout.toString()).toBe('out\n')
    expect(ok.stderr.toString()).toBe('err\n')
    expect(ok.events).toEqual(['exit', 'close'])

    const seven = await run(client, 'exit 7')
    expect(seven.code).toBe(7)
    expect(seven.signal).toBeUndefined()
    expect(seven.events).toEqual(['exit', 'close'])
  })

  it('forwards stdin and the client EOF (cat)', async () => {
    const client = await connected()
    const res = await run(client, 'cat', { stdin: 'hello\nworld\n' })
    expect(res.stdout.toString()).toBe('hello\nworld\n')
    expect(res.code).toBe(0)
  })

  it('ignores EPIPE when the command does not read its stdin', async () => {
    const client = await connected()
    const res = await run(client, 'exec 0<&-; echo done', { stdin: 'x'.repeat(256 * 1024) })
    expect(res.stdout.toString()).toBe('done\n')
    expect(res.code).toBe(0)
  })

  it('applies env requests to the command', async () => {
    const client = await connected()
    const res = await run(client, 'printf %s "$GREETING"', { env: { GREETING: 'hi there' } })
    expect(res.stdout.toString()).toBe('hi there')
  })

  it('runs in the home directory', async () => {
    const client = await connected()
    const res = await run(client, 'pwd -P')
    const { realpathSync } = await import('node:fs')
    const { homedir } = await import('node:os')
    expect(res.stdout.toString().trim()).toBe(realpathSync(homedir()))
  })

  it('does not let a background grandchild delay the exit report, and does not kill it', async () => {
    const client = await connected()
    const res = await run(client, 'sh -c \'sleep 20 & echo "$!" >&2; echo bg; exit 3\'')
    const grandchild = Number(res.stderr.toString().trim())
    killLater(grandchild)
    expect(res.stdout.toString()).toBe('bg\n')
    expect(res.code).toBe(3)
    expect(res.elapsedMs).toBeLessThan(1500)
    expect(errnoOf(() => process.kill(grandchild, 0))).toBeUndefined()
  })

  it('does not let a flooding background grandchild delay the exit report', async () => {
    const client = await connected()
    // yes dies of SIGPIPE once the daemon stops reading its pipe after the report.
    const res = await run(client, 'yes & exit 5')
    expect(res.code).toBe(5)
    expect(res.elapsedMs).toBeLessThan(1500)
  })

  it('reports a command killed by a signal as exit-signal KILL', async () => {
    const client = await connected()
    const res = await run(client, 'kill -9 $$')
    expect(res.code).toBeNull()
    expect(res.signal).toBe('SIGKILL')
    expect(res.events).toEqual(['exit', 'close'])
  })

  it('delivers 1 MiB of stdout intact', async () => {
    const client = await connected()
    const script = 'f=$(mktemp); head -c 1048576 /dev/urandom > "$f"; sha256sum "$f" >&2; cat "$f"; rm -f "$f"'
    const res = await run(client, script)
    expect(res.code).toBe(0)
    expect(res.stdout.length).toBe(1048576)
    const expected = res.stderr.toString().split(' ')[0]
    expect(createHash('sha256').update(res.stdout).digest('hex')).toBe(expected)
  })

  it('delivers output still queued for a slow client before EOF and the exit report', async () => {
    // The client stops reading long past exitDrainMs; when the command exits, megabytes sit in
    // the channel's buffers waiting for window space, and EOF must not overtake them.
    const client = await connected({ exitDrainMs: 100 })
    const size = 4 * 1024 * 1024 + 256 * 1024
    const script = `f=$(mktemp); head -c ${size} /dev/urandom > "$f"; sha256sum "$f" >&2; cat "$f"; rm -f "$f"`
    let paused = false
    const res = await run(client, script, {
      onStdout: (_chunk, channel) => {
        if (paused) return
        paused = true
        channel.pause()
        setTimeout(() => channel.resume(), 800)
      }
    })
    expect(res.code).toBe(0)
    expect(res.stdout.length).toBe(size)
    const expected = res.stderr.toString().split(' ')[0]
    expect(createHash('sha256').update(res.stdout).digest('hex')).toBe(expected)
  })

  it('keeps the tail still in the pipe when the command exits while the client holds output back', async () => {
    // A paused ssh2 client takes 3 MiB (its 2 MiB window plus one 1 MiB adjustment) and the
    // daemon's channel buffer 2 MiB more; output a little beyond 5 MiB therefore fits only if
    // the rest waits in the pipe, and the command exits while the daemon is not reading it.
    // exitDrainMs (50) passes long before the client resumes (500): that bound is for
    // background grandchildren and must not truncate the command's own output.
    const client = await connected({ exitDrainMs: 50 })
    const sizes = [40, 48, 56, 64, 72, 80, 88, 96].map((kib) => 5 * 1024 * 1024 + kib * 1024)
    const received = await Promise.all(sizes.map((size) => new Promise<number>((resolve, reject) => {
      client.exec(`head -c ${size} /dev/zero`, (err, channel) => {
        if (err) return reject(err)
        let bytes = 0
        channel.pause()
        setTimeout(() => channel.resume(), 500)
        channel.on('data', (chunk: Buffer) => { bytes += chunk.length })
        channel.on('close', () => { resolve(bytes) })
      })
    })))
    expect(received).toEqual(sizes)
  })

  // ssh2's window-adjust handler resumed a stale stdout chunk instead of a parked stderr write
  // (see src/sandbox-sshd/channel-output.ts): these hung forever, or delivered stdout twice.
  it.each([
    { name: '4 MiB of stdout, then a line of stderr', command: 'head -c 4194304 /dev/zero; echo done >&2', out: 4194304, err: 5 },
    { name: '3 MiB of stderr, then a line of stdout', command: 'head -c 3145728 /dev/zero >&2; echo done', out: 5, err: 3145728 },
    { name: '12 MiB of stdout, 3 MiB of stderr, a line of stdout, exit 3', command: 'head -c 12582912 /dev/zero; head -c 3000000 /dev/zero >&2; echo x; exit 3', out: 12582914, err: 3000000 },
    { name: 'interleaved 1 MiB bursts on both streams', command: 'for i in 1 2 3 4 5 6; do head -c 1048576 /dev/zero; head -c 1048576 /dev/zero >&2; done; echo end >&2', out: 6 * 1048576, err: 6 * 1048576 + 4 }
  ])('delivers $name exactly, with its exit status, to a client that holds output back for 1 s', async ({ command, out, err }) => {
    const client = await connected()
    const res = await run(client, command, {
      onChannel: (channel) => {
        channel.pause()
        channel.stderr.pause()
        setTimeout(() => { channel.resume(); channel.stderr.resume() }, 1000)
      }
    })
    expect(res.stdout.length).toBe(out)
    expect(res.stderr.length).toBe(err)
    expect(res.code).toBe(command.includes('exit 3') ? 3 : 0)
    expect(res.events).toEqual(['exit', 'close'])
  }, 30_000)

  it('reports spawn failures on stderr with exit status 127', async () => {
    const client = await connected()
    const res = await run(client, 'echo a\0b')
    expect(res.code).toBe(127)
    expect(res.stderr.toString()).toContain('cannot run command')
    expect(res.events).toEqual(['exit', 'close'])
  })

  it('keeps the command running when the client goes away (like OpenSSH)', async () => {
    const { sshd, clientKey } = await startDaemon()
    const client = await connect(sshd, clientKey)
    const pid = await new Promise<number>((resolve, reject) => {
      client.exec('echo $$; exec sleep 20', (err, channel) => {
        if (err) return reject(err)
        channel.once('data', (chunk: Buffer) => { resolve(Number(chunk.toString().trim())) })
      })
    })
    killLater(-pid)
    client.end()
    await new Promise((resolve) => setTimeout(resolve, 200))
    expect(errnoOf(() => process.kill(pid, 0))).toBeUndefined()
  })
})

describe('embedded sshd: signals', () => {
  it('delivers a TERM request to the command (trap → exit 42)', async () => {
    const client = await connected()
    const res = await run(client, "trap 'exit 42' TERM; echo ready; while :; do sleep 0.1; done", {
      onStdout: (chunk, channel) => {
        if (chunk.toString().includes('ready')) channel.signal('TERM')
      }
    })
    expect(res.code).toBe(42)
    expect(res.stdout.toString()).toBe('ready\n')
  })

  it('delivers KILL to the whole process group', async () => {
    const client = await connected()
    let pgid = 0
    const res = await run(client, 'echo $$; sleep 30 & sleep 30 & wait', {
      onStdout: (chunk, channel) => {
        pgid = Number(chunk.toString().trim())
        killLater(-pgid)
        channel.signal('KILL')
      }
    })
    expect(res.code).toBeNull()
    expect(res.signal).toBe('SIGKILL')
    expect(pgid).toBeGreaterThan(0)
    // Orphaned members are reaped by init, which may take a moment.
    await waitUntil(() => errnoOf(() => process.kill(-pgid, 0)) === 'ESRCH', 5000)
  })
})

/** Output as a terminal shows it, without the line discipline's \r before each \n. */
function lines (output: Buffer): string {
  return output.toString().replaceAll('\r\n', '\n')
}

describe('embedded sshd: pseudo-terminals', () => {
  const size = { cols: 120, rows: 40, term: 'xterm-256color' }

  it('gives the command a terminal of the requested size and type', async () => {
    const client = await connected()
    const res = await run(client, 'stty size; tty; printf "%s\n" "$TERM"', { pty: { ...size, term: 'screen' } })
    expect(res.code).toBe(0)
    expect(res.events).toEqual(['exit', 'close'])
    expect(lines(res.stdout)).toMatch(/^40 120\n\/dev\/pts\/\d+\nscreen\n$/)
  })

  it('uses 80x24 when the client sends zeros', async () => {
    const client = await connected()
    const res = await run(client, 'stty size', { pty: { cols: 0, rows: 0 } })
    expect(lines(res.stdout)).toBe('24 80\n')
  })

  it('applies window-change requests to the running command', async () => {
    const client = await connected()
    let resized = false
    const res = await run(client, "sh -c 'stty size; read x; stty size'", {
      pty: size,
      onStdout: (_chunk, channel) => {
        if (resized) return
        resized = true
        channel.setWindow(30, 100, 0, 0)
        channel.write('go\n')
      }
    })
    expect(res.code).toBe(0)
    // The terminal echoes the input line between the two answers.
    expect(lines(res.stdout)).toBe('40 120\ngo\n30 100\n')
  })

  it('merges stderr into the terminal output and sends nothing as extended data', async () => {
    const client = await connected()
    const res = await run(client, 'echo out; echo err >&2; echo out2', { pty: size })
    expect(lines(res.stdout)).toBe('out\nerr\nout2\n')
    expect(res.stderr.length).toBe(0)
  })

  it('reports exit codes and signals', async () => {
    const client = await connected()
    const seven = await run(client, 'exit 7', { pty: size })
    expect(seven.code).toBe(7)
    expect(seven.signal).toBeUndefined()
    expect(seven.events).toEqual(['exit', 'close'])
    const killed = await run(client, 'kill -9 $$', { pty: size })
    expect(killed.code).toBeNull()
    expect(killed.signal).toBe('SIGKILL')
    expect(killed.events).toEqual(['exit', 'close'])
  })

  it('delivers a TERM request to the command (trap → exit 42)', async () => {
    const client = await connected()
    const res = await run(client, "trap 'exit 42' TERM; echo ready; while :; do sleep 0.1; done", {
      pty: size,
      onStdout: (chunk, channel) => {
        if (chunk.toString().includes('ready')) channel.signal('TERM')
      }
    })
    expect(res.code).toBe(42)
    // The shell may also report its sleep killed by the same TERM, on the merged stderr.
    expect(lines(res.stdout)).toMatch(/^ready\n/)
  })

  it('forwards input and turns the client EOF into the terminal EOF (cat)', async () => {
    const client = await connected()
    const res = await run(client, 'cat', { pty: size, stdin: 'hello\n' })
    expect(res.code).toBe(0)
    // Once echoed by the terminal, once written by cat.
    expect(lines(res.stdout)).toBe('hello\nhello\n')
  })

  it('passes input larger than the terminal buffers, and bytes unchanged both ways', async () => {
    const client = await connected()
    const input = 256 * 1024
    const script = `stty raw -echo; head -c ${input} | wc -c; f=$(mktemp); head -c 1048576 /dev/urandom > "$f"; ` +
      'cat "$f"; sha256sum "$f" | cut -c1-64; rm -f "$f"'
    let sent = false
    const res = await run(client, script, {
      pty: size,
      // Only once raw mode is on; before that the line discipline would cook the input.
      onChannel: (channel) => { setTimeout(() => { sent = true; channel.write(Buffer.alloc(input, 'x')) }, 300) }
    })
    expect(sent).toBe(true)
    expect(res.code).toBe(0)
    const count = `${input}\n`
    expect(res.stdout.subarray(0, count.length).toString()).toBe(count)
    const data = res.stdout.subarray(count.length, res.stdout.length - 65)
    expect(data.length).toBe(1048576)
    const hash = res.stdout.subarray(res.stdout.length - 65, res.stdout.length - 1).toString()
    expect(createHash('sha256').update(data).digest('hex')).toBe(hash)
  })

  it('does not let a background grandchild that ignores SIGHUP delay the report, and does not kill it', async () => {
    const client = await connected()
    const res = await run(client, 'trap \'\' HUP; sleep 20 & echo "$!"; exit 3', { pty: size })
    const grandchild = Number(lines(res.stdout).trim())
    killLater(grandchild)
    expect(res.code).toBe(3)
    expect(res.elapsedMs).toBeLessThan(1500)
    expect(errnoOf(() => process.kill(grandchild, 0))).toBeUndefined()
  })

  it('does not let a flooding background grandchild delay the report', async () => {
    const client = await connected()
    const res = await run(client, 'trap \'\' HUP; yes & exit 5', { pty: size })
    expect(res.code).toBe(5)
    expect(res.elapsedMs).toBeLessThan(1500)
  })

  it('keeps the tail still in the terminal when the command exits while the client holds output back', async () => {
    // A paused ssh2 client and the channel take about 5 MiB (see the pipe test above) and a
    // terminal about 17 KiB more, so with these sizes the command exits during the pause with its
    // last KiBs unread in the terminal, where node-pty would drop them 200 ms after the exit.
    // The pause outlasts what a terminal needs to move 5 MiB; +96 KiB stays blocked until then.
    const client = await connected()
    const sizes = [8, 12, 16, 20, 96].map((kib) => 5 * 1024 * 1024 + kib * 1024)
    const received = await Promise.all(sizes.map((bytes) => new Promise<number>((resolve, reject) => {
      client.exec(`head -c ${bytes} /dev/zero`, { pty: size }, (err, channel) => {
        if (err) return reject(err)
        let got = 0
        channel.pause()
        setTimeout(() => channel.resume(), 1500)
        channel.on('data', (chunk: Buffer) => { got += chunk.length })
        channel.on('close', () => { resolve(got) })
      })
    })))
    expect(received).toEqual(sizes)
  })

  it('delivers the whole output of commands that exit right after writing it', async () => {
    // Node 20's libuv takes the terminal's hang-up for EOF with output still unread
    // (libuv/libuv#4992); without a workaround some of these lose their last KiBs.
    const client = await connected()
    const sizes = [1, 2, 3, 4, 5, 6].map((mib) => mib * 1024 * 1024 + 1234)
    const results = await Promise.all(sizes.map((bytes) => run(client, `head -c ${bytes} /dev/zero`, { pty: size })))
    expect(results.map((res) => res.stdout.length)).toEqual(sizes)
  })

  it('reports spawn failures with exit status 127', async () => {
    const client = await connected()
    const res = await run(client, 'echo a\0b', { pty: size })
    expect(res.code).toBe(127)
    expect(res.stdout.toString()).toContain('cannot run command')
    expect(res.events).toEqual(['exit', 'close'])
  })

  it('hangs the terminal up when the client goes away, as OpenSSH does, and signals nothing itself', async () => {
    const { sshd, clientKey } = await startDaemon()
    const client = await connect(sshd, clientKey)
    const started = (command: string): Promise<number> => new Promise((resolve, reject) => {
      client.exec(command, { pty: size }, (err, channel) => {
        if (err) return reject(err)
        channel.once('data', (chunk: Buffer) => { resolve(Number(chunk.toString().trim())) })
      })
    })
    // node-pty opens masters without O_CLOEXEC, so every later child holds a copy and keeps an
    // earlier terminal from hanging up; the one started last is certain to.
    const ignoring = await started("trap '' HUP; echo $$; exec sleep 20")
    const hungUp = await started('echo $$; exec sleep 20')
    killLater(-hungUp)
    killLater(-ignoring)
    client.end()
    await waitUntil(() => errnoOf(() => process.kill(hungUp, 0)) === 'ESRCH', 5000)
    expect(errnoOf(() => process.kill(ignoring, 0))).toBeUndefined()
  })

  it('close() resolves promptly with a command running under a terminal', async () => {
    const { sshd, clientKey } = await startDaemon()
    const client = await connect(sshd, clientKey)
    await new Promise<void>((resolve, reject) => {
      client.exec("trap '' HUP; echo $$; exec sleep 20", { pty: size }, (err, channel) => {
        if (err) return reject(err)
        channel.once('data', (chunk: Buffer) => {
          killLater(-Number(chunk.toString().trim()))
          resolve()
        })
      })
    })
    const started = Date.now()
    await sshd.close()
    expect(Date.now() - started).toBeLessThan(2500)
  })
})

describe('embedded sshd: auth and refusals', () => {
  it('rejects a client key that is not authorized', async () => {
    const { sshd } = await startDaemon()
    const stranger = generateEd25519KeyPair()
    await expect(connect(sshd, stranger.private)).rejects.toThrow(/authentication methods failed/)
  })

  it('accepts a key added later with setAuthorizedKeys, and rejects one removed', async () => {
    const { sshd, clientKey } = await startDaemon()
    const other = generateEd25519KeyPair()
    sshd.setAuthorizedKeys([other.public])
    await expect(connect(sshd, clientKey)).rejects.toThrow(/authentication methods failed/)
    const client = await connect(sshd, other.private)
    expect((await run(client, 'true')).code).toBe(0)
  })

  it('uses a given host key and reports its public half', async () => {
    const host = generateEd25519KeyPair()
    const { sshd, clientKey } = await startDaemon({ hostKey: host.private })
    expect(sshd.hostPublicKey).toBe(host.public.split(' ').slice(0, 2).join(' '))
    const client = await connect(sshd, clientKey)
    expect((await run(client, 'true')).code).toBe(0)
  })

  it('generates only ed25519 keys that ssh2 itself can parse (works around mscdex/ssh2#1390)', () => {
    for (let i = 0; i < 1000; i++) {
      const pair = generateEd25519KeyPair()
      expect(utils.parseKey(pair.public)).not.toBeInstanceOf(Error)
      expect(utils.parseKey(pair.private)).not.toBeInstanceOf(Error)
    }
  })

  it('refuses invalid authorized keys at start', async () => {
    await expect(startEmbeddedSshd({ authorizedKeys: ['ssh-ed25519 not-base64!'] })).rejects.toThrow(/authorizedKeys\[0\]/)
  })

  it('refuses shell sessions', async () => {
    const client = await connected()
    await expect(new Promise((resolve, reject) => {
      client.shell((err, channel) => { if (err) reject(err); else resolve(channel) })
    })).rejects.toThrow()
  })

  it('close() resolves promptly with a connected client and a running command', async () => {
    const { sshd, clientKey } = await startDaemon()
    const client = await connect(sshd, clientKey)
    const closed = new Promise<void>((resolve) => { client.once('close', () => { resolve() }) })
    await new Promise<void>((resolve, reject) => {
      client.exec('echo $$; exec sleep 20', (err, channel) => {
        if (err) return reject(err)
        channel.once('data', (chunk: Buffer) => {
          killLater(-Number(chunk.toString().trim()))
          resolve()
        })
      })
    })
    const started = Date.now()
    await sshd.close()
    expect(Date.now() - started).toBeLessThan(2500)
    await closed
  })
})
