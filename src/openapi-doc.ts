import { randomBytes } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import pino from 'pino'
import { buildGateway } from './app.js'
import { defaultGatewayConfig } from './config.js'
import { publicKeyOf } from './data-dir.js'
import { generateEd25519KeyPair } from './ssh-keys.js'

// The OpenAPI document, generated from the route schemas: the routes are the only source of
// truth, and openapi/openapi.json is this function's output, committed.

export async function generateOpenApiDocument (): Promise<Record<string, unknown>> {
  const pair = generateEd25519KeyPair()
  const tokenSecret = randomBytes(32)
  const identity = { dir: '', privateKey: pair.private, publicKey: publicKeyOf(pair.private), tokenSecret, tokenSecrets: [tokenSecret] }
  const gw = await buildGateway(defaultGatewayConfig(), { logger: pino({ level: 'silent' }), identity })
  try {
    await gw.app.ready()
    return gw.app.swagger() as unknown as Record<string, unknown>
  } finally {
    await gw.close()
  }
}

export function serializeOpenApi (doc: Record<string, unknown>): string {
  return JSON.stringify(doc, null, 2) + '\n'
}

// `npm run openapi` writes the committed copy.
if (process.argv[1] !== undefined && import.meta.url === new URL(`file://${process.argv[1]}`).href) {
  const out = process.argv[2] ?? 'openapi/openapi.json'
  writeFileSync(out, serializeOpenApi(await generateOpenApiDocument()))
  process.stdout.write(`wrote ${out}\n`)
}
