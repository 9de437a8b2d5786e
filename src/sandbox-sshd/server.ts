import { createServer, type AddressInfo, type Socket } from 'node:net'
import { pino, type Logger } from 'pino'
import ssh2 from 'ssh2'
import type { Connection } from 'ssh2'
import { authenticate, parseAuthorizedKeys, type AuthorizedKey } from './auth.js'
import { loadHostKey } from '../ssh-keys.js'
import { EMBEDDED_SSHD_CLOSE_MS } from '../lifecycle/bounds.js'
import { closeWithin } from '../lifecycle/close-within.js'
import type { Keeper } from './keeper/keeper.js'
import type { Run } from './run.js'
import { serveSession } from './session.js'

// Default import: Node's ESM loader does not see `Server` and `utils` as named exports of ssh2.
const { Server } = ssh2

export interface EmbeddedSshdOptions {
  host?: string
  port?: number
  /** OpenSSH one-line public keys ("ssh-ed25519 AAAA... comment"); only these may log in. */
  authorizedKeys: string[]
  /** Private host key (OpenSSH or PEM); a fresh ed25519 key when absent. */
  hostKey?: string | Buffer
  logger?: Logger
  /**
   * How long to wait for stdout/stderr EOF after the child exits before reporting anyway
   * (default 250). Time the output spends waiting for a slow client does not count against the
   * command's own last output; see exec-run.ts. Commands under a pseudo-terminal get node-pty's
   * fixed 200 ms instead; see pty-run.ts.
   */
  exitDrainMs?: number
  /**
   * Keeps the execs the gateway tags for it, beyond their channel and connection
   * (docs/keeper-protocol.md). Without it every exec is tied to its channel, as under OpenSSH.
   */
  keeper?: Keeper
}

export interface EmbeddedSshd {
  host: string
  port: number
  /** OpenSSH one-line public key of the host key. */
  hostPublicKey: string
  /** Replaces the key list for new logins; throws (and keeps the old list) if a key does not parse. */
  setAuthorizedKeys(keys: string[]): void
  /** Stops listening and ends connections; always resolves within ~2 s; running commands keep running. */
  close(): Promise<void>
}

/**
 * Starts the embedded SSH daemon: an ssh2 Server fed by our own TCP listener, which lets us set
 * TCP_NODELAY on every socket (Nagle would add ~40 ms to each round trip of small SSH packets)
 * and tear every socket down on close().
 */
export async function startEmbeddedSshd (opts: EmbeddedSshdOptions): Promise<EmbeddedSshd> {
  const log = opts.logger ?? pino({ level: 'silent' })
  const exitDrainMs = opts.exitDrainMs ?? 250
  const hostKey = loadHostKey(opts.hostKey)
  let authorized: AuthorizedKey[] = parseAuthorizedKeys(opts.authorizedKeys)

  const sockets = new Set<Socket>()
  const connections = new Set<Connection>()
  let closing = false

  const sshServer = new Server({ hostKeys: [hostKey.privateKey] })
  sshServer.on('error', (err: Error) => { log.warn({ err }, 'sandbox-sshd server error') })
  sshServer.on('connection', (conn, info) => {
    const connLog = log.child({ remote: `${info.ip}:${info.port}` })
    if (closing) {
      conn.end()
      return
    }
    connections.add(conn)
    const runs = new Set<Pick<Run, 'abort'>>()
    // Pre-auth failures (bad packets, handshake errors) land here too; none may crash us.
    conn.on('error', (err: Error) => { connLog.debug({ err }, 'ssh connection error') })
    conn.on('authentication', (ctx) => {
      if (authenticate(ctx, authorized)) connLog.debug({ user: ctx.username }, 'ssh client authenticated')
    })
    conn.on('session', (accept) => {
      const session = accept()
      serveSession(session, {
        exitDrainMs,
        logger: connLog,
        keeper: opts.keeper,
        track: (run) => {
          runs.add(run)
          return () => { runs.delete(run) }
        }
      })
    })
    conn.once('close', () => {
      connections.delete(conn)
      for (const run of [...runs]) run.abort('connection closed')
      connLog.debug('ssh connection closed')
    })
  })

  const tcp = createServer((socket) => {
    socket.on('error', (err) => { log.debug({ err }, 'sandbox-sshd socket error') })
    if (closing) {
      socket.destroy()
      return
    }
    socket.setNoDelay(true)
    sockets.add(socket)
    socket.once('close', () => { sockets.delete(socket) })
    sshServer.injectSocket(socket)
  })

  await new Promise<void>((resolve, reject) => {
    tcp.once('error', reject)
    tcp.listen(opts.port ?? 0, opts.host ?? '127.0.0.1', () => {
      tcp.removeListener('error', reject)
      resolve()
    })
  })
  tcp.on('error', (err) => { log.warn({ err }, 'sandbox-sshd listener error') })
  const address = tcp.address() as AddressInfo
  log.debug({ host: address.address, port: address.port }, 'sandbox-sshd listening')

  let closed: Promise<void> | undefined
  const close = async (): Promise<void> => {
    closing = true
    const listenerClosed = new Promise<void>((resolve) => { tcp.close(() => { resolve() }) })
    for (const conn of connections) conn.end()
    // Sockets still in the handshake have no SSH connection to end yet.
    for (const socket of sockets) socket.end()
    // Connections get the bound to go away after the DISCONNECT, then are destroyed; the
    // listener gets as long again to report closed.
    await closeWithin(EMBEDDED_SSHD_CLOSE_MS, () => allClosed(sockets), () => { for (const socket of sockets) socket.destroy() })
    await closeWithin(EMBEDDED_SSHD_CLOSE_MS, () => listenerClosed, () => { log.debug('sandbox-sshd listener did not report closed; going on') })
  }

  return {
    host: address.address,
    port: address.port,
    hostPublicKey: hostKey.publicKey,
    setAuthorizedKeys (keys: string[]): void {
      authorized = parseAuthorizedKeys(keys)
    },
    close (): Promise<void> {
      closed ??= close()
      return closed
    }
  }
}

function allClosed (sockets: Set<Socket>): Promise<void> {
  return Promise.all([...sockets].map((socket) => new Promise<void>((resolve) => {
    if (socket.closed) resolve()
    else socket.once('close', () => { resolve() })
  }))).then(() => {})
}
