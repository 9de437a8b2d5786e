import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { GatewayError } from '../src/errors.js'
import type { RouteContext } from '../src/http/route-context.js'
import { ExecParamsSchema } from '../src/schemas/exec.js'
import { SandboxParamsSchema } from '../src/schemas/sandbox.js'
import { sendWaitResult } from '../src/http/wait-result.js'

// Routes of the internal listener only (cluster mode), for other replicas: never in the public
// API document. A replica whose client waits on an exec that moved here (its sandbox's
// supervisor moved) asks for the result here and passes it on.
const internal: FastifyPluginAsyncTypebox<{ ctx: RouteContext }> = async (app, { ctx }) => {
  app.get('/internal/v1/execs/:execId/result', {
    schema: {
      hide: true,
      params: ExecParamsSchema,
      querystring: Type.Object({ encoding: Type.Optional(Type.Union([Type.Literal('utf8'), Type.Literal('base64')])) }, { additionalProperties: false })
    }
  }, async (req, reply) => {
    const entry = ctx.execs.held(req.params.execId)
    // The asking replica found this one named as the exec's owner: a record that is behind (the
    // exec moved on, or this replica let go of it while shutting down), so it looks again.
    if (entry === undefined) throw new GatewayError('replica_unavailable', `replica does not hold exec ${req.params.execId} (it moved on, or is moving): look again`)
    await ctx.execs.waitForEnd(entry)
    if (entry.movedAway) throw new GatewayError('replica_unavailable', `exec ${entry.id} moved on to another replica while its result was awaited here`)
    return await sendWaitResult(entry, req.query.encoding ?? 'utf8', reply)
  })

  // The replica that just took the sandbox says so, so that this one lets go of its execs now
  // rather than at its next check (the two would take the daemon's attachment from each other).
  app.post('/internal/v1/sandboxes/:sandboxId/moved', { schema: { hide: true, params: SandboxParamsSchema } }, async (req, reply) => {
    await ctx.sandboxMoved?.(req.params.sandboxId)
    return await reply.code(204).send()
  })
}
export default internal
