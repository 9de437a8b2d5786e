import type { IncomingHttpHeaders } from 'node:http'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { problem } from '../errors.js'
import { isLoopbackHost } from '../config.js'
import { matchesApiToken } from '../tokens.js'
import { sendProblem } from './errors-plugin.js'

// Who may call the API. With tokens: a bearer token on every /v1 route (browsers may offer it
// as a WebSocket subprotocol instead). Without tokens the listener is loopback-only, and a web
// page the user happens to visit must not be able to drive it: foreign Host headers (DNS
// rebinding) and foreign Origins on state-changing requests and upgrades are refused.

export const BEARER_SUBPROTOCOL_PREFIX = 'exec-gateway.bearer.'

function offeredSubprotocols (headers: IncomingHttpHeaders): string[] {
  const raw = headers['sec-websocket-protocol']
  if (raw === undefined) return []
  return String(raw).split(',').map((s) => s.trim()).filter((s) => s !== '')
}

function tokenFrom (headers: IncomingHttpHeaders): string | undefined {
  const auth = headers.authorization
  if (typeof auth === 'string' && auth.startsWith('Bearer ')) return auth.slice(7).trim()
  for (const p of offeredSubprotocols(headers)) {
    if (p.startsWith(BEARER_SUBPROTOCOL_PREFIX)) {
      return Buffer.from(p.slice(BEARER_SUBPROTOCOL_PREFIX.length), 'base64url').toString()
    }
  }
  return undefined
}

function hostName (hostHeader: string): string {
  const m = /^(\[[^\]]+\]|[^:]+)(?::\d+)?$/.exec(hostHeader)
  return m === null ? hostHeader : m[1]!
}

declare module 'fastify' {
  interface FastifyContextConfig {
    // Readable without a token even when tokens are required: health, the API description, the
    // docs and the dashboard's static page (which then asks the user for a token).
    openAccess?: boolean
  }
}

// Routes registered by plugins that cannot set route config.
const OPEN_ROUTE_PREFIXES = ['/docs']

function isOpenRoute (request: FastifyRequest): boolean {
  if (request.routeOptions.config?.openAccess === true) return true
  const url = request.routeOptions.url ?? ''
  return OPEN_ROUTE_PREFIXES.some((p) => url === p || url.startsWith(p + '/'))
}

// The caller's API token, once checked; rate limits are kept per token.
declare module 'fastify' {
  interface FastifyRequest { apiToken?: string }
}

// The guard's rules for a WebSocket upgrade, on its raw headers: cluster mode forwards an attach
// to the exec's replica before any route of this one sees it, and only an attach this guard
// would let through is forwarded (the rest goes to the routes, whose guard refuses it properly).
export function upgradeAllowed (headers: IncomingHttpHeaders, apiTokens: readonly string[], scheme: 'http' | 'https'): boolean {
  if (apiTokens.length > 0) {
    const token = tokenFrom(headers)
    return token !== undefined && matchesApiToken(apiTokens, token)
  }
  const host = headers.host ?? ''
  if (!isLoopbackHost(hostName(host))) return false
  const origin = headers.origin
  return origin === undefined || origin === `${scheme}://${host}`
}

// The internal listener (cluster mode) answers other replicas only: every request carries the
// replica key (src/cluster/replica-auth.ts), checked before anything else. The public guard ran
// on the replica the client reached.
export function installReplicaGuard (app: FastifyInstance, verify: (request: FastifyRequest) => boolean): void {
  app.decorateRequest('apiToken', undefined)
  app.addHook('onRequest', async (request, reply) => {
    if (request.url === '/healthz' || request.url === '/readyz') return
    if (verify(request)) return
    request.log.warn({ ip: request.ip, route: request.routeOptions.url }, 'internal request without a valid replica key refused')
    return sendProblem(reply, problem('unauthenticated', 'the internal listener answers other replicas of this cluster only'))
  })
}

export function installGuard (app: FastifyInstance, apiTokens: () => readonly string[], scheme: 'http' | 'https'): void {
  app.decorateRequest('apiToken', undefined)
  app.addHook('onRequest', async (request, reply) => {
    // Decided on the route the router matched, never on the raw URL: the router decodes
    // percent-escapes, so "/%761/execs" is a /v1 route too.
    // HTTP/1.1 requires Host (RFC 9112 §3.2); Node was told not to refuse it itself.
    if (request.headers.host === undefined && request.raw.httpVersion === '1.1') {
      return sendProblem(reply, problem('invalid_argument', 'an HTTP/1.1 request needs a Host header'))
    }
    const tokens = apiTokens()
    if (tokens.length > 0) {
      if (isOpenRoute(request)) return
      const token = tokenFrom(request.headers)
      if (token === undefined || !matchesApiToken(tokens, token)) {
        // Logged so an operator sees probing; the token itself never is.
        request.log.warn({ ip: request.ip, route: request.routeOptions.url, reason: token === undefined ? 'no token' : 'unknown token' }, 'API request refused')
        // RFC 6750 §3: a 401 names the scheme it wants.
        reply.header('www-authenticate', token === undefined ? 'Bearer realm="exec-gateway"' : 'Bearer realm="exec-gateway", error="invalid_token"')
        return sendProblem(reply, problem('unauthenticated', 'a valid bearer token is required (Authorization: Bearer <token>)'))
      }
      request.apiToken = token
      return
    }
    const host = request.headers.host ?? ''
    if (!isLoopbackHost(hostName(host))) {
      return sendProblem(reply, problem('permission_denied', `Host ${JSON.stringify(host)} is not a loopback name; without --api-token the gateway only answers loopback requests`))
    }
    const isUpgrade = String(request.headers.upgrade ?? '').toLowerCase() === 'websocket'
    const changesState = request.method !== 'GET' && request.method !== 'HEAD' && request.method !== 'OPTIONS'
    const origin = request.headers.origin
    if ((isUpgrade || changesState) && origin !== undefined && origin !== `${scheme}://${host}`) {
      return sendProblem(reply, problem('permission_denied', `Origin ${origin} is not this gateway's; cross-site requests are refused without --api-token`))
    }
  })
}
