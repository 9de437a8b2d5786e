import { createHash } from 'node:crypto'
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { GatewayError } from '../src/errors.js'
import type { Encoding, ExecEntry } from '../src/execs/exec-entry.js'
import { validateExecRequest } from '../src/execs/validate.js'
import {
  CreateExecQuerySchema, ExecListSchema, ExecParamsSchema, ExecRequestSchema, ExecResultSchema, ExecSchema,
  ListExecsQuerySchema, RunExecQuerySchema, SignalRequestSchema, type ExecRequest
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

// The problems of starting an exec, shared by createExec and runExec. Those of a waited-for
// exec's end are prefixed: `also` where they add to a start's own, `only` where they stand alone.
function startProblems (alsoPrefix: string, onlyPrefix: string): Record<number, unknown> {
  const also = (why: string): string => alsoPrefix + why
  const only = (why: string): string => onlyPrefix + why
  return {
    400: P,
    401: P,
    403: P,
    404: problemResponse(['sandbox_not_found', 'exec_not_found'], `no supervisor for this sandbox has ever connected; ${also('the exec was deleted before it started')}`),
    413: P,
    415: P,
    429: problemResponse(['too_many_requests'], `over the per-token exec rate limit (with Retry-After), or the sandbox already has --max-running-execs-per-sandbox execs pending or running (execs waiting for an SSH connection queue, they are not refused); ${also('as the exec\'s error')}`, RETRY_AFTER),
    500: problemResponse(['internal'], `an unexpected error in the gateway; ${also('while running the exec')}`),
    502: problemResponse(['ssh_failed'], only('the SSH handshake or authentication with the sandbox\'s daemon failed')),
    503: problemResponse(['sandbox_unavailable', 'relay_unavailable', 'shutting_down'], `the gateway is shutting down; ${also('no supervisor session within --session-wait-ms, or the relay failed before the command reported an exit status')}`),
    504: problemResponse(['relay_open_timeout'], only('the supervisor did not open the relay within --relay-open-timeout-ms'))
  }
}

const execs: FastifyPluginAsyncTypebox<{ ctx: RouteContext }> = async (app, { ctx }) => {
  const limit = ctx.execRateLimitPerMinute
  // One limiter, and so one count per token, for both ways of starting an exec: runExec is
  // createExec waiting, and offering it must not double a token's budget. groupId names the
  // shared window in the cluster's rate store (src/cluster/rate-store.ts).
  const limited = limit === 0
    ? {}
    : {
        onRequest: app.rateLimit({
          max: limit,
          timeWindow: 60_000,
          groupId: 'start-exec',
          keyGenerator: rateLimitKey,
          errorResponseBuilder: (_req, c) => new GatewayError('too_many_requests', `more than ${limit} execs a minute for this token; retry in ${Math.max(1, Math.ceil(c.ttl / 1000))} s`)
        })
      }

  // The body is an ExecRequest: the schema, a reference to that component, has admitted it.
  async function start (req: FastifyRequest, reply: FastifyReply, wait: boolean, encoding: Encoding): Promise<FastifyReply> {
    const spec = validateExecRequest(req.body as ExecRequest)
    const entry = ctx.execs.create((req.params as { sandboxId: string }).sandboxId, spec)
    await ctx.recordExec?.(entry.id, entry.sandboxId)
    if (!wait) return await reply.code(201).header('location', `/v1/execs/${entry.id}`).send(entry.toJSON())
    await ctx.execs.waitForEnd(entry)
    // Its sandbox moved to another replica, which has the exec now and will have its end.
    if (entry.movedAway && ctx.waitElsewhere !== undefined) return await ctx.waitElsewhere(entry.id, encoding, req, reply)
    return await sendWaitResult(entry, encoding, reply)
  }

  app.post('/v1/sandboxes/:sandboxId/execs', {
    ...limited,
    schema: {
      operationId: 'createExec',
      tags: ['execs'],
      summary: 'Start an exec in the background',
      description: 'Returns 201 and the Exec at once; the command runs in the background. Closing the request never kills the exec.\n\nThe deprecated `wait=true` still works and answers as runExec does (200 ExecResult, or the exec\'s error as a problem); it is left out of the 2xx responses here so that a generated client has one success type, Exec. Use runExec to wait.',
      params: SandboxParamsSchema,
      querystring: CreateExecQuerySchema,
      body: Type.Ref(ExecRequestSchema),
      response: {
        201: { description: 'the exec is created and runs in the background', headers: LOCATION, content: { 'application/json': { schema: Type.Ref(ExecSchema) } } },
        ...startProblems('with the deprecated wait=true also: ', 'with the deprecated wait=true: ')
      }
    }
  }, async (req, reply) => await start(req, reply, req.query.wait === true, req.query.encoding ?? 'utf8'))

  app.post('/v1/sandboxes/:sandboxId/execs/run', {
    ...limited,
    schema: {
      operationId: 'runExec',
      tags: ['execs'],
      summary: 'Start an exec and wait for its end',
      description: 'Answers when the command has reported its exit status or exit signal: 200 and the ExecResult. When no exit status will ever come, the answer is the exec\'s error as a problem (503 relay_unavailable, ...) naming the exec (`execId`). Closing the request never kills the exec: GET /v1/execs/{execId} (Location) has its outcome.',
      params: SandboxParamsSchema,
      querystring: RunExecQuerySchema,
      body: Type.Ref(ExecRequestSchema),
      response: {
        200: { description: 'the command reported its exit status or exit signal', headers: LOCATION, content: { 'application/json': { schema: Type.Ref(ExecResultSchema) } } },
        ...startProblems('also: ', '')
      }
    }
  }, async (req, reply) => await start(req, reply, true, req.query.encoding ?? 'utf8'))

  app.get('/v1/execs', {
    schema: {
      operationId: 'listExecs',
      tags: ['execs'],
      summary: 'List execs',
      description: 'The execs the gateway keeps (running, and finished ones until --exec-ttl-s), optionally of one sandbox or in one status.',
      querystring: ListExecsQuerySchema,
      response: { 200: ExecListSchema, 400: P, 401: P, 403: P }
    }
  }, async (req) => ({ execs: ctx.execs.list(req.query).map((e) => e.toJSON()) }))

  app.get('/v1/execs/:execId', {
    schema: {
      operationId: 'getExec',
      tags: ['execs'],
      summary: 'One exec: status, exit code or error',
      description: 'The exec\'s record; once it has ended, its exit code, exit signal or error. Output is read with getExecEvents or attachExec.',
      params: ExecParamsSchema,
      response: { 200: Type.Ref(ExecSchema), 401: P, 403: P, 404: EXEC_NOT_FOUND }
    }
  }, async (req) => (await findExec(ctx, req.params.execId)).toJSON())

  app.post('/v1/execs/:execId/signal', {
    schema: {
      operationId: 'signalExec',
      tags: ['execs'],
      summary: 'Send a signal to the exec\'s processes',
      description: '202: accepted for the exec\'s processes (a running exec only; 409 once it has ended). What the signal does shows in the exec\'s end, its exit signal or exit status.',
      params: ExecParamsSchema,
      body: Type.Ref(SignalRequestSchema),
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
      description: 'A running exec is killed; either way the gateway forgets it, and its URL answers 404 exec_not_found from then on.',
      params: ExecParamsSchema,
      response: { 204: Type.Null({ description: 'killed (when it was running) and forgotten' }), 401: P, 403: P, 404: EXEC_NOT_FOUND }
    }
  }, async (req, reply) => {
    ctx.execs.remove(await findExec(ctx, req.params.execId))
    return reply.code(204).send(null)
  })
}
export default execs
