import http2, { type Http2Session, type ServerHttp2Stream, type IncomingHttpHeaders } from 'node:http2'
import type { Socket } from 'node:net'
import type { Logger } from 'pino'
import { H2Pinger } from '../relay/h2-ping.js'
import type { SessionRegistry } from '../relay/sessions.js'
import { H2_CONNECTION_WINDOW, H2_STREAM_WINDOW, RELAY_PATH_PREFIX, SESSION_PATH } from '../relay/protocol.js'
import type { Refusals, RefusalReason } from '../refusals.js'
import { problem, type Problem } from '../errors.js'
import { verifySupervisorToken } from '../tokens.js'
import type { TlsMaterial } from '../credentials.js'
import type { GatewayEvents } from '../diagnostics.js'
import { SESSION_END_GRACE_MS, SUPERVISOR_LISTENER_CLOSE_MS } from '../lifecycle/bounds.js'
import { closeWithin } from '../lifecycle/close-within.js'
import { KeyedBuckets, TokenBucket } from './budget.js'
import { ConnectionTable, type Conn, type ConnectionLimits } from './connections.js'
import { SessionMachine } from './session.js'

// The supervisor listener. Plain node:http2 rather than Fastify: relays need the raw
// Http2Stream as an ssh2 socket and the Http2Session for PINGs, and Fastify's compat layer
// would time out idle sessions that legitimately carry hours of silence.
//
// Every peer is presumed hostile until it shows a valid token, and even then it speaks only
// for its own sandbox, whose code may own it. Connections and their budgets are kept in
// connections.ts, sessions in session.ts; this file routes streams. Every refusal goes through
// Refusals, which counts it and logs at a rate no sandbox can raise.

interface SupervisorLimits extends ConnectionLimits {
  supervisorMaxStreamsPerConnection: number
  sessionLineMaxBytes: number
  sessionMessagesPerSecond: number
  // Lifecycle log lines (session registered, ended, connection dead) per sandbox per minute.
  sandboxLogLinesPerMinute: number
}

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
  refusals: Refusals
  limits: SupervisorLimits
  // PING round trips are published here.
  events: GatewayEvents
}

export interface SupervisorServer {
  server: http2.Http2Server | http2.Http2SecureServer
  // Shutdown: GOAWAY to every supervisor connection, then cut what has not gone within graceMs.
  closeAll: (graceMs: number) => Promise<void>
  // Ends the sessions whose token is no longer accepted (secret retired, token expired).
  closeRevoked: () => number
}

export function createSupervisorServer (opts: SupervisorServerOptions): SupervisorServer {
  const log = opts.logger
  const lim = opts.limits
  const refusals = opts.refusals
  // Assigned once the server exists, below; no connection arrives before.
  let setMaxConnections = (_n: number): void => {}
  const conns = new ConnectionTable(lim, refusals, (n) => setMaxConnections(n))
  const sessions = new Set<SessionMachine>()
  const sessionStreams = new Map<string, number>()
  const messageBuckets = new KeyedBuckets(() => new TokenBucket(2 * lim.sessionMessagesPerSecond, lim.sessionMessagesPerSecond))
  const lifecycleLines = new KeyedBuckets(() => new TokenBucket(lim.sandboxLogLinesPerMinute, lim.sandboxLogLinesPerMinute / 60))
  const info = (sandboxId: string | undefined, fields: Record<string, unknown>, message: string): void => {
    if (lifecycleLines.take(sandboxId ?? '')) log.info({ sandboxId, ...fields }, message)
    else log.debug({ sandboxId, ...fields }, message)
  }

  const h2Options = {
    settings: {
      initialWindowSize: H2_STREAM_WINDOW,
      maxConcurrentStreams: lim.supervisorMaxStreamsPerConnection,
      // A supervisor's request headers are a path and a token of ~100 bytes.
      maxHeaderListSize: 16 * 1024
    },
    maxHeaderListPairs: 32,
    maxSettings: 16,
    maxOutstandingPings: 4,
    maxSessionInvalidFrames: 64,
    maxSessionRejectedStreams: 64,
    // Megabytes of nghttp2 state and unread inbound data per connection, beyond which new
    // streams are refused: the connection window (32 MiB) bounds what relays may have unread,
    // so this leaves room for it and the header tables, and no more.
    maxSessionMemory: 64,
    // TLS: a peer that never finishes the handshake, or negotiates no h2, is dropped at the
    // auth deadline (the auth timer also covers it, for h2c and TLS alike).
    unknownProtocolTimeout: lim.supervisorAuthTimeoutMs
  }
  const server = opts.tls === undefined
    ? http2.createServer(h2Options)
    // HTTP/2 only: a supervisor that cannot negotiate h2 by ALPN is refused in the handshake.
    : http2.createSecureServer({ ...h2Options, cert: opts.tls.cert, key: opts.tls.key, allowHTTP1: false, minVersion: 'TLSv1.2', handshakeTimeout: lim.supervisorAuthTimeoutMs })

  setMaxConnections = (n) => { server.maxConnections = n }
  setMaxConnections(lim.maxUnauthenticatedConnections)
  server.on('drop', (data?: { remoteAddress?: string }) => conns.dropped(data?.remoteAddress))

  // The raw TCP connection, before any TLS and before http2 makes a session of it (hence
  // prepended). Every relay on it carries SSH, so small packets must not wait for Nagle.
  server.prependListener('connection', (socket: Socket) => {
    socket.setNoDelay(true)
    socket.on('error', (err) => log.debug({ err: err.message }, 'supervisor socket error'))
    conns.admit(socket)
  })
  server.on('tlsClientError', (err: Error & { code?: string }) => {
    refusals.refuse('unauthenticated', undefined, 'supervisor TLS handshake failed', { code: String(err.code ?? '').slice(0, 64) })
  })

  server.on('session', (session: Http2Session) => {
    session.on('error', (err) => log.debug({ err: err.message }, 'supervisor connection error'))
    const conn = conns.of(session)
    if (conn === undefined || conn.closing) { session.destroy(); return }
    conn.session = session
    session.on('localSettings', () => {
      try { session.setLocalWindowSize(H2_CONNECTION_WINDOW) } catch { /* session already closing */ }
    })
    session.on('ping', () => conns.controlFrame(conn))
    session.on('remoteSettings', () => conns.controlFrame(conn))
    conn.pinger = new H2Pinger(session, {
      intervalMs: opts.pingIntervalMs,
      timeoutMs: opts.pingTimeoutMs,
      onDead: (reason) => {
        info(conn.sandboxId, { reason }, 'supervisor connection is dead; destroying it')
        // Deferred: destroying from inside a PING callback re-enters nghttp2 (see supervisor/agent.ts).
        setImmediate(() => { session.destroy(); conn.socket.destroy() })
      },
      onRtt: (ms) => opts.events.pingRtt({ seconds: ms / 1000 })
    })
    session.once('close', () => { conn.pinger?.stop(); conn.socket.destroy() })
  })

  server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
    stream.on('error', (err) => log.debug({ err: err.message }, 'supervisor stream error'))
    try {
      onStream(stream, headers)
    } catch (err) {
      // Nothing a peer sends may take the process down; the stream goes, the listener stays.
      const conn = stream.session === undefined ? undefined : conns.of(stream.session)
      refusals.refuse('handler_error', conn?.sandboxId, 'supervisor stream handler failed', { error: err instanceof Error ? err.message.slice(0, 200) : typeof err })
      try { stream.destroy() } catch { /* already gone */ }
    }
  })

  function onStream (stream: ServerHttp2Stream, headers: IncomingHttpHeaders): void {
    const conn = stream.session === undefined ? undefined : conns.of(stream.session)
    // A connection being closed is destroyed on the next turn with every stream on it; a
    // RST_STREAM per stream until then would only cost us (a flood's batch holds hundreds).
    if (conn === undefined || conn.closing) return
    conn.pinger?.touch()
    conn.streams++
    conn.seenStreams++
    stream.once('close', () => { conn.streams-- })
    if (conn.streams > lim.supervisorMaxStreamsPerConnection) {
      refuseStream(conn, stream, 'stream_limit', conn.sandboxId, 'supervisor stream refused: too many streams on the connection', { limit: lim.supervisorMaxStreamsPerConnection })
      return
    }
    const path = typeof headers[':path'] === 'string' ? headers[':path'] : ''
    const auth = typeof headers.authorization === 'string' ? headers.authorization : ''
    const token = auth.startsWith('Bearer ') ? auth.slice(7).trim() : ''
    const check = verifySupervisorToken(opts.tokenSecrets(), token)
    if (!check.ok) {
      // The token itself is never logged; `reason` is one of the verifier's fixed phrases.
      refuseStream(conn, stream, 'unauthenticated', conn.sandboxId, 'supervisor request refused', { reason: check.reason, pathBytes: path.length, remoteAddress: conn.remoteAddress },
        problem('unauthenticated', `supervisor token refused: ${check.reason}`))
      return
    }
    const sandboxId = check.sandboxId
    if (conn.sandboxId === undefined) {
      if (!conns.authenticate(conn, sandboxId)) {
        refuseStream(conn, stream, 'sandbox_connections', sandboxId, 'supervisor connection refused: too many connections for the sandbox', { limit: lim.maxSessionStreamsPerSandbox },
          problem('too_many_requests', `sandbox ${sandboxId} already holds ${lim.maxSessionStreamsPerSandbox} connections`))
        conns.close(conn, 'sandbox_connections', 'supervisor connection closed: too many connections for the sandbox', { limit: lim.maxSessionStreamsPerSandbox })
        return
      }
    } else if (conn.sandboxId !== sandboxId) {
      refuseStream(conn, stream, 'unauthenticated', conn.sandboxId, 'supervisor request refused: a token for another sandbox on this connection', {},
        problem('permission_denied', 'this connection speaks for another sandbox'))
      return
    }
    if (headers[':method'] !== 'POST') {
      refuseStream(conn, stream, 'unknown_route', sandboxId, 'supervisor request refused: not a POST', {}, problem('method_not_allowed', 'use POST'))
      return
    }
    if (path === SESSION_PATH) { openSession(conn, stream, sandboxId, token); return }
    if (path.startsWith(RELAY_PATH_PREFIX)) {
      const relayId = path.slice(RELAY_PATH_PREFIX.length)
      // The token's sandbox must own the relay: a supervisor can only serve its own sandbox.
      stream.respond({ ':status': 200, 'content-type': 'application/octet-stream' })
      if (relayId.length > 64 || !opts.registry.claimRelay(relayId, sandboxId, stream)) {
        refuseStream(conn, stream, 'unclaimed_relay', sandboxId, 'relay claim refused: no such relay pending for this sandbox', { relayIdBytes: relayId.length })
      }
      return
    }
    refuseStream(conn, stream, 'unknown_route', sandboxId, 'supervisor request refused: no such route', { pathBytes: path.length },
      problem('not_found', 'no such supervisor route'))
  }

  function openSession (conn: Conn, stream: ServerHttp2Stream, sandboxId: string, token: string): void {
    const open = sessionStreams.get(sandboxId) ?? 0
    if (open >= lim.maxSessionStreamsPerSandbox) {
      refuseStream(conn, stream, 'session_streams', sandboxId, 'supervisor session refused: too many session streams for the sandbox', { limit: lim.maxSessionStreamsPerSandbox },
        problem('too_many_requests', `sandbox ${sandboxId} already holds ${open} session streams`))
      return
    }
    // Opening a session costs what a message does: a sandbox that opens and drops sessions in
    // a loop is held to the message rate like one that floods a session with lines.
    const messages = messageBuckets.get(sandboxId)
    if (!messages.take()) {
      refuseStream(conn, stream, 'message_rate', sandboxId, 'supervisor session refused: sessions opened over the message rate', { perSecond: lim.sessionMessagesPerSecond },
        problem('too_many_requests', 'sessions opened over the message rate'))
      return
    }
    sessionStreams.set(sandboxId, open + 1)
    stream.respond({ ':status': 200, 'content-type': 'application/x-ndjson' })
    let endTimer: NodeJS.Timeout | undefined
    let endedByUs = false
    const machine = new SessionMachine({
      sandboxId,
      registry: opts.registry,
      refuse: (reason, key, message, fields) => refusals.refuse(reason, key, message, fields),
      logger: log,
      info: (fields, message) => info(sandboxId, fields, message),
      heartbeatIntervalMs: opts.heartbeatIntervalMs,
      pingIntervalMs: opts.pingIntervalMs,
      pingTimeoutMs: opts.pingTimeoutMs,
      gatewayPublicKey: opts.gatewayPublicKey,
      lineMaxBytes: lim.sessionLineMaxBytes,
      messages,
      tokenRefusal: () => {
        const c = verifySupervisorToken(opts.tokenSecrets(), token)
        return c.ok ? undefined : c.reason
      },
      onRevoked: () => { setImmediate(() => { conn.session?.destroy(); conn.socket.destroy() }) },
      transport: {
        write: (line) => {
          if (stream.destroyed || stream.closed || !stream.writable) return false
          stream.write(line)
          return true
        },
        pendingBytes: () => stream.writableLength,
        end: () => {
          endedByUs = true
          // Often called from inside another stream's callback (a newer hello): the next turn.
          // Once our last line is out, RST_STREAM NO_ERROR: the session is over whatever the
          // peer still sends; a peer that does not read is cut off at the grace.
          setImmediate(() => {
            if (stream.destroyed) return
            stream.end(() => { if (!stream.destroyed && !stream.closed) stream.close(http2.constants.NGHTTP2_NO_ERROR) })
          })
          endTimer ??= setTimeout(() => stream.destroy(), SESSION_END_GRACE_MS)
          endTimer.unref()
        }
      }
    })
    sessions.add(machine)
    // A session the peer resets before its hello (rapid reset: HEADERS then RST_STREAM, over
    // and over) cost us what a refused stream does, so it spends the same budget. nghttp2's
    // own limit (1000 at once) stops reading the connection without closing it; this comes
    // first. Every other stream is either refused (and spent) or a relay someone asked for.
    stream.once('aborted', () => {
      if (endedByUs || machine.state !== 'awaiting_hello' || conn.closing || conn.socket.destroyed || conn.session?.destroyed === true) return
      conns.spend(conn)
    })
    stream.on('data', (chunk: Buffer) => {
      conn.pinger?.touch()
      machine.push(chunk)
    })
    stream.once('close', () => {
      clearTimeout(endTimer)
      sessions.delete(machine)
      const n = (sessionStreams.get(sandboxId) ?? 1) - 1
      if (n <= 0) sessionStreams.delete(sandboxId)
      else sessionStreams.set(sandboxId, n)
      machine.closed()
    })
    stream.on('end', () => { if (!stream.destroyed) stream.end() })
  }

  // Refuses one stream (a problem response when one is given, otherwise RST_STREAM
  // REFUSED_STREAM) and spends from the refused-stream budget.
  function refuseStream (conn: Conn, stream: ServerHttp2Stream, reason: RefusalReason, sandboxId: string | undefined, message: string,
    fields: Record<string, unknown>, answer?: Problem): void {
    refusals.refuse(reason, sandboxId, message, fields)
    if (answer === undefined || stream.headersSent) stream.close(http2.constants.NGHTTP2_REFUSED_STREAM)
    else respondProblem(stream, answer)
    conns.spend(conn)
  }

  const closeRevoked = (): number => [...sessions].filter((m) => m.checkToken()).length

  const closeAll = async (graceMs: number): Promise<void> => {
    const closed = new Promise<void>((resolve) => server.close(() => resolve()))
    conns.stop()
    for (const c of conns.all) {
      if (c.session === undefined) c.socket.destroy()
      else { try { c.session.close() } catch { /* already closing */ } }
    }
    await closeWithin(graceMs, () => closed, async () => {
      for (const c of conns.all) { c.session?.destroy(); c.socket.destroy() }
      await closeWithin(SUPERVISOR_LISTENER_CLOSE_MS, () => closed, () => log.debug('supervisor listener did not report closed; going on'))
    })
  }

  return { server, closeAll, closeRevoked }
}

// The body comes from problem() like every other listener's: the same code, status and title.
function respondProblem (stream: ServerHttp2Stream, p: Problem): void {
  if (stream.destroyed || stream.closed) return
  stream.respond({ ':status': p.status, 'content-type': 'application/problem+json' })
  // The request body is not wanted: once the answer is out, RST_STREAM NO_ERROR tells the
  // peer to stop sending (RFC 9113 §8.1), so an unread body cannot sit in our buffers.
  stream.end(JSON.stringify(p), () => {
    if (!stream.destroyed && !stream.closed) stream.close(http2.constants.NGHTTP2_NO_ERROR)
  })
}
