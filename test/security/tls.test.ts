import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import https from 'node:https'
import http from 'node:http'
import { copyFileSync } from 'node:fs'
import WebSocket from 'ws'
import { certDir, type CertAuthority, type CertDir, type ServerCert } from '../helpers/tls-certs.js'
import { startGateway, type TestGateway } from '../helpers/gateway.js'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { waitFor } from '../helpers/wait.js'

// TLS on both listeners, with real handshakes: clients that trust our CA get through, clients
// that do not are refused in the handshake, and a plaintext client gets no HTTP answer.

interface HttpsResult { status: number, headers: http.IncomingHttpHeaders, body: any }

async function httpsJson (url: string, method: string, body: unknown, ca: string | undefined): Promise<HttpsResult> {
  return await new Promise((resolve, reject) => {
    const req = https.request(url, {
      method,
      // A fresh connection each time: a handshake per request is what these tests look at.
      agent: false,
      ...(ca === undefined ? {} : { ca }),
      headers: body === undefined ? {} : { 'content-type': 'application/json' }
    }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { text += c })
      res.on('end', () => {
        let parsed: unknown = text
        try { parsed = JSON.parse(text) } catch { /* not JSON */ }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: parsed })
      })
    })
    req.on('error', reject)
    req.end(body === undefined ? undefined : JSON.stringify(body))
  })
}

let certs: CertDir
let caA: CertAuthority
let caB: CertAuthority
let serverA: ServerCert
let serverB: ServerCert

beforeAll(async () => {
  certs = certDir()
  caA = await certs.ca('a')
  caB = await certs.ca('b')
  serverA = await certs.server(caA, 'server-a')
  serverB = await certs.server(caB, 'server-b')
})

afterAll(() => certs.remove())

describe('public listener with --tls-cert/--tls-key', () => {
  let s: TestSandbox
  beforeAll(async () => {
    // Files of their own, so the reload test can replace them without touching other suites.
    const certFile = `${certs.dir}/public.pem`
    const keyFile = `${certs.dir}/public-key.pem`
    copyFileSync(serverA.certFile, certFile)
    copyFileSync(serverA.keyFile, keyFile)
    s = await startSandbox('embedded', 'tls-public', { tls: { certFile, keyFile } })
  })
  afterAll(async () => { await s?.close() })

  it('serves HTTPS: the listening URL is https:// and an exec runs over it', async () => {
    expect(s.g.publicUrl).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/)
    const res = await httpsJson(`${s.g.publicUrl}/v1/sandboxes/tls-public/execs?wait=true`, 'POST', { command: ['echo', 'over tls'] }, caA.cert)
    expect(res.status).toBe(200)
    expect(res.body.exitCode).toBe(0)
    expect(res.body.stdout).toBe('over tls\n')
  })

  it('streams over wss:// to a client that trusts the CA', async () => {
    const start = await httpsJson(`${s.g.publicUrl}/v1/sandboxes/tls-public/execs`, 'POST', { command: ['sh', '-c', 'echo one; echo two >&2; exit 3'] }, caA.cert)
    expect(start.status).toBe(201)
    const ws = new WebSocket(`${s.g.publicUrl.replace(/^https/, 'wss')}/v1/execs/${start.body.id as string}/stream`, { ca: caA.cert })
    const events: any[] = []
    const code = await new Promise<number>((resolve, reject) => {
      ws.on('message', (d) => events.push(JSON.parse(d.toString())))
      ws.on('error', reject)
      ws.on('close', (c) => resolve(c))
    })
    expect(code).toBe(1000)
    expect(events.filter((e) => e.type === 'stdout').map((e) => e.data).join('')).toBe('one\n')
    expect(events.filter((e) => e.type === 'stderr').map((e) => e.data).join('')).toBe('two\n')
    expect(events.at(-1)).toMatchObject({ type: 'exit', exitCode: 3 })
  })

  it('a client that does not trust the issuer is refused in the handshake', async () => {
    await expect(httpsJson(`${s.g.publicUrl}/healthz`, 'GET', undefined, caB.cert)).rejects.toThrow(/certificate|self.signed|verify/i)
    await expect(httpsJson(`${s.g.publicUrl}/healthz`, 'GET', undefined, undefined)).rejects.toThrow(/certificate|self.signed|verify/i)
  })

  it('a plaintext HTTP client gets no HTTP answer', async () => {
    const plain = s.g.publicUrl.replace(/^https/, 'http')
    const outcome = await new Promise<string>((resolve) => {
      const req = http.get(`${plain}/healthz`, (res) => resolve(`status ${res.statusCode ?? 0}`))
      req.on('error', (err) => resolve(`error ${err.message}`))
      req.setTimeout(5000, () => { req.destroy(new Error('timeout')) })
    })
    expect(outcome).toMatch(/^error /)
  })

  it('reload() (SIGHUP) picks up a replaced certificate for new connections', async () => {
    copyFileSync(serverB.certFile, `${certs.dir}/public.pem`)
    copyFileSync(serverB.keyFile, `${certs.dir}/public-key.pem`)
    s.g.gw.reload()
    const res = await httpsJson(`${s.g.publicUrl}/healthz`, 'GET', undefined, caB.cert)
    expect(res.status).toBe(200)
    await expect(httpsJson(`${s.g.publicUrl}/healthz`, 'GET', undefined, caA.cert)).rejects.toThrow(/certificate|self.signed|verify/i)
  })
})

describe('supervisor listener with --supervisor-tls-cert/-key', () => {
  let g: TestGateway
  const sups: SupervisorProcess[] = []
  beforeAll(async () => {
    g = await startGateway({ supervisorTls: { certFile: serverA.certFile, keyFile: serverA.keyFile } })
  })
  afterAll(async () => {
    for (const p of sups) await p.stop()
    await g?.close()
  })

  it('speaks HTTP/2 over TLS: a supervisor with --ca connects and execs run through it', async () => {
    expect(g.supervisorUrl).toMatch(/^https:\/\//)
    const sup = startSupervisorProcess({ gatewayUrl: g.supervisorUrl, sandboxId: 'tls-sup', token: g.token('tls-sup'), extraArgs: ['--ca', caA.certFile] })
    sups.push(sup)
    await g.waitConnected('tls-sup')
    const res = await fetch(`${g.publicUrl}/v1/sandboxes/tls-sup/execs?wait=true`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ command: ['sh', '-c', 'echo relayed over tls; exit 5'] })
    })
    const body = await res.json() as any
    expect(res.status).toBe(200)
    expect(body.stdout).toBe('relayed over tls\n')
    expect(body.exitCode).toBe(5)
  })

  it('a supervisor that does not trust the certificate never connects, and says why', async () => {
    const wrongCa = startSupervisorProcess({ gatewayUrl: g.supervisorUrl, sandboxId: 'tls-wrong-ca', token: g.token('tls-wrong-ca'), extraArgs: ['--ca', caB.certFile] })
    const systemCas = startSupervisorProcess({ gatewayUrl: g.supervisorUrl, sandboxId: 'tls-no-ca', token: g.token('tls-no-ca') })
    sups.push(wrongCa, systemCas)
    await waitFor(() => /certificate|self.signed|verify/i.test(wrongCa.output()) && /certificate|self.signed|verify/i.test(systemCas.output()), { timeoutMs: 10_000, intervalMs: 50 })
    expect(g.gw.registry.get('tls-wrong-ca')).toBeUndefined()
    expect(g.gw.registry.get('tls-no-ca')).toBeUndefined()
  })

  it('--ca is refused with an http:// gateway URL', async () => {
    const sup = startSupervisorProcess({ gatewayUrl: 'http://127.0.0.1:1', sandboxId: 'x', token: g.token('x'), extraArgs: ['--ca', caA.certFile] })
    sups.push(sup)
    const code = await new Promise<number | null>((resolve) => sup.proc.once('exit', (c) => resolve(c)))
    expect(code).toBe(2)
    expect(sup.output()).toMatch(/--ca needs an https:\/\/ --gateway/)
  })
})

describe('the embedded local sandbox with a TLS supervisor listener', () => {
  it('the in-process supervisor pins the served certificate and execs run', async () => {
    const g = await startGateway({ localSandbox: true, supervisorTls: { certFile: serverB.certFile, keyFile: serverB.keyFile } })
    try {
      const res = await fetch(`${g.publicUrl}/v1/sandboxes/local/execs?wait=true`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ command: ['echo', 'local over tls'] })
      })
      expect(res.status).toBe(200)
      expect((await res.json() as any).stdout).toBe('local over tls\n')
    } finally {
      await g.close()
    }
  })
})
