// src/errors.ts: every problem body comes from the table, and what ssh2's client errors mean
// is decided by their `level`. The ssh2 errors below are ssh2's own, from a real client against
// a real ssh2 server on port 0, so a change in what ssh2 emits shows here first.
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createServer, type AddressInfo, type Server as NetServer } from 'node:net'
import ssh2 from 'ssh2'
import {
  GatewayError, errorTable, errorCodes, problem, protocolProblem, sshClientFailure, sshHandshakeBreak,
  type SshClientError, type SshFailureContext
} from '../../src/errors.js'
import { generateEd25519KeyPair } from '../../src/ssh-keys.js'

const CTX: SshFailureContext = { ready: false, readyTimeoutMs: 300, keepaliveIntervalMs: 100, keepaliveCountMax: 2 }

describe('problem()', () => {
  it('takes status and title from the table, for every code', () => {
    for (const code of errorCodes) {
      const p = problem(code, 'why')
      expect(p).toEqual({ type: `https://exec-gateway.dev/problems/${code.replaceAll('_', '-')}`, title: errorTable[code].title, status: errorTable[code].status, detail: 'why', code })
    }
  })

  it("a status of HTTP's own keeps the code of its kind of mistake", () => {
    expect(protocolProblem(431, 'too large')).toMatchObject({ status: 431, code: 'invalid_argument', detail: 'too large', type: 'https://exec-gateway.dev/problems/invalid-argument' })
    expect(protocolProblem(417, 'no')).toMatchObject({ status: 417, code: 'invalid_argument', title: 'Expectation failed' })
  })

  it('a GatewayError is its problem, and keeps its cause off the wire', () => {
    const cause = new Error('ECONNRESET')
    const err = new GatewayError('relay_unavailable', 'the relay reset', { cause })
    expect(err.cause).toBe(cause)
    expect(err.message).toBe(err.detail)
    expect(err.toProblem()).toEqual(problem('relay_unavailable', 'the relay reset'))
    expect(JSON.stringify(err.toProblem())).not.toContain('ECONNRESET')
  })
})

// One ssh2 client connection to `port`, resolved with the first error it emits.
async function clientError (port: number, opts: Partial<ssh2.ConnectConfig>): Promise<SshClientError> {
  return await new Promise((resolve, reject) => {
    const c = new ssh2.Client()
    // Every error after the first (the lost connection that follows) is ignored.
    c.on('error', (err) => { c.end(); resolve(err) })
    c.once('ready', () => { c.end(); reject(new Error('the connection was accepted')) })
    c.connect({ host: '127.0.0.1', port, username: 'u', privateKey: generateEd25519KeyPair().private, ...opts })
  })
}

describe('ssh2 client errors, by level', () => {
  let sshd: ssh2.Server
  let silent: NetServer
  let sshdPort = 0
  let silentPort = 0

  beforeAll(async () => {
    // Refuses every key.
    sshd = new ssh2.Server({ hostKeys: [generateEd25519KeyPair().private] }, (client) => {
      client.on('error', () => {})
      client.on('authentication', (ctx) => ctx.reject())
    })
    await new Promise<void>((resolve) => sshd.listen(0, '127.0.0.1', resolve))
    sshdPort = (sshd.address() as AddressInfo).port
    // Accepts TCP and never speaks SSH.
    silent = createServer((s) => { s.on('error', () => {}) })
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve))
    silentPort = (silent.address() as AddressInfo).port
  })
  afterAll(() => { sshd?.close(); silent?.close() })

  it('a refused key is ssh_failed, naming the gateway key', async () => {
    const err = await clientError(sshdPort, {})
    expect(err.level).toBe('client-authentication')
    const f = sshClientFailure(err, err.message, CTX)
    expect(f).toMatchObject({ code: 'ssh_failed', status: 502, detail: 'the sandbox SSH daemon rejected the gateway key' })
    expect(f?.cause).toBe(err)
  })

  it('a refused host key is ssh_failed, told apart from other handshake failures', async () => {
    const err = await clientError(sshdPort, { hostVerifier: () => false })
    expect(err.level).toBe('handshake')
    expect(sshClientFailure(err, err.message, CTX)?.detail).toMatch(/host key is not the one its supervisor reported/)
    const other: SshClientError = Object.assign(new Error('Handshake failed: no matching key exchange algorithm'), { level: 'handshake' })
    expect(sshClientFailure(other, other.message, CTX)).toMatchObject({ code: 'ssh_failed', detail: 'SSH handshake failed: Handshake failed: no matching key exchange algorithm' })
  })

  it('a handshake that does not finish is ssh_failed within the ready timeout', async () => {
    const err = await clientError(silentPort, { readyTimeout: CTX.readyTimeoutMs })
    expect(err.level).toBe('client-timeout')
    expect(sshClientFailure(err, err.message, CTX)).toMatchObject({ code: 'ssh_failed', detail: 'SSH handshake not finished within 300 ms' })
  })

  it('after the handshake, a timeout is the keepalive giving up and anything else is the relay failing', () => {
    const ready = { ...CTX, ready: true }
    const timeout: SshClientError = Object.assign(new Error('Keepalive timeout'), { level: 'client-timeout' })
    expect(sshClientFailure(timeout, timeout.message, ready)).toMatchObject({ code: 'relay_unavailable', detail: 'no answer to 2 SSH keepalives over 300 ms: the relay is wedged' })
    const reset: SshClientError = Object.assign(new Error('read ECONNRESET'), { level: 'client-socket' })
    expect(sshClientFailure(reset, reset.message, ready)).toMatchObject({ code: 'relay_unavailable', detail: 'the relay failed before the command reported an exit status: read ECONNRESET' })
  })

  it('a socket or protocol error mid-handshake waits for the relay: closed, it is the relay; open, the daemon', () => {
    for (const level of ['client-socket', 'protocol', 'agent', 'constructor', undefined]) {
      const err: SshClientError = Object.assign(new Error('boom'), level === undefined ? {} : { level })
      expect(sshClientFailure(err, err.message, CTX)).toBeUndefined()
      expect(sshHandshakeBreak(err, 'boom', true)).toMatchObject({ code: 'relay_unavailable', detail: 'the relay closed during the SSH handshake: boom', cause: err })
      expect(sshHandshakeBreak(err, 'boom', false)).toMatchObject({ code: 'ssh_failed', detail: 'SSH handshake failed: boom', cause: err })
    }
  })
})
