// An ssh2 SSH server whose exec behaviour each test scripts, to produce the misbehaving peers the
// gateway must survive: exit-status without close, close without exit-status, silence, floods.
import { createServer, type Socket } from 'node:net'
import ssh2 from 'ssh2'
import type { ServerChannel, Connection } from 'ssh2'
import { generateEd25519KeyPair } from '../../src/ssh-keys.js'

const { Server, utils } = ssh2

export interface ScriptedExecContext {
  command: string
  /** The accepted session channel; the script owns it from here (write, exit, close, or nothing). */
  channel: ServerChannel
  /** Variables the client sent with `env` requests on this session before `exec`. */
  env: Record<string, string>
  /** Whether the client requested a pty on this session before `exec`. */
  pty: boolean
}

export interface StartScriptedSshdOptions {
  onExec: (ctx: ScriptedExecContext) => void | Promise<void>
  /** Host private key (OpenSSH or PEM format); a fresh ed25519 key when omitted. */
  hostKey?: string
}

export interface ScriptedSshd {
  host: string
  port: number
  /** Host public key in OpenSSH one-line format. */
  hostPublicKey: string
  /** SSH client connections currently open. */
  connectionCount(): number
  close(): Promise<void>
}

const HOST = '127.0.0.1'
const CLOSE_BOUND_MS = 2000

function publicKeyLine (privateKey: string): string {
  const parsed = utils.parseKey(privateKey)
  if (parsed instanceof Error) throw new Error(`scripted sshd: cannot parse hostKey: ${parsed.message}`)
  const key = Array.isArray(parsed) ? parsed[0] : parsed
  if (key === undefined) throw new Error('scripted sshd: hostKey holds no key')
  return `${key.type} ${key.getPublicSSH().toString('base64')}`
}

export function startScriptedSshd (opts: StartScriptedSshdOptions): Promise<ScriptedSshd> {
  let hostKey: string
  let hostPublicKey: string
  if (opts.hostKey !== undefined) {
    hostKey = opts.hostKey
    hostPublicKey = publicKeyLine(hostKey)
  } else {
    const pair = generateEd25519KeyPair()
    hostKey = pair.private
    hostPublicKey = pair.public
  }

  const ssh = new Server({ hostKeys: [hostKey] })
  ssh.on('error', () => undefined)
  ssh.on('connection', (client: Connection) => handleClient(client, opts.onExec))

  // Sockets are accepted here and injected into ssh2 so close() can destroy them outright:
  // ssh2's own end() waits for the peer, which a test's broken client may never do.
  const sockets = new Set<Socket>()
  const tcp = createServer((sock) => {
    sock.on('error', () => undefined)
    sock.setNoDelay(true)
    sockets.add(sock)
    sock.once('close', () => sockets.delete(sock))
    ssh.injectSocket(sock)
  })
  tcp.on('error', () => undefined)

  return new Promise((resolve, reject) => {
    const onListenError = (err: Error): void => reject(err)
    tcp.once('error', onListenError)
    tcp.listen(0, HOST, () => {
      tcp.off('error', onListenError)
      const addr = tcp.address()
      if (addr === null || typeof addr === 'string') {
        reject(new Error('scripted sshd: unexpected listen address'))
        return
      }
      let closing: Promise<void> | undefined
      resolve({
        host: HOST,
        port: addr.port,
        hostPublicKey,
        connectionCount: () => sockets.size,
        close () {
          closing ??= new Promise<void>((resolve) => {
            const finish = (): void => {
              clearTimeout(timer)
              resolve()
            }
            // The bound only matters if a close callback is lost; destroy() makes it immediate.
            const timer = setTimeout(finish, CLOSE_BOUND_MS)
            tcp.close(finish)
            for (const sock of sockets) sock.destroy()
          })
          return closing
        }
      })
    })
  })
}

function handleClient (client: Connection, onExec: StartScriptedSshdOptions['onExec']): void {
  client.on('error', () => undefined)
  client.on('authentication', (ctx) => {
    // Any identity is fine: these tests exercise the channel layer, not authentication.
    if (ctx.method === 'publickey' || ctx.method === 'none') ctx.accept()
    else ctx.reject(['publickey', 'none'])
  })
  client.on('ready', () => {
    client.on('session', (acceptSession) => {
      const session = acceptSession()
      session.on('error', () => undefined)
      const env: Record<string, string> = {}
      let pty = false
      session.on('env', (accept, _reject, info) => {
        env[info.key] = info.val
        accept?.()
      })
      session.on('pty', (accept) => {
        pty = true
        accept?.()
      })
      session.on('window-change', (accept) => accept?.())
      // Signals are deliberately ignored so tests can model a process that does not die on them.
      session.on('signal', (accept) => accept?.())
      session.on('shell', (_accept, reject) => reject?.())
      session.on('subsystem', (_accept, reject) => reject?.())
      session.on('exec', (accept, _reject, info) => {
        const channel = accept()
        channel.on('error', () => undefined)
        let result: void | Promise<void>
        try {
          result = onExec({ command: info.command, channel, env: { ...env }, pty })
        } catch (err) {
          failScript(channel, err)
          return
        }
        if (result instanceof Promise) result.catch((err: unknown) => failScript(channel, err))
      })
    })
  })
}

// A script that throws is a bug in the test; make it visible and let the client see the channel go.
function failScript (channel: ServerChannel, err: unknown): void {
  console.error('scripted sshd: onExec failed:', err)
  try {
    channel.stderr.write(`scripted sshd: onExec failed: ${String(err)}\n`)
    channel.close()
  } catch {
    // channel already gone
  }
}
