import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import selfsigned from 'selfsigned'

// Real X.509 material for TLS tests: a CA of our own and server certificates it issues for the
// loopback names, written to files as an operator would have them.

export interface CertAuthority { key: string, cert: string, certFile: string }
export interface ServerCert { certFile: string, keyFile: string, cert: string }

export interface CertDir {
  dir: string
  ca: (name: string) => Promise<CertAuthority>
  server: (ca: CertAuthority, name: string) => Promise<ServerCert>
  remove: () => void
}

const LOOPBACK_NAMES: Array<{ type: 2, value: string } | { type: 7, ip: string }> = [
  { type: 2, value: 'localhost' },
  { type: 7, ip: '127.0.0.1' },
  { type: 7, ip: '::1' }
]

export function certDir (): CertDir {
  const dir = mkdtempSync(join(tmpdir(), 'egw-tls-'))
  return {
    dir,
    ca: async (name) => {
      const p = await selfsigned.generate([{ name: 'commonName', value: `${name} test CA` }], {
        keyType: 'ec',
        algorithm: 'sha256',
        extensions: [{ name: 'basicConstraints', cA: true, critical: true }, { name: 'keyUsage', keyCertSign: true, cRLSign: true, critical: true }]
      })
      const certFile = join(dir, `${name}-ca.pem`)
      writeFileSync(certFile, p.cert)
      return { key: p.private, cert: p.cert, certFile }
    },
    server: async (ca, name) => {
      const p = await selfsigned.generate([{ name: 'commonName', value: 'localhost' }], {
        keyType: 'ec',
        algorithm: 'sha256',
        ca: { key: ca.key, cert: ca.cert },
        extensions: [
          { name: 'basicConstraints', cA: false },
          { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
          { name: 'extKeyUsage', serverAuth: true },
          { name: 'subjectAltName', altNames: LOOPBACK_NAMES }
        ]
      })
      const certFile = join(dir, `${name}.pem`)
      const keyFile = join(dir, `${name}-key.pem`)
      writeFileSync(certFile, p.cert)
      writeFileSync(keyFile, p.private, { mode: 0o600 })
      return { certFile, keyFile, cert: p.cert }
    },
    remove: () => rmSync(dir, { recursive: true, force: true })
  }
}
