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

function offeredSubprotocols (request: FastifyRequest): string[] {
  const raw = request.headers['sec-websocket-protocol']
  if (raw === undefined) return []
  return String(raw).split(',').map((s) => s.trim()).filter((s) => s !== '')
}

function tokenFrom (request: FastifyRequest): string | undefined {
  const auth = request.headers.authorization
  if (typeof auth === 'string' && auth.startsWith('Bearer ')) return auth.slice(7).trim()
  for (const p of offeredSubprotocols(request)) {
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
      const token = tokenFrom(request)
      if (token === undefined || !matchesApiToken(tokens, token)) {
        // Logged so an operator sees probing; the token itself never is.
        request.log.warn({ ip: request.ip, route: request.routeOptions.url, reason: token === undefined ? 'no token' : 'unknown token' }, 'API request refused')
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
