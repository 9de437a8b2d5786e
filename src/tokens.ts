import { createHmac, timingSafeEqual } from 'node:crypto'
import { SANDBOX_ID_PATTERN, SANDBOX_ID_RULE } from './schemas/sandbox.js'

// Supervisor tokens: HMAC-SHA256 over the sandbox id and an optional expiry, so a token speaks
// for exactly one sandbox. Format: egw1.<base64url(sandboxId)>.<expiry unix s, 0 = none>.<mac>

const PREFIX = 'egw1'

function mac (secret: Buffer, sandboxId: string, expiresAtS: number): Buffer {
  return createHmac('sha256', secret).update(`${PREFIX}\n${sandboxId}\n${expiresAtS}`).digest()
}

export function signSupervisorToken (secret: Buffer, sandboxId: string, expiresAtS = 0): string {
  if (!SANDBOX_ID_PATTERN.test(sandboxId)) throw new TypeError(`invalid sandbox id ${JSON.stringify(sandboxId)}: use ${SANDBOX_ID_RULE}`)
  const id = Buffer.from(sandboxId).toString('base64url')
  return `${PREFIX}.${id}.${expiresAtS}.${mac(secret, sandboxId, expiresAtS).toString('base64url')}`
}

export type TokenCheck = { ok: true, sandboxId: string } | { ok: false, reason: string }

export function verifySupervisorToken (secrets: readonly Buffer[], token: string, nowS = Math.floor(Date.now() / 1000)): TokenCheck {
  const parts = token.split('.')
  if (parts.length !== 4 || parts[0] !== PREFIX) return { ok: false, reason: 'malformed token' }
  const sandboxId = Buffer.from(parts[1]!, 'base64url').toString()
  const expiresAtS = Number(parts[2])
  if (!SANDBOX_ID_PATTERN.test(sandboxId) || !Number.isSafeInteger(expiresAtS) || expiresAtS < 0) return { ok: false, reason: 'malformed token' }
  const given = Buffer.from(parts[3]!, 'base64url')
  // base64url's last character has spare bits: only the canonical spelling of a MAC is the MAC.
  if (given.toString('base64url') !== parts[3] || Buffer.from(sandboxId).toString('base64url') !== parts[1]) return { ok: false, reason: 'malformed token' }
  const valid = secrets.some((secret) => {
    const want = mac(secret, sandboxId, expiresAtS)
    return given.length === want.length && timingSafeEqual(given, want)
  })
  if (!valid) return { ok: false, reason: 'bad signature' }
  if (expiresAtS !== 0 && expiresAtS < nowS) return { ok: false, reason: 'token expired' }
  return { ok: true, sandboxId }
}

// The sandbox a token names, unverified (the supervisor has no secret): for early, clear errors.
export function sandboxIdOfToken (token: string): string | undefined {
  const parts = token.split('.')
  if (parts.length !== 4 || parts[0] !== PREFIX) return undefined
  return Buffer.from(parts[1]!, 'base64url').toString()
}

// API bearer tokens, compared in constant time whatever their length.
export function matchesApiToken (tokens: readonly string[], given: string): boolean {
  const g = createHmac('sha256', 'api-token').update(given).digest()
  let ok = false
  for (const t of tokens) {
    const w = createHmac('sha256', 'api-token').update(t).digest()
    if (timingSafeEqual(g, w)) ok = true
  }
  return ok
}
