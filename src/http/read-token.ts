import { createHmac, hkdfSync, timingSafeEqual } from 'node:crypto'

// Read tokens: what a browser's EventSource (which cannot send Authorization) puts in its URL.
// A bearer-authenticated call mints one for one exec; it lets GET .../events and .../stream of
// that exec only, until it expires, and a WebSocket opened with it sends nothing to the exec.
// Stateless: an HMAC over the version, the exec id and the expiry, keyed with a key derived from
// the data dir's token secret, so every replica of a cluster verifies what any one minted, and
// a leaked read token (or its key) signs neither supervisor tokens nor replica requests.
// Format: egr1.<expiry unix s>.<base64url mac>; the exec id is the URL's own, not repeated.

// RFC 6750 §2.3's name for a bearer token in the query.
export const ACCESS_TOKEN_PARAM = 'access_token'

const VERSION = 'egr1'
const LABEL = 'exec-gateway exec read token v1'

function key (tokenSecret: Buffer): Buffer {
  return Buffer.from(hkdfSync('sha256', tokenSecret, Buffer.alloc(0), LABEL, 32))
}

function mac (tokenSecret: Buffer, execId: string, expiresAtS: number): Buffer {
  return createHmac('sha256', key(tokenSecret)).update(`${VERSION}\n${execId}\n${expiresAtS}`).digest()
}

export function mintReadToken (tokenSecret: Buffer, execId: string, expiresAtS: number): string {
  return `${VERSION}.${expiresAtS}.${mac(tokenSecret, execId, expiresAtS).toString('base64url')}`
}

export type ReadTokenCheck = { ok: true, expiresAtS: number } | { ok: false, reason: string }

// Every accepted secret (the previous one too, during a rotation) is tried.
export function verifyReadToken (secrets: readonly Buffer[], token: string, execId: string, nowS = Math.floor(Date.now() / 1000)): ReadTokenCheck {
  const parts = token.split('.')
  if (parts.length !== 3 || parts[0] !== VERSION) return { ok: false, reason: 'malformed read token' }
  const expiresAtS = Number(parts[1])
  if (!/^[1-9]\d{0,11}$/.test(parts[1]!) || !Number.isSafeInteger(expiresAtS)) return { ok: false, reason: 'malformed read token' }
  const given = Buffer.from(parts[2]!, 'base64url')
  // base64url's last character has spare bits: only the canonical spelling of a MAC is the MAC.
  if (given.toString('base64url') !== parts[2]) return { ok: false, reason: 'malformed read token' }
  const valid = secrets.some((secret) => {
    const want = mac(secret, execId, expiresAtS)
    return given.length === want.length && timingSafeEqual(given, want)
  })
  // A token for another exec fails here too: its MAC was made over that exec's id.
  if (!valid) return { ok: false, reason: 'read token not valid for this exec' }
  if (expiresAtS <= nowS) return { ok: false, reason: 'read token expired' }
  return { ok: true, expiresAtS }
}

function queryOf (url: string): string {
  const q = url.indexOf('?')
  if (q === -1) return ''
  const hash = url.indexOf('#', q)
  return url.slice(q + 1, hash === -1 ? undefined : hash)
}

function decodedName (pair: string): string {
  const name = pair.split('=', 1)[0]!.replaceAll('+', ' ')
  try { return decodeURIComponent(name) } catch { return name }
}

// Every access_token value in a raw request URL (percent-escaped names too, as the router's
// query parser reads them): more than one is refused, not picked from.
export function accessTokensIn (url: string): string[] {
  const query = queryOf(url)
  if (!query.includes('token') && !query.includes('%')) return []
  return new URLSearchParams(query).getAll(ACCESS_TOKEN_PARAM)
}

// The URL as logs may show it: each access_token value replaced, the rest kept as it came.
export function redactAccessTokens (url: string): string {
  const q = url.indexOf('?')
  if (q === -1) return url
  const query = queryOf(url)
  if (!query.includes('token') && !query.includes('%')) return url
  const rest = url.slice(q + 1 + query.length)
  const pairs = query.split('&').map((p) => decodedName(p) === ACCESS_TOKEN_PARAM ? `${ACCESS_TOKEN_PARAM}=[redacted]` : p)
  return `${url.slice(0, q + 1)}${pairs.join('&')}${rest}`
}
