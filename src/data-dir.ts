import { mkdirSync, readFileSync, writeFileSync, existsSync, chmodSync, renameSync, rmSync } from 'node:fs'
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
  // Signs new supervisor tokens.
  tokenSecret: Buffer
  // Verify supervisor tokens: the current secret, and during a rotation the previous one.
  tokenSecrets: readonly Buffer[]
}

const KEY_FILE = 'ssh_client_ed25519'
const SECRET_FILE = 'token_secret'
const PREVIOUS_SECRET_FILE = 'token_secret.previous'
const RUN_MARKER_FILE = 'gateway_ran'

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
  const tokenSecret = readSecret(secretPath)
  const previousPath = join(abs, PREVIOUS_SECRET_FILE)
  const tokenSecrets = existsSync(previousPath) ? [tokenSecret, readSecret(previousPath)] : [tokenSecret]
  return { dir: abs, privateKey, publicKey, tokenSecret, tokenSecrets }
}

// Whether a gateway has run on this data dir before (and note that one runs now). Only a gateway
// that restarts can have execs its sandboxes kept; a fresh one answers unknown exec ids at once.
export function markGatewayRun (dir: string): boolean {
  const marker = join(resolve(dir), RUN_MARKER_FILE)
  if (existsSync(marker)) return true
  writeFileSync(marker, new Date().toISOString() + '\n', { mode: 0o600 })
  return false
}

function readSecret (path: string): Buffer {
  const secret = Buffer.from(readFileSync(path, 'utf8').trim(), 'hex')
  if (secret.length < 16) throw new Error(`${path} is not a valid token secret`)
  return secret
}

// Rotation in two steps, so supervisors can be re-tokened without an outage: `start` makes a
// new signing secret and keeps the old one accepted; `retire` stops accepting the old one. A
// running gateway picks either up on SIGHUP.
export function rotateTokenSecret (dir: string, step: 'start' | 'retire'): { previousAccepted: boolean } {
  const abs = resolve(dir)
  loadDataDir(abs)
  const secretPath = join(abs, SECRET_FILE)
  const previousPath = join(abs, PREVIOUS_SECRET_FILE)
  if (step === 'retire') {
    rmSync(previousPath, { force: true })
    return { previousAccepted: false }
  }
  const next = join(abs, SECRET_FILE + '.next')
  rmSync(next, { force: true })
  writeFileSync(next, randomBytes(32).toString('hex') + '\n', { mode: 0o600, flag: 'wx' })
  const previousNext = previousPath + '.next'
  rmSync(previousNext, { force: true })
  writeFileSync(previousNext, readFileSync(secretPath), { mode: 0o600, flag: 'wx' })
  // Renames over the old files, so a gateway reading the directory at any moment sees a
  // whole current secret (never none, which would make a new one).
  renameSync(previousNext, previousPath)
  renameSync(next, secretPath)
  return { previousAccepted: true }
}

// OpenSSH one-line form, derived from the private key so the .pub file can never disagree.
export function publicKeyOf (privateKey: string | Buffer): string {
  const parsed = ssh2.utils.parseKey(privateKey)
  const key = Array.isArray(parsed) ? parsed[0] : parsed
  if (key === undefined || key instanceof Error) throw new Error(`cannot parse SSH private key: ${String(key)}`)
  return `${key.type} ${key.getPublicSSH().toString('base64')} exec-gateway`
}
