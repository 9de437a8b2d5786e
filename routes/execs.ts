import { createHash } from 'node:crypto'
import type { FastifyRequest } from 'fastify'
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { GatewayError } from '../src/errors.js'
import type { ExecEntry } from '../src/execs/exec-entry.js'
import { validateExecRequest } from '../src/execs/validate.js'
import {
  CreateExecQuerySchema, ExecListSchema, ExecParamsSchema, ExecRequestSchema, ExecResultSchema, ExecSchema,
  ListExecsQuerySchema, SignalRequestSchema
} from '../src/schemas/exec.js'
import { ProblemResponse, problemResponse } from '../src/schemas/problem.js'
import { SandboxParamsSchema } from '../src/schemas/sandbox.js'
import { sendWaitResult } from '../src/http/wait-result.js'
import type { RouteContext } from '../src/http/route-context.js'

const P = ProblemResponse
export const EXEC_NOT_FOUND = problemResponse(['exec_not_found'], 'no such exec: unknown, deleted, or past --exec-ttl-s')
// Documentation only: the handler sets these headers itself.
const LOCATION = { Location: { type: 'string', description: 'the exec\'s URL, /v1/execs/{execId}' } }
const RETRY_AFTER = { 'Retry-After': { type: 'integer', description: 'seconds until the rate limit lets the token create execs again (rate limit only)' } }

// Right after a restart, waits for the supervisors to report the execs their daemons keep.
export async function findExec (ctx: RouteContext, execId: string): Promise<ExecEntry> {
  const entry = await ctx.execs.lookup(execId)
  if (entry === undefined) throw new GatewayError('exec_not_found', `no exec ${execId} (unknown, deleted, or past its TTL)`)
  return entry
}

// The key never holds the token itself (the limiter's store may be inspected or logged).
function rateLimitKey (req: FastifyRequest): string {
  return req.apiToken === undefined ? `ip:${req.ip}` : `token:${createHash('sha256').update(req.apiToken).digest('base64url').slice(0, 22)}`
}

const execs: FastifyPluginAsyncTypebox<{ ctx: RouteContext }> = async (app, { ctx }) => {
  const limit = ctx.execRateLimitPerMinute
  app.post('/v1/sandboxes/:sandboxId/execs', {
    config: limit === 0
      ? {}
      : {
          rateLimit: {
            max: limit,
            timeWindow: 60_000,
            keyGenerator: rateLimitKey,
            errorResponseBuilder: (_req, c) => new GatewayError('too_many_requests', `more than ${limit} execs a minute for this token; retry in ${Math.max(1, Math.ceil(c.ttl / 1000))} s`)
          }
        },
    schema: {
      operationId: 'createExec',
      tags: ['execs'],
      summary: 'Start an exec; with ?wait=true, wait for its end',
      description: 'Returns 201 and the Exec at once; the command runs in the background. With wait=true the response is the ExecResult (200) or, when no exit status will ever come, the exec\'s error as a problem (503 relay_unavailable, ...). Closing the request never kills the exec.',
      params: SandboxParamsSchema,
      querystring: CreateExecQuerySchema,
      body: ExecRequestSchema,
      response: {
        200: { description: 'wait=true: the command reported its exit status or exit signal', headers: LOCATION, content: { 'application/json': { schema: Type.Ref(ExecResultSchema) } } },
        201: { description: 'the exec is created and runs in the background', headers: LOCATION, content: { 'application/json': { schema: Type.Ref(ExecSchema) } } },
        400: P,
        401: P,
        403: P,
        404: problemResponse(['sandbox_not_found', 'exec_not_found'], 'no supervisor for this sandbox has ever connected; with wait=true also: the exec was deleted before it started'),
        413: P,
        415: P,
        429: problemResponse(['too_many_requests'], 'over the per-token exec rate limit (with Retry-After), or the sandbox already has too many execs running or relays waiting to be opened; with wait=true also as the exec\'s error', RETRY_AFTER),
        500: problemResponse(['internal'], 'an unexpected error in the gateway, or (wait=true) while running the exec'),
        502: problemResponse(['ssh_failed'], 'wait=true: the SSH handshake or authentication with the sandbox\'s daemon failed'),
        503: problemResponse(['sandbox_unavailable', 'relay_unavailable', 'shutting_down'], 'the gateway is shutting down; with wait=true also: no supervisor session within --session-wait-ms, or the relay failed before the command reported an exit status'),
        504: problemResponse(['relay_open_timeout'], 'wait=true: the supervisor did not open the relay within --relay-open-timeout-ms')
      }
    }
  }, async (req, reply) => {
    const spec = validateExecRequest(req.body)
    const entry = ctx.execs.create(req.params.sandboxId, spec)
    await ctx.recordExec?.(entry.id, entry.sandboxId)
    if (req.query.wait !== true) {
      return reply.code(201).header('location', `/v1/execs/${entry.id}`).send(entry.toJSON())
    }
    await ctx.execs.waitForEnd(entry)
    // Its sandbox moved to another replica, which has the exec now and will have its end.
    if (entry.movedAway && ctx.waitElsewhere !== undefined) return await ctx.waitElsewhere(entry.id, req.query.encoding ?? 'utf8', req, reply)
    return await sendWaitResult(entry, req.query.encoding ?? 'utf8', reply)
  })

  app.get('/v1/execs', {
    schema: {
      operationId: 'listExecs',
      tags: ['execs'],
      summary: 'List execs',
      querystring: ListExecsQuerySchema,
      response: { 200: ExecListSchema, 400: P, 401: P, 403: P }
    }
  }, async (req) => ({ execs: ctx.execs.list(req.query).map((e) => e.toJSON()) }))

  app.get('/v1/execs/:execId', {
    schema: {
      operationId: 'getExec',
      tags: ['execs'],
      summary: 'One exec: status, exit code or error',
      params: ExecParamsSchema,
      response: { 200: Type.Ref(ExecSchema), 401: P, 403: P, 404: EXEC_NOT_FOUND }
    }
  }, async (req) => (await findExec(ctx, req.params.execId)).toJSON())

  app.post('/v1/execs/:execId/signal', {
    schema: {
      operationId: 'signalExec',
      tags: ['execs'],
      summary: 'Send a signal to the exec\'s processes',
      params: ExecParamsSchema,
      body: SignalRequestSchema,
      response: { 202: Type.Object({ execId: Type.String(), signal: Type.String() }), 400: P, 401: P, 403: P, 404: EXEC_NOT_FOUND, 409: problemResponse(['exec_finished'], 'the exec has already ended') }
    }
  }, async (req, reply) => {
    const entry = await findExec(ctx, req.params.execId)
    ctx.execs.signal(entry, req.body.signal)
    return reply.code(202).send({ execId: entry.id, signal: req.body.signal })
  })

  app.delete('/v1/execs/:execId', {
    schema: {
      operationId: 'deleteExec',
      tags: ['execs'],
      summary: 'Kill a running exec and forget it',
      params: ExecParamsSchema,
      response: { 204: Type.Null({ description: 'killed (when it was running) and forgotten' }), 401: P, 403: P, 404: EXEC_NOT_FOUND }
    }
  }, async (req, reply) => {
    ctx.execs.remove(await findExec(ctx, req.params.execId))
    return reply.code(204).send(null)
  })
}
export default execs
