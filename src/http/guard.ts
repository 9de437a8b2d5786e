import type { IncomingHttpHeaders } from 'node:http'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { problem } from '../errors.js'
import { isLoopbackHost } from '../config.js'
import { matchesApiToken } from '../tokens.js'
import { sendProblem } from './errors-plugin.js'
import { accessTokensIn, verifyReadToken } from './read-token.js'

// Who may call the API. With tokens: a bearer token on every /v1 route (browsers may offer it
// as a WebSocket subprotocol instead). Without tokens the listener is loopback-only, and a web
// page the user happens to visit must not be able to drive it: foreign Host headers (DNS
// rebinding) and foreign Origins on state-changing requests and upgrades are refused.
// A read token in the query (src/http/read-token.ts) is the one credential a URL may carry:
// it opens one exec's /events and /stream, read-only, and nothing else, with or without tokens.

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

// The caller's API token, once checked; rate limits are kept per token. readOnly: the request
// came with a read token, so its WebSocket takes no client frames (routes/exec-stream.ts).
declare module 'fastify' {
  interface FastifyRequest { apiToken?: string, readOnly: boolean }
}

export interface GuardAuth {
  // Read per request: SIGHUP may replace them.
  apiTokens: () => readonly string[]
  // The data dir's token secrets, which read tokens are keyed from.
  tokenSecrets: () => readonly Buffer[]
  scheme: 'http' | 'https'
}

// The only routes a read token opens.
const READ_TOKEN_ROUTES = new Set(['/v1/execs/:execId/events', '/v1/execs/:execId/stream'])

// Why a read token does not admit this request, or undefined when it does.
function readTokenRefusal (tokens: readonly string[], route: { method: string, url: string | undefined, execId: string | undefined }, secrets: readonly Buffer[]): string | undefined {
  if (tokens.length > 1) return 'more than one access_token in the query'
  if (route.method !== 'GET' || route.url === undefined || !READ_TOKEN_ROUTES.has(route.url) || route.execId === undefined) {
    return 'a read token (access_token) opens only GET /v1/execs/{execId}/events and /v1/execs/{execId}/stream'
  }
  const check = verifyReadToken(secrets, tokens[0]!, route.execId)
  return check.ok ? undefined : check.reason
}

// The guard's rules for a WebSocket upgrade, on its raw request: cluster mode forwards an attach
// to the exec's replica before any route of this one sees it, and only an attach this guard
// would let through is forwarded (the rest goes to the routes, whose guard refuses it properly).
export function upgradeAllowed (req: { headers: IncomingHttpHeaders, url?: string | undefined }, execId: string, auth: GuardAuth): boolean {
  const headers = req.headers
  const readTokens = accessTokensIn(req.url ?? '')
  const readOk = (): boolean => readTokenRefusal(readTokens, { method: 'GET', url: '/v1/execs/:execId/stream', execId }, auth.tokenSecrets()) === undefined
  const apiTokens = auth.apiTokens()
  if (apiTokens.length > 0) {
    if (readTokens.length > 0) return readOk()
    const token = tokenFrom(headers)
    return token !== undefined && matchesApiToken(apiTokens, token)
  }
  const host = headers.host ?? ''
  if (!isLoopbackHost(hostName(host))) return false
  const origin = headers.origin
  if (origin !== undefined && origin !== `${auth.scheme}://${host}`) return false
  return readTokens.length === 0 || readOk()
}

// The internal listener (cluster mode) answers other replicas only: every request carries the
// replica key (src/cluster/replica-auth.ts), checked before anything else. The public guard ran
// on the replica the client reached, and checked any read token there: a forwarded request that
// still carries one is only marked read-only here, so its WebSocket stays read-only on the owner.
export function installReplicaGuard (app: FastifyInstance, verify: (request: FastifyRequest) => boolean): void {
  app.decorateRequest('apiToken', undefined)
  app.decorateRequest('readOnly', false)
  app.addHook('onRequest', async (request, reply) => {
    if (request.url === '/healthz' || request.url === '/readyz') return
    if (verify(request)) {
      if (accessTokensIn(request.url).length > 0) request.readOnly = true
      return
    }
    request.log.warn({ ip: request.ip, route: request.routeOptions.url }, 'internal request without a valid replica key refused')
    return sendProblem(reply, problem('unauthenticated', 'the internal listener answers other replicas of this cluster only'))
  })
}

export function installGuard (app: FastifyInstance, auth: GuardAuth): void {
  const { apiTokens, scheme } = auth
  app.decorateRequest('apiToken', undefined)
  app.decorateRequest('readOnly', false)
  // Bearer tokens are ignored beside a read token: a URL that carries one stays read-only
  // whatever headers come with it.
  const admitReadToken = (request: FastifyRequest, reply: FastifyReply, tokens: string[]): FastifyReply | undefined => {
    const execId = (request.params as Record<string, string | undefined> | undefined)?.execId
    const why = readTokenRefusal(tokens, { method: request.method, url: request.routeOptions.url, execId }, auth.tokenSecrets())
    if (why === undefined) { request.readOnly = true; return undefined }
    request.log.warn({ ip: request.ip, route: request.routeOptions.url, reason: why }, 'API request with a read token refused')
    reply.header('www-authenticate', 'Bearer realm="exec-gateway", error="invalid_token"')
    return sendProblem(reply, problem('unauthenticated', why))
  }
  app.addHook('onRequest', async (request, reply) => {
    // Decided on the route the router matched, never on the raw URL: the router decodes
    // percent-escapes, so "/%761/execs" is a /v1 route too.
    // HTTP/1.1 requires Host (RFC 9112 §3.2); Node was told not to refuse it itself.
    if (request.headers.host === undefined && request.raw.httpVersion === '1.1') {
      return sendProblem(reply, problem('invalid_argument', 'an HTTP/1.1 request needs a Host header'))
    }
    const tokens = apiTokens()
    const readTokens = accessTokensIn(request.url)
    if (tokens.length > 0) {
      if (isOpenRoute(request)) return
      if (readTokens.length > 0) return admitReadToken(request, reply, readTokens)
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
    if (readTokens.length > 0 && !isOpenRoute(request)) return admitReadToken(request, reply, readTokens)
  })
}
