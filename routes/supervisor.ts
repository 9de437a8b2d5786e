import http2, { type Http2Session, type ServerHttp2Stream, type IncomingHttpHeaders } from 'node:http2'
import type { Socket } from 'node:net'
import { randomUUID } from 'node:crypto'
import type { Logger } from 'pino'
import { H2Pinger } from '../src/relay/h2-ping.js'
import type { SessionRegistry, SupervisorSession } from '../src/relay/sessions.js'
import {
  H2_CONNECTION_WINDOW, H2_STREAM_WINDOW, NdjsonDecoder, RELAY_PATH_PREFIX, SESSION_PATH,
  type GatewayMessage, type SupervisorMessage
} from '../src/relay/protocol.js'
import { verifySupervisorToken } from '../src/tokens.js'
import type { TlsMaterial } from '../src/credentials.js'

// The supervisor listener. Plain node:http2 rather than Fastify: relays need the raw
// Http2Stream as an ssh2 socket and the Http2Session for PINGs, and Fastify's compat layer
// would time out idle sessions that legitimately carry hours of silence.

export interface SupervisorServerOptions {
  registry: SessionRegistry
  // Read per request: a rotation (SIGHUP) replaces them.
  tokenSecrets: () => readonly Buffer[]
  // HTTP/2 over TLS when given (h2c otherwise).
  tls?: TlsMaterial | undefined
  gatewayPublicKey: string
  heartbeatIntervalMs: number
  pingIntervalMs: number
  pingTimeoutMs: number
  logger: Logger
  onPingRtt?: (ms: number) => void
}

interface ConnState { pinger: H2Pinger, sessions: Set<SupervisorSession> }

export interface SupervisorServer {
  server: http2.Http2Server | http2.Http2SecureServer
  // Shutdown: GOAWAY to every supervisor connection, then cut what has not gone within graceMs.
  closeAll: (graceMs: number) => Promise<void>
  // Ends the sessions whose token is no longer accepted (secret retired, token expired).
  closeRevoked: () => number
}

export function createSupervisorServer (opts: SupervisorServerOptions): SupervisorServer {
  const log = opts.logger
  const conns = new WeakMap<Http2Session, ConnState>()
  const live = new Set<Http2Session>()
  // Every open session, with a check of the token it was opened with that ends the session when
  // the token is no longer accepted (returns true then).
  const tokenChecks = new Map<SupervisorSession, () => boolean>()
  const h2Options = {
    settings: { initialWindowSize: H2_STREAM_WINDOW, maxConcurrentStreams: 100000 },
    maxSessionMemory: 256
  }
  const server = opts.tls === undefined
    ? http2.createServer(h2Options)
    // HTTP/2 only: a supervisor that cannot negotiate h2 by ALPN is refused in the handshake.
    : http2.createSecureServer({ ...h2Options, cert: opts.tls.cert, key: opts.tls.key, allowHTTP1: false, minVersion: 'TLSv1.2' })

  // The TCP connection (before any TLS): every relay on it carries SSH, so small packets must
  // not wait for Nagle.
  server.on('connection', (socket: Socket) => {
    socket.setNoDelay(true)
    socket.on('error', (err) => log.debug({ err }, 'supervisor socket error'))
  })
  server.on('tlsClientError', (err: Error) => log.warn({ err: err.message }, 'supervisor TLS handshake failed'))

  server.on('session', (session: Http2Session) => {
    session.on('error', (err) => log.debug({ err }, 'supervisor connection error'))
    session.on('localSettings', () => {
      try { session.setLocalWindowSize(H2_CONNECTION_WINDOW) } catch { /* session already closing */ }
    })
    const pinger = new H2Pinger(session, {
      intervalMs: opts.pingIntervalMs,
      timeoutMs: opts.pingTimeoutMs,
      onDead: (reason) => {
        log.warn({ reason }, 'supervisor connection is dead; destroying it')
        // Deferred: destroying from inside a PING callback re-enters nghttp2 (see supervisor/agent.ts).
        setImmediate(() => session.destroy())
      },
      ...(opts.onPingRtt === undefined ? {} : { onRtt: opts.onPingRtt })
    })
    conns.set(session, { pinger, sessions: new Set() })
    live.add(session)
    session.once('close', () => { pinger.stop(); live.delete(session) })
  })

  server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
    stream.on('error', (err) => log.debug({ err }, 'supervisor stream error'))
    const conn = conns.get(stream.session!)
    conn?.pinger.touch()
    const path = String(headers[':path'] ?? '')
    const auth = String(headers.authorization ?? '')
    const token = auth.startsWith('Bearer ') ? auth.slice(7).trim() : ''
    const check = verifySupervisorToken(opts.tokenSecrets(), token)
    if (!check.ok) {
      // The token itself is never logged.
      log.warn({ path, reason: check.reason, remoteAddress: stream.session?.socket?.remoteAddress }, 'supervisor request refused')
      reject(stream, 401, 'unauthenticated', `supervisor token refused: ${check.reason}`)
      return
    }
    if (headers[':method'] !== 'POST') { reject(stream, 405, 'method_not_allowed', 'use POST'); return }
    if (path === SESSION_PATH) { openSession(stream, check.sandboxId, conn, token); return }
    if (path.startsWith(RELAY_PATH_PREFIX)) {
      const relayId = path.slice(RELAY_PATH_PREFIX.length)
      // The token's sandbox must own the relay: a supervisor can only serve its own sandbox.
      stream.respond({ ':status': 200, 'content-type': 'application/octet-stream' })
      if (!opts.registry.claimRelay(relayId, check.sandboxId, stream)) {
        log.warn({ sandboxId: check.sandboxId, relayId: relayId.slice(0, 64) }, 'relay claim refused: no such relay pending for this sandbox')
        stream.close(http2.constants.NGHTTP2_REFUSED_STREAM)
      }
      return
    }
    reject(stream, 404, 'not_found', `no supervisor route ${path}`)
  })

  function openSession (stream: ServerHttp2Stream, sandboxId: string, conn: ConnState | undefined, token: string): void {
    let sessionInstance: string | undefined
    const session: SupervisorSession = {
      id: randomUUID(),
      sandboxId,
      get instanceId () { return sessionInstance },
      connectedAt: new Date(),
      send: (msg: GatewayMessage) => {
        if (stream.destroyed || stream.closed || !stream.writable) return false
        stream.write(JSON.stringify(msg) + '\n')
        return true
      },
      close: (reason: string) => {
        log.info({ sandboxId, sessionId: session.id, reason }, 'closing supervisor session')
        // Called from another stream's data callback (a newer hello): end on the next turn.
        setImmediate(() => { if (!stream.destroyed) stream.end() })
        // A session that does not go away after end() is cut off.
        const t = setTimeout(() => stream.destroy(), 2000)
        t.unref()
        stream.once('close', () => clearTimeout(t))
      }
    }
    const slog = log.child({ sandboxId, sessionId: session.id })
    stream.respond({ ':status': 200, 'content-type': 'application/x-ndjson' })
    // A session lives no longer than its token: an expired token (or a retired secret) ends it,
    // and the supervisor's reconnect is then refused, so the sandbox shows as disconnected.
    const revokeIfRefused = (): boolean => {
      const c = verifySupervisorToken(opts.tokenSecrets(), token)
      if (!c.ok) revoke(session, stream, c.reason)
      return !c.ok
    }
    tokenChecks.set(session, revokeIfRefused)
    const heartbeat = setInterval(() => {
      if (!revokeIfRefused()) session.send({ type: 'heartbeat' })
    }, opts.heartbeatIntervalMs)
    heartbeat.unref()
    let registered = false
    const decoder = new NdjsonDecoder()
    stream.on('data', (chunk: Buffer) => {
      conn?.pinger.touch()
      opts.registry.touch(sandboxId)
      decoder.push(chunk, (raw) => {
        const msg = raw as SupervisorMessage
        if (msg.type === 'hello' && !registered) {
          const instanceId = typeof msg.instanceId === 'string' ? msg.instanceId.slice(0, 128) : undefined
          if (!opts.registry.mayRegister(sandboxId, instanceId)) {
            slog.warn({ instanceId }, 'refusing a superseded supervisor while the newer one is connected')
            session.send({ type: 'rejected', reason: 'superseded: a newer supervisor process serves this sandbox' })
            stream.end()
            return
          }
          registered = true
          sessionInstance = instanceId
          conn?.sessions.add(session)
          session.send({
            type: 'accepted',
            sessionId: session.id,
            heartbeatIntervalMs: opts.heartbeatIntervalMs,
            pingIntervalMs: opts.pingIntervalMs,
            pingTimeoutMs: opts.pingTimeoutMs,
            gatewayPublicKey: opts.gatewayPublicKey
          })
          opts.registry.register(session, {
            sshHostKey: typeof msg.sshHostKey === 'string' ? msg.sshHostKey : undefined,
            sshUser: typeof msg.sshUser === 'string' ? msg.sshUser : undefined
          })
          slog.info('supervisor session registered')
        } else if (msg.type === 'relay_failed' && typeof msg.relayId === 'string') {
          opts.registry.failRelay(msg.relayId, sandboxId, String(msg.reason ?? 'unknown error'))
        }
      }, (line) => slog.warn({ line: line.slice(0, 200) }, 'bad message from supervisor'))
    })
    const end = (): void => {
      clearInterval(heartbeat)
      tokenChecks.delete(session)
      conn?.sessions.delete(session)
      if (registered) {
        opts.registry.unregister(session)
        slog.info('supervisor session ended')
      }
    }
    stream.once('close', end)
    stream.on('end', () => { if (!stream.destroyed) stream.end() })
  }

  function revoke (session: SupervisorSession, stream: ServerHttp2Stream, reason: string): void {
    log.warn({ sandboxId: session.sandboxId, sessionId: session.id, reason }, 'ending a supervisor session: its token is no longer accepted')
    session.send({ type: 'rejected', reason: `supervisor token no longer accepted: ${reason}` })
    tokenChecks.delete(session)
    // The whole connection goes: its relays (and the warm SSH connections over them) were
    // opened on the same token's authority.
    const conn = stream.session
    setImmediate(() => conn?.destroy())
  }

  const closeRevoked = (): number => [...tokenChecks.values()].filter((revokeIfRefused) => revokeIfRefused()).length

  const closeAll = async (graceMs: number): Promise<void> => {
    const closed = new Promise<void>((resolve) => server.close(() => resolve()))
    for (const s of live) { try { s.close() } catch { /* already closing */ } }
    await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, graceMs).unref())])
    for (const s of live) s.destroy()
    await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, 200).unref())])
  }

  return { server, closeAll, closeRevoked }
}

function reject (stream: ServerHttp2Stream, status: number, code: string, detail: string): void {
  if (stream.destroyed) return
  stream.respond({ ':status': status, 'content-type': 'application/problem+json' })
  stream.end(JSON.stringify({ type: 'about:blank', title: code, status, detail, code }))
}
