import { timingSafeEqual } from 'node:crypto'
import ssh2 from 'ssh2'
import type { AuthContext, ParsedKey, PublicKey } from 'ssh2'

// ssh2 is CommonJS and Node's ESM loader only detects some of its exports as named exports
// (`Client` yes, `Server` and `utils` no), so the default import is the reliable one.
const { utils } = ssh2

/** A parsed authorized key: the wire-format public key blob plus the key object to verify with. */
export interface AuthorizedKey {
  type: string
  blob: Buffer
  key: ParsedKey
}

/**
 * Parses OpenSSH one-line public keys. A line that does not parse throws: a typo in the key list
 * would otherwise surface much later as an unexplained "authentication failed".
 */
export function parseAuthorizedKeys (lines: readonly string[]): AuthorizedKey[] {
  return lines.map((line, i) => {
    const parsed = utils.parseKey(line.trim())
    if (parsed instanceof Error) {
      throw new Error(`authorizedKeys[${i}] is not a valid OpenSSH public key: ${parsed.message}`)
    }
    return { type: parsed.type, blob: parsed.getPublicSSH(), key: parsed }
  })
}

// RSA keys authenticate with an rsa-sha2-* signature algorithm name, but the key itself is still
// of type ssh-rsa; ssh2 hands us the algorithm name.
function keyTypeOf (algo: string): string {
  return algo === 'rsa-sha2-256' || algo === 'rsa-sha2-512' ? 'ssh-rsa' : algo
}

// Constant-time on equal lengths; the key blobs themselves are public, but there is no reason to
// make the comparison a timing oracle either.
function sameBytes (a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b)
}

function findAuthorizedKey (keys: readonly AuthorizedKey[], offered: PublicKey): AuthorizedKey | undefined {
  const type = keyTypeOf(offered.algo)
  return keys.find((k) => k.type === type && sameBytes(k.blob, offered.data))
}

/**
 * Decides one authentication attempt: only `publickey` with an authorized key and, once the
 * client sends one, a valid signature. The username is not checked: the daemon runs every
 * command as the user running it.
 */
export function authenticate (ctx: AuthContext, keys: readonly AuthorizedKey[]): boolean {
  if (ctx.method !== 'publickey') {
    ctx.reject(['publickey'])
    return false
  }
  const match = findAuthorizedKey(keys, ctx.key)
  if (match === undefined) {
    ctx.reject(['publickey'])
    return false
  }
  // Without a signature the client only asks whether this key would be acceptable; accept()
  // answers with PK_OK and the client comes back with a signed request.
  if (ctx.signature === undefined) {
    ctx.accept()
    return false
  }
  if (ctx.blob === undefined || match.key.verify(ctx.blob, ctx.signature, ctx.hashAlgo) !== true) {
    ctx.reject(['publickey'])
    return false
  }
  ctx.accept()
  return true
}
