import { mkdirSync, readFileSync, writeFileSync, existsSync, chmodSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { randomBytes } from 'node:crypto'
import ssh2 from 'ssh2'
import { generateEd25519KeyPair } from './ssh-keys.js'

// The gateway's persistent identity: its SSH client key (which sandboxes authorize) and the
// secret that signs supervisor tokens. Created on first use, readable by the owner only.

export interface GatewayIdentity {
  dir: string
  privateKey: string
  publicKey: string
  tokenSecret: Buffer
}

const KEY_FILE = 'ssh_client_ed25519'
const SECRET_FILE = 'token_secret'

export function loadDataDir (dir: string): GatewayIdentity {
  const abs = resolve(dir)
  mkdirSync(abs, { recursive: true, mode: 0o700 })
  const keyPath = join(abs, KEY_FILE)
  if (!existsSync(keyPath)) {
    const pair = generateEd25519KeyPair()
    writeFileSync(keyPath, pair.private, { mode: 0o600, flag: 'wx' })
    writeFileSync(keyPath + '.pub', pair.public + '\n', { mode: 0o600, flag: 'wx' })
  }
  const secretPath = join(abs, SECRET_FILE)
  if (!existsSync(secretPath)) writeFileSync(secretPath, randomBytes(32).toString('hex') + '\n', { mode: 0o600, flag: 'wx' })
  chmodSync(keyPath, 0o600)
  chmodSync(secretPath, 0o600)
  const privateKey = readFileSync(keyPath, 'utf8')
  const publicKey = publicKeyOf(privateKey)
  const tokenSecret = Buffer.from(readFileSync(secretPath, 'utf8').trim(), 'hex')
  if (tokenSecret.length < 16) throw new Error(`${secretPath} is not a valid token secret`)
  return { dir: abs, privateKey, publicKey, tokenSecret }
}

// OpenSSH one-line form, derived from the private key so the .pub file can never disagree.
export function publicKeyOf (privateKey: string | Buffer): string {
  const parsed = ssh2.utils.parseKey(privateKey)
  const key = Array.isArray(parsed) ? parsed[0] : parsed
  if (key === undefined || key instanceof Error) throw new Error(`cannot parse SSH private key: ${String(key)}`)
  return `${key.type} ${key.getPublicSSH().toString('base64')} exec-gateway`
}
