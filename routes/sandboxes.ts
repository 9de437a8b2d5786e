import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { GatewayError } from '../src/errors.js'
import type { SandboxEntry } from '../src/relay/sessions.js'
import { ProblemResponse as P, problemResponse } from '../src/schemas/problem.js'
import { SandboxListSchema, SandboxParamsSchema, SandboxSchema, type Sandbox } from '../src/schemas/sandbox.js'
import type { RouteContext } from '../src/http/route-context.js'

function sandboxView (e: SandboxEntry, activeExecs: number): Sandbox {
  return {
    id: e.id,
    status: e.session === undefined ? 'disconnected' : 'connected',
    connectedAt: e.connectedAt?.toISOString() ?? null,
    lastSeenAt: e.lastSeenAt?.toISOString() ?? null,
    activeExecs
  }
}

const sandboxes: FastifyPluginAsyncTypebox<{ ctx: RouteContext }> = async (app, { ctx }) => {
  app.get('/v1/sandboxes', {
    schema: {
      operationId: 'listSandboxes',
      tags: ['sandboxes'],
      summary: 'Sandboxes whose supervisor has connected',
      description: 'Every sandbox whose supervisor has connected since the gateway started (in cluster mode: to any live replica), connected now or not, with its count of running execs.',
      response: { 200: SandboxListSchema, 401: P, 403: P }
    }
  }, async () => ({ sandboxes: ctx.registry.list().map((e) => sandboxView(e, ctx.execs.activeIn(e.id))) }))

  app.get('/v1/sandboxes/:sandboxId', {
    schema: {
      operationId: 'getSandbox',
      tags: ['sandboxes'],
      summary: 'One sandbox',
      description: 'Whether its supervisor is connected now, when it was last seen, and its count of running execs.',
      params: SandboxParamsSchema,
      response: { 200: Type.Ref(SandboxSchema), 401: P, 403: P, 404: problemResponse(['sandbox_not_found'], 'no supervisor for this sandbox has ever connected') }
    }
  }, async (req) => {
    const e = ctx.registry.get(req.params.sandboxId)
    if (e === undefined) throw new GatewayError('sandbox_not_found', `no sandbox ${req.params.sandboxId} has ever connected`)
    return sandboxView(e, ctx.execs.activeIn(e.id))
  })
}
export default sandboxes
