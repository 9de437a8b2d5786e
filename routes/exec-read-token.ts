import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { ACCESS_TOKEN_PARAM, mintReadToken } from '../src/http/read-token.js'
import { ExecParamsSchema, READ_TOKEN_DEFAULT_TTL_S, ReadTokenQuerySchema, ReadTokenSchema } from '../src/schemas/exec.js'
import { ProblemResponse } from '../src/schemas/problem.js'
import { EXEC_NOT_FOUND, findExec } from './execs.js'
import type { RouteContext } from '../src/http/route-context.js'

// Mints the one credential a URL may carry (src/http/read-token.ts): for a browser's
// EventSource, which cannot send Authorization, and for links that should only watch. The
// lifetime is a query parameter, not a body: a bare POST (curl -X POST, fetch without a body)
// is the common call, and Fastify would validate an absent body as an empty one.

const P = ProblemResponse

const execReadToken: FastifyPluginAsyncTypebox<{ ctx: RouteContext }> = async (app, { ctx }) => {
  app.post('/v1/execs/:execId/read-token', {
    schema: {
      operationId: 'createExecReadToken',
      tags: ['execs'],
      summary: 'A short-lived, read-only token for one exec\'s events and stream, to put in a URL',
      description: `Needs the bearer token (a read token cannot mint another). The token goes in the query as ?${ACCESS_TOKEN_PARAM}= on GET /v1/execs/{execId}/events and GET /v1/execs/{execId}/stream of this exec only, until expiresAt; every other route refuses it with 401. A WebSocket attached with it is read-only: any client frame closes it with 1008. The gateway never logs it. It takes no body: the lifetime is the query's ttlSeconds.`,
      params: ExecParamsSchema,
      querystring: ReadTokenQuerySchema,
      response: { 201: Type.Ref(ReadTokenSchema), 400: P, 401: P, 403: P, 404: EXEC_NOT_FOUND }
    }
  }, async (req, reply) => {
    const entry = await findExec(ctx, req.params.execId)
    const ttlS = req.query.ttlSeconds ?? READ_TOKEN_DEFAULT_TTL_S
    const expiresAtS = Math.floor(Date.now() / 1000) + ttlS
    const token = mintReadToken(ctx.tokenSecrets()[0]!, entry.id, expiresAtS)
    const path = `/v1/execs/${encodeURIComponent(entry.id)}`
    const query = `?${ACCESS_TOKEN_PARAM}=${encodeURIComponent(token)}`
    return await reply.code(201).header('cache-control', 'no-store').send({
      token,
      execId: entry.id,
      expiresAt: new Date(expiresAtS * 1000).toISOString(),
      eventsUrl: `${path}/events${query}`,
      streamUrl: `${path}/stream${query}`
    })
  })
}
export default execReadToken
