import { existsSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { FastifyPluginAsync } from 'fastify'
import fastifyStatic from '@fastify/static'
import type { RouteContext } from '../src/http/route-context.js'

// The browser dashboard: static files from public/ at /, and xterm.js straight from its npm
// package, so there is no bundler or build server at run time. Every route here is readable
// without a token (the page itself asks for one) and kept out of the OpenAPI document.

// This file runs as routes/dashboard.ts under vitest and as dist/routes/dashboard.js when built,
// so public/ and node_modules are found from the package root, not from this file's directory.
function packageRoot (from: string = fileURLToPath(import.meta.url)): string {
  let dir = dirname(from)
  for (;;) {
    if (existsSync(join(dir, 'package.json'))) return dir
    const up = dirname(dir)
    if (up === dir) throw new Error(`no package.json above ${from}`)
    dir = up
  }
}

// Resolved like an import from the package root, so a hoisted copy (exec-gateway installed as a
// dependency) is found as well as the checkout's own node_modules.
function packageDir (root: string, name: string): string {
  return dirname(createRequire(join(root, 'package.json')).resolve(`${name}/package.json`))
}

// The page runs commands, so it must not be framed by another site (clickjacking) nor load
// anything from elsewhere. xterm.js writes <style> elements at run time, hence 'unsafe-inline'
// for styles only.
const CONTENT_SECURITY_POLICY = [
  "default-src 'self'",
  "connect-src 'self'",
  "style-src 'self' 'unsafe-inline'",
  "img-src 'self' data:",
  "object-src 'none'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'"
].join('; ')

const dashboard: FastifyPluginAsync<{ ctx: RouteContext }> = async (app, { ctx }) => {
  const root = packageRoot()
  const publicDir = join(root, 'public')
  if (!existsSync(join(publicDir, 'index.html'))) throw new Error(`dashboard files are missing: ${publicDir}/index.html`)

  // @fastify/static cannot take route config, and the guard decides on route config: every
  // route of this (encapsulated) plugin, including the static plugin's, is marked here.
  app.addHook('onRoute', (route) => {
    route.config = { ...route.config, openAccess: true }
    route.schema = { ...route.schema, hide: true }
  })
  app.addHook('onSend', async (_req, reply, payload) => {
    reply.header('content-security-policy', CONTENT_SECURITY_POLICY)
    reply.header('x-content-type-options', 'nosniff')
    return payload
  })

  // What the page cannot learn from the API: how long a healthy stream may stay silent (the
  // heartbeat comes after --heartbeat-interval-ms without output), so that it does not take a
  // quiet exec for a dead link. Read before a token is saved, like the page; it tells no more
  // than any stream's heartbeat timing does.
  app.get('/dashboard/config', async (_req, reply) => {
    void reply.header('cache-control', 'no-store')
    return { heartbeatIntervalMs: ctx.heartbeatIntervalMs }
  })

  // wildcard: false registers one route per file found at start, so unknown paths (a mistyped
  // /v1 route, say) still reach the API's 404 and guard instead of an open static catch-all.
  await app.register(fastifyStatic, { root: publicDir, prefix: '/', wildcard: false, index: 'index.html' })

  const onlyBuilt = (pathName: string): boolean => /^\/(lib|css)\/[\w.-]+$/.test(pathName)
  await app.register(fastifyStatic, {
    root: packageDir(root, '@xterm/xterm'), prefix: '/assets/xterm/', decorateReply: false, allowedPath: onlyBuilt
  })
  await app.register(fastifyStatic, {
    root: packageDir(root, '@xterm/addon-fit'), prefix: '/assets/xterm-addon-fit/', decorateReply: false, allowedPath: onlyBuilt
  })
}
export default dashboard
