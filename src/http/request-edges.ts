import type { FastifyInstance } from 'fastify'

// What real clients send that the schemas alone would refuse: boolean query values as Python's
// requests (`True`), Perl and curl users (`1`) spell them; a DELETE that declares a JSON body
// and sends none; a known path with the wrong method, which is 405 with Allow, not 404.

const TRUE = new Set(['true', '1', 'yes', 'on'])
const FALSE = new Set(['false', '0', 'no', 'off'])

export function installRequestEdges (app: FastifyInstance): void {
  app.addHook('preValidation', async (request) => {
    const props = (request.routeOptions.schema?.querystring as { properties?: Record<string, { type?: unknown }> } | undefined)?.properties
    const q = request.query as Record<string, unknown> | null
    if (props === undefined || q === null || typeof q !== 'object') return
    for (const [k, v] of Object.entries(q)) {
      if (typeof v !== 'string' || props[k]?.type !== 'boolean') continue
      const spelled = v.toLowerCase()
      if (TRUE.has(spelled)) q[k] = true
      else if (FALSE.has(spelled)) q[k] = false
    }
  })

  // Fastify's own JSON parser (prototype poisoning refused), except that an empty body is no
  // body on methods that take none.
  const json = app.getDefaultJsonParser('error', 'error')
  app.removeContentTypeParser('application/json')
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (request, body, done) => {
    if (body === '' && (request.method === 'DELETE' || request.method === 'GET' || request.method === 'HEAD')) { done(null, undefined); return }
    json(request, body as string, done)
  })
}

// The methods the routes take on a path, for the 405's Allow header (installErrorHandling's
// not-found handler). Call before the routes are added: it learns them as they are.
export function routeMethods (app: FastifyInstance): (path: string) => string[] {
  const routes: Array<{ pattern: RegExp, method: string }> = []
  app.addHook('onRoute', (route) => {
    if (route.url === undefined || route.url.includes('*')) return
    const pattern = new RegExp(`^${route.url.split('/').map((seg) => seg.startsWith(':') ? '[^/]+' : seg.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('/')}$`)
    for (const m of Array.isArray(route.method) ? route.method : [route.method]) routes.push({ pattern, method: m })
  })
  return (path) => [...new Set(routes.filter((r) => r.pattern.test(path)).map((r) => r.method))]
}
