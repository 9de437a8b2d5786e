import type { FastifyInstance } from 'fastify'
import type { RouteContext } from '../src/http/route-context.js'
import health from './health.js'
import sandboxes from './sandboxes.js'
import execs from './execs.js'
import execEvents from './exec-events.js'
import execStream from './exec-stream.js'
import execReadToken from './exec-read-token.js'

// Every public route, registered explicitly (no autoload: greppable and type-checked).
export async function registerRoutes (app: FastifyInstance, ctx: RouteContext): Promise<void> {
  await app.register(health, { ctx })
  await app.register(sandboxes, { ctx })
  await app.register(execs, { ctx })
  await app.register(execEvents, { ctx })
  await app.register(execStream, { ctx })
  await app.register(execReadToken, { ctx })
  await app.register(import('./dashboard.js'), { ctx })
  if (ctx.internal === true) await app.register(import('./internal.js'), { ctx })
}
