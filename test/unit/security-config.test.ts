// The security-related parts of configuration: token files, TLS flag pairs, the data dir's
// secret rotation, and reading a token's sandbox without its secret.
import { afterEach, describe, expect, it } from 'vitest'
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'
import { ConfigError, loadServeConfig, readTokenFile } from '../../src/config.js'
import { loadDataDir, rotateTokenSecret } from '../../src/data-dir.js'
import { Credentials } from '../../src/credentials.js'
import { sandboxIdOfToken, signSupervisorToken, verifySupervisorToken } from '../../src/tokens.js'

const dirs: string[] = []
function tempDir (): string {
  const d = mkdtempSync(join(tmpdir(), 'egw-seccfg-'))
  dirs.push(d)
  return d
}
afterEach(() => { for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true }) })

function configError (fn: () => unknown): string {
  try { fn() } catch (err) {
    expect(err).toBeInstanceOf(ConfigError)
    return (err as Error).message
  }
  throw new Error('expected a ConfigError')
}

describe('--api-token-file', () => {
  it('one token per line; blank lines and # comments skipped; whitespace trimmed', () => {
    const f = join(tempDir(), 't')
    writeFileSync(f, '# team a\r\n  alpha \n\n#beta\ngamma\n')
    expect(readTokenFile(f)).toEqual(['alpha', 'gamma'])
  })

  it('adds to --api-token, and satisfies the non-loopback rule', () => {
    const f = join(tempDir(), 't')
    writeFileSync(f, 'from-file\n')
    const c = loadServeConfig(['--listen', '0.0.0.0:0', '--api-token', 'a,b', '--api-token-file', f], {})
    expect(c.apiTokens).toEqual(['a', 'b', 'from-file'])
  })

  it('a file with only comments does not count as tokens for a non-loopback listen', () => {
    const f = join(tempDir(), 't')
    writeFileSync(f, '# nobody yet\n')
    expect(configError(() => loadServeConfig(['--listen', '0.0.0.0:0', '--api-token-file', f], {}))).toMatch(/not a loopback address and no --api-token/)
  })

  it('a missing file names the flag and the error', () => {
    expect(configError(() => loadServeConfig(['--api-token-file', '/nonexistent/x'], {}))).toMatch(/--api-token-file \/nonexistent\/x: ENOENT/)
  })
})

describe('TLS flags', () => {
  it('cert and key go together, for each listener', () => {
    const d = tempDir()
    writeFileSync(join(d, 'c'), 'x')
    expect(configError(() => loadServeConfig(['--tls-cert', join(d, 'c')], {}))).toMatch(/--tls-cert and --tls-key go together/)
    expect(configError(() => loadServeConfig(['--supervisor-tls-key', join(d, 'c')], {}))).toMatch(/--supervisor-tls-cert and --supervisor-tls-key go together/)
  })

  it('unreadable files are refused at start, naming the flag', () => {
    const d = tempDir()
    writeFileSync(join(d, 'c'), 'x')
    expect(configError(() => loadServeConfig(['--tls-cert', join(d, 'c'), '--tls-key', join(d, 'missing')], {}))).toMatch(/--tls-key .*missing: ENOENT/)
  })

  it('both given: the config carries the file names (read again on reload)', () => {
    const d = tempDir()
    writeFileSync(join(d, 'c'), 'x')
    writeFileSync(join(d, 'k'), 'y')
    const c = loadServeConfig(['--supervisor-tls-cert', join(d, 'c'), '--supervisor-tls-key', join(d, 'k')], {})
    expect(c.supervisorTls).toEqual({ certFile: join(d, 'c'), keyFile: join(d, 'k') })
    expect(c.tls).toBeUndefined()
  })
})

describe('token secret rotation in the data dir', () => {
  it('start keeps the old secret accepted and signs with the new one; retire drops the old one', () => {
    const d = tempDir()
    const before = loadDataDir(d)
    const oldToken = signSupervisorToken(before.tokenSecret, 'sbx')
    expect(before.tokenSecrets).toHaveLength(1)

    rotateTokenSecret(d, 'start')
    const during = loadDataDir(d)
    expect(during.tokenSecret.equals(before.tokenSecret)).toBe(false)
    expect(during.tokenSecrets).toHaveLength(2)
    expect(verifySupervisorToken(during.tokenSecrets, oldToken)).toEqual({ ok: true, sandboxId: 'sbx' })
    const newToken = signSupervisorToken(during.tokenSecret, 'sbx')
    expect(verifySupervisorToken(during.tokenSecrets, newToken).ok).toBe(true)
    for (const f of ['token_secret', 'token_secret.previous']) expect(statSync(join(d, f)).mode & 0o777).toBe(0o600)

    rotateTokenSecret(d, 'retire')
    const after = loadDataDir(d)
    expect(after.tokenSecrets).toHaveLength(1)
    expect(verifySupervisorToken(after.tokenSecrets, oldToken)).toEqual({ ok: false, reason: 'bad signature' })
    expect(verifySupervisorToken(after.tokenSecrets, newToken).ok).toBe(true)
    expect(existsSync(join(d, 'token_secret.previous'))).toBe(false)
  })

  it('a second start replaces the previous secret: only the last two are accepted', () => {
    const d = tempDir()
    const first = signSupervisorToken(loadDataDir(d).tokenSecret, 'sbx')
    rotateTokenSecret(d, 'start')
    const second = signSupervisorToken(loadDataDir(d).tokenSecret, 'sbx')
    rotateTokenSecret(d, 'start')
    const secrets = loadDataDir(d).tokenSecrets
    expect(verifySupervisorToken(secrets, first).ok).toBe(false)
    expect(verifySupervisorToken(secrets, second).ok).toBe(true)
    expect(readFileSync(join(d, 'token_secret.previous'), 'utf8')).not.toBe(readFileSync(join(d, 'token_secret'), 'utf8'))
  })

  it('Credentials.reload picks the rotation up', () => {
    const d = tempDir()
    const identity = loadDataDir(d)
    const creds = new Credentials(loadServeConfig(['--data-dir', d], {}), identity, pino({ level: 'silent' }))
    expect(creds.tokenSecrets).toHaveLength(1)
    rotateTokenSecret(d, 'start')
    expect(creds.reload().tokenSecrets).toBe(2)
    rotateTokenSecret(d, 'retire')
    expect(creds.reload().tokenSecrets).toBe(1)
    expect(creds.tokenSecrets[0]!.equals(identity.tokenSecret)).toBe(false)
  })
})

describe('sandboxIdOfToken', () => {
  it('reads the sandbox a token names without verifying it', () => {
    expect(sandboxIdOfToken(signSupervisorToken(Buffer.alloc(32, 1), 'my-sbx.1'))).toBe('my-sbx.1')
    expect(sandboxIdOfToken('garbage')).toBeUndefined()
    expect(sandboxIdOfToken('egw2.a.b.c')).toBeUndefined()
  })
})
