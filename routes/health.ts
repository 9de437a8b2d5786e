import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { ReadinessBodySchema } from '../src/schemas/health.js'
import type { RouteContext } from '../src/http/route-context.js'

const health: FastifyPluginAsyncTypebox<{ ctx: RouteContext }> = async (app, { ctx }) => {
  app.get('/healthz', {
    config: { openAccess: true },
    schema: {
      operationId: 'getHealth',
      tags: ['health'],
      summary: 'Liveness of the gateway process',
      description: 'Always 200 while the process answers HTTP; it says nothing about sandboxes or supervisors (see getReadiness). Needs no token.',
      response: { 200: Type.Object({ status: Type.Literal('ok') }) }
    }
  }, async () => ({ status: 'ok' as const }))

  app.get('/readyz', {
    config: { openAccess: true },
    schema: {
      operationId: 'getReadiness',
      tags: ['health'],
      summary: 'Whether this gateway takes new work (for load balancers)',
      description: '200 once both listeners are up (and the embedded local sandbox, when it runs); 503 while the gateway starts or drains (from the first step of a SIGTERM).',
      response: { 200: ReadinessBodySchema, 503: ReadinessBodySchema }
    }
  }, async (_req, reply) => {
    const status = ctx.readiness()
    return await reply.code(status === 'ready' ? 200 : 503).send({ status })
  })

  app.get('/metrics', {
    schema: { operationId: 'getMetrics', tags: ['health'], summary: 'Prometheus metrics', description: 'The gateway\'s metrics in the Prometheus text exposition format.', produces: ['text/plain'], response: { 200: Type.String() } }
  }, async (_req, reply) => {
    reply.type(ctx.metrics.contentType)
    return await ctx.metrics.render()
  })
}
export default health
