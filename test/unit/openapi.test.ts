import { describe, it, expect, afterAll } from 'vitest'
import { readFileSync } from 'node:fs'
import { generateOpenApiDocument, serializeOpenApi } from '../../src/openapi-doc.js'
import { startGateway, type TestGateway } from '../helpers/gateway.js'

// openapi/openapi.json is generated from the route schemas; it must never drift from them.

const committed = readFileSync(new URL('../../openapi/openapi.json', import.meta.url), 'utf8')

describe('OpenAPI document', () => {
  let g: TestGateway | undefined
  afterAll(async () => { await g?.close() })

  it('matches the routes (run `npm run openapi` after changing a route)', async () => {
    const fresh = serializeOpenApi(await generateOpenApiDocument())
    expect(JSON.parse(fresh)).toEqual(JSON.parse(committed))
  })

  it('is served at /openapi.json and covers every public route', async () => {
    g = await startGateway()
    const res = await fetch(`${g.publicUrl}/openapi.json`)
    expect(res.status).toBe(200)
    const served = await res.json() as { openapi: string, paths: Record<string, Record<string, unknown>> }
    expect(served).toEqual(JSON.parse(committed))
    expect(served.openapi).toBe('3.1.0')
    for (const [path, method] of [
      ['/healthz', 'get'], ['/metrics', 'get'], ['/v1/sandboxes', 'get'], ['/v1/sandboxes/{sandboxId}', 'get'],
      ['/v1/sandboxes/{sandboxId}/execs', 'post'], ['/v1/execs', 'get'], ['/v1/execs/{execId}', 'get'],
      ['/v1/execs/{execId}', 'delete'], ['/v1/execs/{execId}/signal', 'post'], ['/v1/execs/{execId}/events', 'get']
    ] as const) {
      expect(served.paths[path]?.[method], `${method.toUpperCase()} ${path}`).toBeDefined()
    }
  })
})
