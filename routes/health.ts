import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import type { RouteContext } from './context.js'

const health: FastifyPluginAsyncTypebox<{ ctx: RouteContext }> = async (app, { ctx }) => {
  app.get('/healthz', {
    config: { openAccess: true },
    schema: {
      tags: ['health'],
      summary: 'Liveness of the gateway process',
      response: { 200: Type.Object({ status: Type.Literal('ok') }) }
    }
  }, async () => ({ status: 'ok' as const }))

  app.get('/metrics', {
    schema: { tags: ['health'], summary: 'Prometheus metrics', produces: ['text/plain'], response: { 200: Type.String() } }
  }, async (_req, reply) => {
    reply.type(ctx.metrics.contentType)
    return await ctx.metrics.render()
  })
}
export default health
