import type { FastifyInstance, FastifySchema, RouteOptions } from 'fastify'
import swagger, { type SwaggerTransform, type SwaggerTransformObject } from '@fastify/swagger'
import swaggerUi from '@fastify/swagger-ui'
import type { TSchema } from '@sinclair/typebox'
import type { ErrorCode } from '../errors.js'
import { ExecEventMembers } from '../schemas/events.js'
import { BinaryOutputFrameSchema, BinaryStdinFrameSchema, ClientFrameMembers } from '../schemas/frames.js'
import { kProblemCodes, problemResponse } from '../schemas/problem.js'
import {
  BINARY_SUBPROTOCOL, CLOSE_ERROR, CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, JSON_SUBPROTOCOL,
  STDERR_CHANNEL, STDIN_CHANNEL, STDOUT_CHANNEL
} from '../schemas/websocket.js'
import { eventFormat } from './accept.js'
import { BEARER_SUBPROTOCOL_PREFIX } from './guard.js'
import { ACCESS_TOKEN_PARAM } from './read-token.js'

// The OpenAPI 3.1 document and its /docs page. The document is generated: @fastify/swagger
// turns the route schemas into paths, and the two hooks below add what the route schemas
// cannot say by themselves. Nothing here is written by hand into openapi/openapi.json.
//
// - transform (per route): the problem responses that plugins, not handlers, produce (the
//   guard's 401/403, body parsing's 400/413/415, the error handler's 500), derived from the
//   same facts those plugins act on; and the WebSocket route, which @fastify/websocket hides.
// - transformObject (once): the event and frame components, which no HTTP route carries, and
//   what @fastify/swagger leaves out of operations (see finishOperations).

const BODY_METHODS = new Set(['POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'])
// The routes that also take a read token in the query (src/http/guard.ts).
const READ_TOKEN_ROUTES = new Set(['/v1/execs/:execId/events', '/v1/execs/:execId/stream'])

const DESCRIPTION = `Runs commands in remote sandboxes over a supervisor relay. Every exec ends with its true exit status or an honest 503 within a published bound.

Errors are RFC 9457 \`application/problem+json\` with a stable \`code\`. With \`--api-token\`, every \`/v1\` route needs \`Authorization: Bearer <token>\` (\`/events\` and \`/stream\` also take a read token in \`?access_token=\`, minted by \`POST /v1/execs/{execId}/read-token\`, for browsers' EventSource); without it the gateway listens on loopback only and refuses foreign \`Host\` and \`Origin\` headers with 403 \`permission_denied\`.

Events (\`ExecEvent\`) are the same on the WebSocket (\`/v1/execs/{execId}/stream\`), in SSE and in NDJSON (\`/v1/execs/{execId}/events\`); the WebSocket's client frames are \`ClientFrame\`, \`BinaryStdinFrame\` and, from the server, \`BinaryOutputFrame\`.`

const STREAM_DESCRIPTION = `Upgrade to a WebSocket (\`Connection: Upgrade\`, \`Upgrade: websocket\`). An unknown exec is a plain HTTP 404 before the upgrade, never an open-then-close.

Server → client: one \`ExecEvent\` per JSON text frame; the last is \`exit\` or \`error\`, then the server closes with ${CLOSE_NORMAL} (after exit), ${CLOSE_ERROR} (after error) or ${CLOSE_GOING_AWAY} (gateway shutting down). A client frame that breaks the rules closes the socket with ${CLOSE_POLICY} and a reason. Closing the socket detaches; it never kills the exec.

Client → server: \`ClientFrame\` JSON text frames: \`{"type":"stdin","data"}\` (interactive execs only), \`{"type":"eof"}\`, \`{"type":"resize","cols","rows"}\` (tty only), \`{"type":"signal","signal"}\`.

Subprotocols (\`Sec-WebSocket-Protocol\`), all optional:
- \`${BINARY_SUBPROTOCOL}\`: output arrives as \`BinaryOutputFrame\`s (channel byte ${STDOUT_CHANNEL} = stdout, ${STDERR_CHANNEL} = stderr, then the raw bytes) while control events stay JSON text; the client may send \`BinaryStdinFrame\`s (channel byte ${STDIN_CHANNEL}, then stdin bytes). Selected when offered.
- \`${JSON_SUBPROTOCOL}\`: the default JSON text frames, by name. Selected when offered without the binary one.
- \`${BEARER_SUBPROTOCOL_PREFIX}<base64url(token)>\`: for browsers, which cannot set an \`Authorization\` header on a WebSocket. Offer it next to a data subprotocol (a browser fails the handshake when the server selects none of the offered ones); the server reads it and never selects it.

Attached with a read token (\`?access_token=\`, from POST /v1/execs/{execId}/read-token) instead, the socket is read-only: any client frame closes it with ${CLOSE_POLICY}.`

function problemsFromPlugins (route: RouteOptions, schema: Record<string, unknown>, bodyLimit: number): Record<number, ReturnType<typeof problemResponse>> {
  const methods = ([] as string[]).concat(route.method)
  const takesBody = methods.some((m) => BODY_METHODS.has(m))
  const out: Record<number, ReturnType<typeof problemResponse>> = {}
  const one = (code: ErrorCode, why: string): ReturnType<typeof problemResponse> => problemResponse([code], why)
  if (takesBody || schema.params !== undefined || schema.querystring !== undefined || schema.body !== undefined) {
    out[400] = one('invalid_argument', 'a path parameter, query parameter or body field breaks its rule (`detail` names it), or the body is not valid JSON')
  }
  if (route.config?.openAccess !== true) {
    out[401] = one('unauthenticated', READ_TOKEN_ROUTES.has(route.url)
      ? 'the gateway runs with --api-token and the request carries no valid bearer token, or its access_token read token is malformed, expired or for another exec'
      : 'the gateway runs with --api-token and the request carries no valid bearer token, or it carries an access_token read token (which only /events and /stream take)')
  }
  out[403] = one('permission_denied', 'the gateway runs without --api-token and the Host is not a loopback name, or a state-changing request or WebSocket upgrade carries an Origin other than the gateway\'s own')
  if (takesBody) {
    out[413] = one('payload_too_large', `the body is over ${bodyLimit} bytes`)
    out[415] = one('unsupported_media_type', 'the body is not application/json')
  }
  out[500] = one('internal', 'an unexpected error in the gateway; the detail never carries internals')
  return out
}

function transformFor (bodyLimit: number): SwaggerTransform {
  return ({ schema, url, route }) => {
    const s: Record<string, unknown> = { ...(schema as Record<string, unknown> | undefined) }
    if (route.websocket === true) {
      // @fastify/websocket hides its routes; this one is part of the API.
      delete s.hide
      s.description ??= STREAM_DESCRIPTION
    } else if (url === '/openapi.json') {
      // Registered hidden (it is the document itself); published so docs/api.md §3 is complete.
      delete s.hide
      s.tags = ['meta']
      s.operationId = 'getOpenApiDocument'
      s.summary = 'This OpenAPI 3.1 document (also committed as openapi/openapi.json)'
      s.description = 'Generated from the gateway\'s route schemas; the same document as the committed openapi/openapi.json and the /docs page\'s. Needs no token.'
      s.response = { 200: { description: 'the OpenAPI 3.1 document', type: 'object', additionalProperties: true } }
    }
    if (s.hide === true) return { schema: s as FastifySchema, url }
    const declared = (s.response ?? {}) as Record<string, unknown>
    const fromPlugins = problemsFromPlugins(route, s, bodyLimit)
    // A route's own problemResponse, which names its codes (e.g. the 500 of an exec's error),
    // stands; a generic ProblemResponse gives way to the named entry.
    const response: Record<string, unknown> = { ...declared }
    for (const [status, entry] of Object.entries(fromPlugins)) {
      const mine = declared[status] as { [kProblemCodes]?: unknown } | undefined
      if (mine?.[kProblemCodes] === undefined) response[status] = entry
    }
    s.response = response
    // Open routes answer without a token (health, the document, the docs page).
    if (route.config?.openAccess === true) s.security = []
    if (READ_TOKEN_ROUTES.has(route.url)) s.security = [{ bearer: [] }, { readToken: [] }]
    return { schema: s as FastifySchema, url }
  }
}

// TypeBox schemas are JSON Schema already; the document wants them without $id, with local
// component references, and with `const` as a one-value `enum` like the rest of the document
// (@fastify/swagger's convertConstToEnum).
function toComponent (schema: TSchema): Record<string, unknown> {
  const walk = (value: unknown): unknown => {
    if (Array.isArray(value)) return value.map(walk)
    if (value === null || typeof value !== 'object') return value
    const out: Record<string, unknown> = {}
    // Object.entries skips TypeBox's symbol keys.
    for (const [k, v] of Object.entries(value)) {
      if (k === '$id') continue
      if (k === 'const') out.enum = [v]
      else if (k === '$ref') out.$ref = `#/components/schemas/${String(v)}`
      else out[k] = walk(v)
    }
    return out
  }
  return walk(schema) as Record<string, unknown>
}

// A union whose members are told apart by their `type` literal, as a oneOf of named components
// with a discriminator (so generated clients get one named type per member).
function discriminatedUnion (members: Record<string, TSchema>, description: string): Record<string, unknown> {
  const mapping: Record<string, string> = {}
  for (const [name, member] of Object.entries(members)) {
    const tag = (member as { properties?: { type?: { const?: unknown } } }).properties?.type?.const
    if (typeof tag !== 'string') throw new Error(`${name} has no literal "type" to discriminate on`)
    mapping[tag] = `#/components/schemas/${name}`
  }
  return { description, oneOf: Object.values(mapping).map(($ref) => ({ $ref })), discriminator: { propertyName: 'type', mapping } }
}

interface Parameter { in: string, name: string, required?: boolean, description?: string, deprecated?: boolean, schema?: { deprecated?: boolean, type?: string, examples?: string[] } }
interface Operation { parameters?: Parameter[], responses?: Record<string, { content?: Record<string, unknown> }>, [extension: `x-${string}`]: unknown }

const ref = (name: string): { $ref: string } => ({ $ref: `#/components/schemas/${name}` })

// What @fastify/swagger does not carry from the route schemas into the operations:
// - a query parameter's `deprecated` stays on its schema, where generators do not look;
// - an operation answering in more than one media type (only /events, whose choice is
//   src/http/accept.ts's) gets the Accept header that chooses: OpenAPI leaves Accept to the
//   tools, but generated clients send none, or a bare */*, and then the gateway answers NDJSON;
//   an SSE client generated from text/event-stream must be told to send it, and its type says so;
// - the WebSocket route's messages, which OpenAPI has no place for, point at their components
//   from an extension, so that a reader (and spectral's unused-component rule) finds them.
function finishOperations (paths: Record<string, Record<string, Operation>>): void {
  for (const [path, ops] of Object.entries(paths)) {
    for (const op of Object.values(ops)) {
      for (const p of op.parameters ?? []) {
        if (p.schema?.deprecated === true) { p.deprecated = true; delete p.schema.deprecated }
      }
      const media = Object.keys(op.responses?.['200']?.content ?? {})
      if (media.length > 1) {
        op.parameters = [...(op.parameters ?? []), {
          in: 'header',
          name: 'Accept',
          required: false,
          description: `Chooses the answer's media type: ${media.map((m) => `\`${m}\``).join(' or ')}. q-values are honoured (so an SSE client must name \`text/event-stream\`); without it, with a bare \`*/*\`, or with one naming neither, the answer is \`${eventFormat(undefined) === 'sse' ? 'text/event-stream' : 'application/x-ndjson'}\`.`,
          schema: { type: 'string', examples: media }
        }]
      }
      if (path.endsWith('/stream')) {
        op['x-websocket-messages'] = {
          server: { text: ref('ExecEvent'), binary: ref('BinaryOutputFrame') },
          client: { text: ref('ClientFrame'), binary: ref('BinaryStdinFrame') }
        }
      }
    }
  }
}

const addComponents: SwaggerTransformObject = (documentObject) => {
  if (!('openapiObject' in documentObject)) throw new Error('the gateway documents itself as OpenAPI 3.1, not Swagger 2')
  const openapiObject = documentObject.openapiObject
  const doc = openapiObject as { components?: { schemas?: Record<string, unknown> } }
  doc.components ??= {}
  const schemas = (doc.components.schemas ??= {})
  for (const [name, s] of Object.entries({ ...ExecEventMembers, ...ClientFrameMembers })) schemas[name] = toComponent(s)
  schemas.ExecEvent = discriminatedUnion(ExecEventMembers, 'Server → client event: a JSON text frame on the WebSocket, the `data:` of an SSE event named after its type, or one NDJSON line. Every stream ends with exactly one final event, `exit` or `error`.')
  schemas.ClientFrame = discriminatedUnion(ClientFrameMembers, `Client → server JSON text frame on the WebSocket. Anything else closes the socket with ${CLOSE_POLICY} and a reason.`)
  schemas.BinaryOutputFrame = toComponent(BinaryOutputFrameSchema)
  schemas.BinaryStdinFrame = toComponent(BinaryStdinFrameSchema)
  finishOperations((openapiObject as { paths?: Record<string, Record<string, Operation>> }).paths ?? {})
  return openapiObject
}

export async function registerOpenApi (app: FastifyInstance): Promise<void> {
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: { title: 'exec-gateway', version: '1', description: DESCRIPTION, license: { name: 'Apache-2.0', identifier: 'Apache-2.0' } },
      // The default --listen address, absolute: generators take the first server as the client's
      // default base URL, and a relative '/' leaves a Node client with a URL fetch refuses.
      // Every client takes its gateway's own URL as baseUrl.
      servers: [{ url: 'http://127.0.0.1:8080', description: 'a gateway on its default --listen address; use your gateway\'s URL' }],
      tags: [
        { name: 'execs', description: 'Run commands, follow their output, signal and kill them' },
        { name: 'sandboxes', description: 'Sandboxes whose supervisor has connected' },
        { name: 'health', description: 'Liveness and metrics' },
        { name: 'meta', description: 'This API description' }
      ],
      components: {
        securitySchemes: {
          bearer: { type: 'http', scheme: 'bearer', description: 'One of the gateway\'s --api-token values. Without --api-token (loopback only) no token is needed.' },
          readToken: { type: 'apiKey', in: 'query', name: ACCESS_TOKEN_PARAM, description: 'A read token from POST /v1/execs/{execId}/read-token: for that exec\'s /events and /stream only, until it expires, read-only (a WebSocket attached with it takes no client frames). For browsers\' EventSource, which cannot send Authorization.' }
        }
      },
      security: [{ bearer: [] }]
    },
    refResolver: { buildLocalReference: (json, _baseUri, _fragment, i) => String(json.$id ?? `def-${i}`) },
    transform: transformFor(app.initialConfig.bodyLimit ?? 1024 * 1024),
    transformObject: addComponents
  })
  // Served from the package's own copy of swagger-ui: the page works with no network access.
  // The guard leaves /docs open (OPEN_ROUTE_PREFIXES): it is static, and asks for a token itself.
  await app.register(swaggerUi, { routePrefix: '/docs' })
}
