import type { Server as HttpServer } from 'node:http'
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyRequest } from 'fastify'
import websocket from '@fastify/websocket'
import rateLimit from '@fastify/rate-limit'
import { Ajv } from 'ajv'
import type { Logger } from 'pino'
import { registerRoutes } from '../../routes/index.js'
import type { RouteContext } from './route-context.js'
import { BINARY_SUBPROTOCOL, JSON_SUBPROTOCOL } from '../schemas/websocket.js'
import { ErrorCodeSchema, ExecErrorSchema, ProblemSchema } from '../schemas/problem.js'
import { ExecRequestSchema, ExecResultSchema, ExecSchema, ReadTokenSchema, SignalRequestSchema } from '../schemas/exec.js'
import { SANDBOX_ID_MAX_CHARS, SandboxSchema } from '../schemas/sandbox.js'
import { ExecEventSchema } from '../schemas/events.js'
import { installErrorHandling, sendProblem } from './errors-plugin.js'
import { problem } from '../errors.js'
import { installGuard, installReplicaGuard } from './guard.js'
import { installRequestEdges, routeMethods } from './request-edges.js'
import { clientErrorHandler, frameworkErrors, installServerRefusals, upgradeProblem } from './transport-refusals.js'
import { registerOpenApi } from './openapi.js'
import type { TlsMaterial } from '../credentials.js'
import type { Lifecycle } from '../lifecycle/lifecycle.js'
import { closeWebSockets } from '../lifecycle/websockets.js'

// The public listener: Fastify (HTTP/1.1 + WebSocket), routes, errors, auth, OpenAPI.

const BODY_LIMIT_BYTES = 8 * 1024 * 1024
export const WS_MAX_PAYLOAD_BYTES = 1024 * 1024

export interface PublicAppOptions {
  logger: Logger
  // Read per request: SIGHUP may replace them.
  apiTokens: () => readonly string[]
  // HTTPS (and wss) when given.
  tls?: TlsMaterial | undefined
  // The gateway's state: /readyz reports it, and requests are refused once shutdown reaches
  // the public listener.
  lifecycle: Lifecycle
  ctx: Omit<RouteContext, 'readiness'>
  // Cluster mode's internal listener: the same routes, for other replicas only (replica key
  // instead of API tokens; the replica the client reached applied its rate limit).
  replicaAuth?: ((request: FastifyRequest) => boolean) | undefined
  // Hooks that must run for every route (cluster mode's forwarding), added before the routes.
  beforeRoutes?: ((app: FastifyInstance) => void) | undefined
  // Cluster mode: the rate limit's counters, shared by the replicas (src/cluster/rate-store.ts).
  rateLimitStore?: (new (options: unknown) => unknown) | undefined
}

// Bodies are checked strictly (no coercion, no silently dropped fields); query strings and
// path parameters are text on the wire and are coerced to their declared types.
function makeAjv (coerce: boolean): Ajv {
  return new Ajv({ coerceTypes: coerce ? 'array' : false, useDefaults: true, removeAdditional: false, allErrors: false, strict: false })
}

export async function buildPublicApp (opts: PublicAppOptions): Promise<{ app: FastifyInstance }> {
  const lifecycle = opts.lifecycle
  // HTTP/1.1 without Host is refused by the guard as a problem, not by Node as a bare 400.
  const serverOptions = { requireHostHeader: false }
  const app = Fastify({
    ...(opts.tls === undefined ? { http: serverOptions } : { https: { ...serverOptions, cert: opts.tls.cert, key: opts.tls.key } }),
    frameworkErrors,
    clientErrorHandler,
    loggerInstance: opts.logger as FastifyBaseLogger,
    bodyLimit: BODY_LIMIT_BYTES,
    // The router refuses longer path parameters before any schema sees them (find-my-way's default
    // is 100): every sandbox id a token can name must reach its route.
    routerOptions: { maxParamLength: SANDBOX_ID_MAX_CHARS },
    forceCloseConnections: true,
    // Answered below as a problem (Fastify's own 503 is plain JSON without a code).
    return503OnClosing: false
  })
  const strict = makeAjv(false)
  const coercing = makeAjv(true)
  const schemas = [ErrorCodeSchema, ExecErrorSchema, ProblemSchema, SandboxSchema, ExecSchema, ExecResultSchema, ExecRequestSchema, SignalRequestSchema, ReadTokenSchema, ExecEventSchema]
  for (const s of schemas) {
    app.addSchema(s)
    strict.addSchema(s)
    coercing.addSchema(s)
  }
  app.setValidatorCompiler(({ schema, httpPart }) => (httpPart === 'body' ? strict : coercing).compile(schema))

  installErrorHandling(app, routeMethods(app))
  installRequestEdges(app)
  installServerRefusals(app.server as unknown as HttpServer)
  app.addHook('onRequest', async (request, reply) => {
    if (!lifecycle.reached('listeners')) return
    reply.header('connection', 'close')
    // A load balancer's probe gets the same answer as from the route while the gateway drains.
    if (request.url === '/readyz') return await reply.code(503).send({ status: lifecycle.readiness })
    return sendProblem(reply, problem('shutting_down', 'the gateway is shutting down'))
  })
  // Only JSON bodies: anything else is 415, not a string that fails validation as a 400.
  app.removeContentTypeParser(['text/plain'])

  await registerOpenApi(app)

  await app.register(websocket, {
    // On close, open WebSockets get 1001 and a bounded close handshake (ws keeps the clients).
    preClose: async () => { await closeWebSockets(app.websocketServer) },
    // ws has already sent its close frame (1009 too big, 1007 bad UTF-8, 1002 protocol) when it
    // reports a client's error; terminating here would cut that frame off. Only a socket still
    // open (an error of ours) is closed, with 1011.
    errorHandler: (error, socket, request) => {
      const fromClient = typeof (error as { code?: unknown }).code === 'string' && String((error as { code?: unknown }).code).startsWith('WS_ERR_')
      request.log[fromClient ? 'debug' : 'warn']({ err: error }, 'websocket error')
      if (socket.readyState === socket.OPEN) socket.close(1011, 'internal error')
    },
    options: {
      maxPayload: WS_MAX_PAYLOAD_BYTES,
      // Only the data subprotocol is ever selected; a bearer subprotocol is read, never echoed.
      handleProtocols: (protocols: Set<string>) => protocols.has(BINARY_SUBPROTOCOL) ? BINARY_SUBPROTOCOL : protocols.has(JSON_SUBPROTOCOL) ? JSON_SUBPROTOCOL : false
    }
  })

  // After the websocket plugin, whose hook marks upgrades: a refused upgrade's socket is then
  // closed with the response instead of leaking (and holding app.close() open).
  if (opts.replicaAuth !== undefined) installReplicaGuard(app, opts.replicaAuth)
  else installGuard(app, { apiTokens: opts.apiTokens, tokenSecrets: opts.ctx.tokenSecrets, scheme: opts.tls === undefined ? 'http' : 'https' })
  // On any route: ws would refuse a malformed handshake itself, as text/html.
  app.addHook('onRequest', async (request, reply) => {
    if ((request.raw as { upgrade?: boolean }).upgrade !== true) return
    const why = upgradeProblem(request.raw)
    if (why !== undefined) return sendProblem(reply, problem('invalid_argument', why))
  })
  // Only routes that ask for it (exec creation) are limited; the limit runs after the guard,
  // so it is kept per API token.
  await app.register(rateLimit, { global: false, ...(opts.rateLimitStore === undefined ? {} : { store: opts.rateLimitStore as never }) })

  opts.beforeRoutes?.(app)
  app.get('/openapi.json', { schema: { hide: true }, config: { openAccess: true } }, async () => app.swagger())
  await registerRoutes(app, { ...opts.ctx, readiness: () => lifecycle.readiness })
  return { app }
}
