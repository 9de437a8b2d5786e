import { readFileSync, statSync } from 'node:fs'
import type { Logger } from 'pino'
import { readTokenFile, splitTokens, type GatewayConfig, type TlsFiles } from './config.js'
import { loadDataDir, type GatewayIdentity } from './data-dir.js'

// Everything a running gateway may re-read without a restart (SIGHUP): API tokens from
// --api-token-file, the supervisor token secrets of a rotation, and TLS certificates.

export interface TlsMaterial { cert: Buffer, key: Buffer }

export function readTls (files: TlsFiles): TlsMaterial {
  return { cert: readFileSync(files.certFile), key: readFileSync(files.keyFile) }
}

export class Credentials {
  #apiTokens: readonly string[]
  #tokenSecrets: readonly Buffer[]
  readonly #config: GatewayConfig
  readonly #identity: GatewayIdentity
  readonly #log: Logger

  constructor (config: GatewayConfig, identity: GatewayIdentity, logger: Logger) {
    this.#config = config
    this.#identity = identity
    this.#log = logger
    this.#apiTokens = config.apiTokens
    this.#tokenSecrets = identity.tokenSecrets
    if (config.apiTokenFile !== undefined) warnIfReadableByOthers(config.apiTokenFile, logger)
  }

  get apiTokens (): readonly string[] { return this.#apiTokens }
  get tokenSecrets (): readonly Buffer[] { return this.#tokenSecrets }

  // Each part is replaced only when it reads cleanly: a half-written token file must not lock
  // everyone out, nor leave a token-protected gateway open.
  reload (): { apiTokens: number, tokenSecrets: number } {
    const file = this.#config.apiTokenFile
    if (file !== undefined) {
      try {
        const tokens = [...splitTokens(this.#config.apiToken ?? ''), ...readTokenFile(file)]
        if (tokens.length === 0 && this.#apiTokens.length > 0) {
          this.#log.error({ file }, 'the API token file now has no tokens; keeping the previous ones')
        } else {
          this.#apiTokens = tokens
          warnIfReadableByOthers(file, this.#log)
        }
      } catch (err) {
        this.#log.error({ file, err: (err as Error).message }, 'cannot re-read the API token file; keeping the previous tokens')
      }
    }
    if (this.#identity.dir !== '') {
      try {
        this.#tokenSecrets = loadDataDir(this.#identity.dir).tokenSecrets
      } catch (err) {
        this.#log.error({ err: (err as Error).message }, 'cannot re-read the token secrets; keeping the previous ones')
      }
    }
    return { apiTokens: this.#apiTokens.length, tokenSecrets: this.#tokenSecrets.length }
  }
}

function warnIfReadableByOthers (file: string, log: Logger): void {
  try {
    if ((statSync(file).mode & 0o077) !== 0) log.warn({ file }, 'the API token file is readable by other users; chmod 600 it')
  } catch { /* reported by whoever reads it */ }
}
