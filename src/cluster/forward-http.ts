import { Agent as HttpAgent, request as httpRequest, type ClientRequest, type IncomingMessage, type OutgoingHttpHeaders } from 'node:http'
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https'
import { pipeline } from 'node:stream'
import type { FastifyReply, FastifyRequest } from 'fastify'
import {
  endToEndHeaders, FORWARDED_BY_HEADER, forwardRequestHeaders, isForwarded, EXEC_MOVED_HEADER, NOT_OWNER_HEADER, replicaUnavailable,
  type ForwardIdentity, type ForwardProblem
} from './forward-headers.js'

// Forwards one public API request to the replica that owns its sandbox or exec and streams the
// answer back as it is produced. node:http rather than @fastify/reply-from: the two failure
// cases need different endings (a problem before the owner answered, a destroyed connection
// after), reply-from answers both with its own error reply; and the response is piped as-is,
// so SSE and NDJSON events pass the moment the owner writes them, with no new dependency.

export interface ForwardHttpOptions extends ForwardIdentity {
  // The owner's internal listener, e.g. http://10.0.0.7:8082; the request's path and query are
  // sent as they came.
  targetBaseUrl: string
  // Bounds the TCP (and TLS) connect only: the owner's answer to ?wait=true may take minutes
  // and is bounded by the owner itself.
  connectTimeoutMs?: number
  // Default: one without keep-alive, so a POST never lands on a socket the owner is closing
  // (which would fail it with no way to tell whether the owner saw it).
  agent?: HttpAgent
  // The problem to answer with when the owner cannot be reached; default replicaUnavailable.
  unavailable?: (detail: string) => ForwardProblem
  // Told the exec id of an 'exec-moved' outcome.
  onExecMoved?: (execId: string) => void
}

export type ForwardOutcome =
  // The owner's answer was relayed to its end.
  | 'relayed'
  // A problem was sent because the owner could not be reached (or the request was forwarded
  // already).
  | 'unavailable'
  // The client left, or the owner's answer broke off: the client connection was destroyed.
  | 'aborted'
  // The target no longer owns the sandbox and created nothing (NOT_OWNER_HEADER): nothing was
  // sent to the client, the caller may look for the owner again.
  | 'moved'
  // The target's ?wait=true exec moved on (EXEC_MOVED_HEADER): nothing was sent to the client,
  // the caller waits for that exec where it is now (ForwardHttpOptions.onExecMoved has its id).
  | 'exec-moved'

const DEFAULT_CONNECT_TIMEOUT_MS = 5000
const plainAgent = new HttpAgent({ keepAlive: false })
const tlsAgent = new HttpsAgent({ keepAlive: false })

// The body to send: the client's bytes when nothing read them yet (forwarding from an
// onRequest hook), else what Fastify parsed, serialised again (JSON.parse then JSON.stringify
// keeps every value the schemas accept: strings exactly, numbers within 2^53).
function bodyOf (request: FastifyRequest): Buffer | 'stream' | undefined {
  const body = request.body
  if (body === undefined || body === null) {
    const h = request.headers
    const declared = h['transfer-encoding'] !== undefined || (h['content-length'] !== undefined && h['content-length'] !== '0')
    return declared && !request.raw.readableEnded && request.raw.readableFlowing === null ? 'stream' : undefined
  }
  if (Buffer.isBuffer(body)) return body
  if (typeof body === 'string') return Buffer.from(body)
  return Buffer.from(JSON.stringify(body))
}

export async function forwardHttp (request: FastifyRequest, reply: FastifyReply, opts: ForwardHttpOptions): Promise<ForwardOutcome> {
  const unavailable = opts.unavailable ?? replicaUnavailable
  const refuse = (detail: string): ForwardOutcome => {
    const p = unavailable(detail)
    if (!reply.raw.destroyed) void reply.code(p.status).type('application/problem+json').send(p)
    return 'unavailable'
  }
  if (isForwarded(request.headers)) {
    return refuse(`this request was already forwarded by replica ${String(request.headers[FORWARDED_BY_HEADER])}; replicas do not forward a request twice (the sandbox's owner is changing: retry)`)
  }
  // Gone before we started: its 'close' has passed, so nothing would end the owner's work.
  if (reply.raw.destroyed || request.raw.socket.destroyed) return 'aborted'
  const target = new URL(opts.targetBaseUrl)
  const tls = target.protocol === 'https:'
  const body = bodyOf(request)
  // This replica already answered any Expect: 100-continue.
  const headers: OutgoingHttpHeaders = forwardRequestHeaders(request.raw, opts, body === 'stream' ? ['expect'] : ['expect', 'content-length'])
  if (Buffer.isBuffer(body)) headers['content-length'] = String(body.length)

  return await new Promise<ForwardOutcome>((resolve) => {
    let settled = false
    let connectTimer: NodeJS.Timeout | undefined
    const settle = (outcome: ForwardOutcome): void => {
      if (settled) return
      settled = true
      clearTimeout(connectTimer)
      reply.raw.off('close', onClientClose)
      resolve(outcome)
    }
    const upstream: ClientRequest = (tls ? httpsRequest : httpRequest)({
      protocol: target.protocol,
      hostname: target.hostname.replace(/^\[|\]$/g, ''),
      port: target.port,
      method: request.method,
      path: request.url,
      headers,
      agent: opts.agent ?? (tls ? tlsAgent : plainAgent)
    })
    // The client went away before the answer ended: nothing may keep the owner working for it.
    const onClientClose = (): void => {
      if (reply.raw.writableFinished) return
      upstream.destroy()
      settle('aborted')
    }
    reply.raw.on('close', onClientClose)
    upstream.on('socket', (socket) => {
      if (!socket.connecting) return
      connectTimer = setTimeout(() => upstream.destroy(new Error(`no connection within ${opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS} ms`)), opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS)
      socket.once(tls ? 'secureConnect' : 'connect', () => clearTimeout(connectTimer))
    })
    upstream.on('error', (err) => {
      if (settled) return
      // Before the owner's status line: nothing was sent to the client yet.
      settle(refuse(`the replica that owns this request (${target.host}) cannot be reached: ${err.message}`))
    })
    upstream.on('response', (res: IncomingMessage) => {
      if (settled) { res.destroy(); return }
      if (res.statusCode === 503 && res.headers[NOT_OWNER_HEADER] !== undefined) {
        res.resume()
        settle('moved')
        return
      }
      const movedExec = res.headers[EXEC_MOVED_HEADER]
      if (res.statusCode === 503 && typeof movedExec === 'string' && opts.onExecMoved !== undefined) {
        res.resume()
        opts.onExecMoved(movedExec)
        settle('exec-moved')
        return
      }
      // From here the answer is the owner's; a break in it must reach the client as a break.
      reply.hijack()
      const out = reply.raw
      out.writeHead(res.statusCode ?? 502, res.statusMessage, endToEndHeaders(res.headers))
      // Headers now, not with the first body chunk: an SSE client sees the stream open at once.
      out.flushHeaders()
      upstream.removeAllListeners('error')
      upstream.on('error', () => {})
      pipeline(res, out, (err) => {
        if (err === undefined || err === null) { settle('relayed'); return }
        out.destroy()
        upstream.destroy()
        settle('aborted')
      })
    })
    if (body === 'stream') {
      // pipe, not pipeline: a failed upstream must leave the client's socket alive for the 503.
      request.raw.on('error', (err) => upstream.destroy(err))
      request.raw.pipe(upstream)
    } else {
      upstream.end(body)
    }
  })
}
