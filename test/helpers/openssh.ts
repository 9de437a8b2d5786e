// Runs the real OpenSSH sshd (Debian's openssh-server) on a free loopback port for interop tests.
// test/global-setup.ts makes sure the binary exists; this helper only locates and runs it.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { accessSync, constants as fsConstants } from 'node:fs'
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { connect, createServer } from 'node:net'
import { tmpdir, userInfo } from 'node:os'
import { delimiter, join } from 'node:path'
import { generateEd25519KeyPair } from '../../src/ssh-keys.js'

export interface OpenSshd {
  host: string
  port: number
  /** The account clients can log in as: the user running the tests (sshd can only switch users as root). */
  user: string
  /** Host public key in OpenSSH one-line format (`ssh-ed25519 AAAA... comment`). */
  hostPublicKey: string
  /** sshd's own stderr (bounded tail), for diagnosing a failing interop test. */
  logs(): string
  close(): Promise<void>
}

export interface StartOpenSshdOptions {
  /** Lines for authorized_keys, OpenSSH one-line public keys. */
  authorizedKeys: string[]
  /** Extra sshd_config lines appended verbatim (e.g. `AcceptEnv FOO`); later lines don't override earlier ones in sshd, so only add new keywords. */
  extraConfig?: string[]
  /** Default VERBOSE: it goes only to the captured buffer returned by logs(). */
  logLevel?: 'QUIET' | 'FATAL' | 'ERROR' | 'INFO' | 'VERBOSE' | 'DEBUG' | 'DEBUG3'
}

const HOST = '127.0.0.1'
const BIND_ATTEMPTS = 5
const READY_TIMEOUT_MS = 10_000
const LOG_LIMIT_BYTES = 64 * 1024

// Children still running if the test process exits without calling close(): -D keeps sshd in the
// foreground but it would otherwise outlive a crashed worker and hold its port.
const live = new Set<ChildProcess>()
let exitHookInstalled = false
function trackChild (child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true
    process.once('exit', () => {
      for (const c of live) {
        try {
          c.kill('SIGKILL')
        } catch {
          // already gone
        }
      }
    })
  }
  live.add(child)
  child.once('exit', () => live.delete(child))
}

export function findSshd (): string | undefined {
  const candidates = ['/usr/sbin/sshd', ...(process.env.PATH ?? '').split(delimiter).filter(Boolean).map((d) => join(d, 'sshd'))]
  for (const candidate of candidates) {
    // sshd re-execs itself and refuses to run from a relative path, so only absolute paths count.
    if (!candidate.startsWith('/')) continue
    try {
      accessSync(candidate, fsConstants.X_OK)
      return candidate
    } catch {
      // try the next one
    }
  }
  return undefined
}

/** Reserves a free port by binding port 0 and releasing it; sshd may still lose a race for it (retried). */
function freePort (): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer()
    srv.once('error', reject)
    srv.listen(0, HOST, () => {
      const addr = srv.address()
      const port = typeof addr === 'object' && addr !== null ? addr.port : 0
      srv.close(() => resolve(port))
    })
  })
}

/** Resolves true once a TCP connection to host:port reads an SSH-2.0 identification line. */
function probeBanner (host: string, port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    let buf = ''
    let settled = false
    const sock = connect({ host, port })
    const finish = (ok: boolean): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      sock.destroy()
      resolve(ok)
    }
    const timer = setTimeout(() => finish(false), timeoutMs)
    sock.setEncoding('latin1')
    sock.on('data', (chunk: string) => {
      buf += chunk
      if (buf.includes('SSH-2.0')) finish(true)
      else if (buf.length > 8192) finish(false)
    })
    sock.on('error', () => finish(false))
    sock.on('close', () => finish(false))
  })
}

function sshdConfig (dir: string, port: number, logLevel: string, extra: string[]): string {
  return [
    `ListenAddress ${HOST}:${port}`,
    `HostKey ${join(dir, 'ssh_host_ed25519_key')}`,
    `PidFile ${join(dir, 'sshd.pid')}`,
    `AuthorizedKeysFile ${join(dir, 'authorized_keys')}`,
    // The test user may have no PAM stack configured and its home/temp dir perms are not ours to fix.
    'UsePAM no',
    'StrictModes no',
    'PermitRootLogin prohibit-password',
    'PubkeyAuthentication yes',
    'PasswordAuthentication no',
    'KbdInteractiveAuthentication no',
    'HostbasedAuthentication no',
    'UseDNS no',
    'PrintMotd no',
    'PrintLastLog no',
    // Tests open many channels/connections at once; the defaults (10 sessions, 10:30:100 startups)
    // would make sshd drop connections and look like a gateway bug.
    'MaxSessions 64',
    'MaxStartups 200',
    `LogLevel ${logLevel}`,
    ...extra,
    ''
  ].join('\n')
}

interface Attempt {
  child: ChildProcess
  exited: Promise<void>
}

const SANDBOX_ACCOUNT = 'egw-sandbox'

/**
 * The account commands run as. As root: a dedicated account with /bin/sh, like a sandbox's own
 * user. Logging in as root would run this machine's root profile (bash sources ~/.bashrc for
 * sshd commands: here pyenv init, ~100 ms and stray stderr under concurrency) in every exec.
 * Without root, the current user.
 */
export function sandboxAccount (): string {
  if (process.getuid?.() !== 0) return userInfo().username
  if (spawnSync('id', ['-u', SANDBOX_ACCOUNT]).status !== 0) {
    const made = spawnSync('useradd', ['--create-home', '--shell', '/bin/sh', SANDBOX_ACCOUNT], { encoding: 'utf8' })
    if (made.status !== 0 && spawnSync('id', ['-u', SANDBOX_ACCOUNT]).status !== 0) {
      throw new Error(`cannot create the test sandbox account ${SANDBOX_ACCOUNT}: ${made.stderr}`)
    }
  }
  // useradd leaves the password field "!" (locked), and sshd without PAM refuses key logins to
  // locked accounts; "*" means no password, not locked.
  spawnSync('usermod', ['-p', '*', SANDBOX_ACCOUNT])
  return SANDBOX_ACCOUNT
}

export async function startOpenSshd (opts: StartOpenSshdOptions): Promise<OpenSshd> {
  const sshdPath = findSshd()
  if (sshdPath === undefined) {
    throw new Error(
      'OpenSSH sshd not found at /usr/sbin/sshd or on PATH: install it with `sudo apt-get install -y openssh-server` ' +
        '(Debian/Ubuntu; `openssh-server` on Fedora/RHEL/Alpine, `openssh` on Arch). test/global-setup.ts does this automatically when run as root.'
    )
  }
  const user = sandboxAccount()
  // As root sshd insists on its privilege-separation dir, which only the (absent) service unit
  // creates; global-setup makes it too, this covers a file run with another vitest config.
  if (process.getuid?.() === 0) {
    await mkdir('/run/sshd', { recursive: true, mode: 0o755 })
    await assertAccountNotLocked(user)
  }
  const dir = await mkdtemp(join(tmpdir(), 'exec-gateway-sshd-'))
  // sshd reads authorized_keys as the account it logs in to.
  await chmod(dir, 0o755)
  try {
    const keys = generateEd25519KeyPair()
    const hostKeyPath = join(dir, 'ssh_host_ed25519_key')
    // sshd refuses a host key readable by others.
    await writeFile(hostKeyPath, keys.private, { mode: 0o600 })
    await chmod(hostKeyPath, 0o600)
    await writeFile(`${hostKeyPath}.pub`, `${keys.public}\n`, { mode: 0o644 })
    await writeFile(join(dir, 'authorized_keys'), opts.authorizedKeys.map((k) => k.trim()).join('\n') + '\n', { mode: 0o644 })
    const configPath = join(dir, 'sshd_config')

    let log = ''
    const appendLog = (chunk: Buffer): void => {
      log += chunk.toString('utf8')
      if (log.length > LOG_LIMIT_BYTES) log = log.slice(log.length - LOG_LIMIT_BYTES)
    }

    const failures: string[] = []
    for (let attempt = 1; attempt <= BIND_ATTEMPTS; attempt++) {
      const port = await freePort()
      await writeFile(configPath, sshdConfig(dir, port, opts.logLevel ?? 'VERBOSE', opts.extraConfig ?? []), { mode: 0o600 })
      const started = await launch(sshdPath, configPath, port, appendLog)
      if ('error' in started) {
        failures.push(`attempt ${attempt} (port ${port}): ${started.error}`)
        continue
      }
      const { child, exited } = started
      let closing: Promise<void> | undefined
      return {
        host: HOST,
        port,
        user,
        hostPublicKey: keys.public,
        logs: () => log,
        close: () => {
          closing ??= stop(child, exited).then(() => rm(dir, { recursive: true, force: true }).catch(() => undefined))
          return closing
        }
      }
    }
    const tried = failures.map((f) => `  ${f}`).join('\n')
    throw new Error(`OpenSSH sshd did not start after ${BIND_ATTEMPTS} attempts:\n${tried}\nsshd output:\n${log}`)
  } catch (err) {
    await rm(dir, { recursive: true, force: true }).catch(() => undefined)
    throw err
  }
}

/**
 * With UsePAM no, sshd running as root refuses every login to an account whose shadow password
 * starts with '!' (locked), even by key, and the client only sees "All configured authentication
 * methods failed". Say so up front. (A non-root sshd cannot read /etc/shadow and skips the check.)
 */
async function assertAccountNotLocked (user: string): Promise<void> {
  let shadow: string
  try {
    shadow = await readFile('/etc/shadow', 'utf8')
  } catch {
    return
  }
  const entry = shadow.split('\n').find((line) => line.startsWith(`${user}:`))
  const password = entry?.split(':')[1] ?? ''
  if (password.startsWith('!')) {
    throw new Error(
      `the account "${user}" is locked in /etc/shadow (password field starts with "!"), so OpenSSH (UsePAM no) ` +
        `refuses key logins to it. Unlock it without enabling password login: usermod -p '*' ${user}`
    )
  }
}

async function launch (
  sshdPath: string,
  configPath: string,
  port: number,
  appendLog: (chunk: Buffer) => void
): Promise<Attempt | { error: string }> {
  // -D: stay in the foreground so we own the process; -e: log to stderr (captured) instead of syslog.
  const child = spawn(sshdPath, ['-D', '-e', '-f', configPath], { stdio: ['ignore', 'pipe', 'pipe'] })
  trackChild(child)
  let exitInfo: string | undefined
  const exited = new Promise<void>((resolve) => {
    child.once('exit', (code, signal) => {
      exitInfo = `sshd exited with ${signal ?? `code ${code}`}`
      resolve()
    })
  })
  let spawnError: Error | undefined
  child.on('error', (err) => {
    spawnError = err
  })
  child.stdout?.on('data', appendLog)
  child.stderr?.on('data', appendLog)
  child.stdout?.on('error', () => undefined)
  child.stderr?.on('error', () => undefined)

  const deadline = Date.now() + READY_TIMEOUT_MS
  while (Date.now() < deadline) {
    if (spawnError !== undefined) return { error: `spawn failed: ${spawnError.message}` }
    if (exitInfo !== undefined) return { error: exitInfo }
    if (await probeBanner(HOST, port, 1000)) {
      // Someone else could own the port and talk SSH; only trust the banner if our sshd is alive.
      if (exitInfo === undefined) return { child, exited }
    }
    await new Promise<void>((resolve) => {
      const t = setTimeout(resolve, 50)
      // Wake early on exit so a bind failure is retried promptly.
      void exited.then(() => {
        clearTimeout(t)
        resolve()
      })
    })
  }
  await stop(child, exited)
  return { error: `no SSH banner on ${HOST}:${port} within ${READY_TIMEOUT_MS} ms` }
}

/** SIGTERM, then SIGKILL after 2 s; always resolves. */
async function stop (child: ChildProcess, exited: Promise<void>): Promise<void> {
  if (child.exitCode === null && child.signalCode === null) {
    try {
      child.kill('SIGTERM')
    } catch {
      // already gone
    }
    let timer: NodeJS.Timeout | undefined
    const killed = await Promise.race([
      exited.then(() => true),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(false), 2000)
      })
    ])
    clearTimeout(timer)
    if (!killed) {
      try {
        child.kill('SIGKILL')
      } catch {
        // already gone
      }
      let t2: NodeJS.Timeout | undefined
      await Promise.race([exited, new Promise<void>((resolve) => (t2 = setTimeout(resolve, 2000)))])
      clearTimeout(t2)
    }
  }
  // Per-connection sshd children inherit the stderr pipe; don't let them keep our end open.
  child.stdout?.destroy()
  child.stderr?.destroy()
}
