// Exec read tokens (src/http/read-token.ts): what a URL may carry, for one exec, until it
// expires; and the guard's rules for them, on a bare Fastify app and on a raw upgrade (the check
// cluster mode runs before it forwards an attach to the exec's replica).
import { randomBytes } from 'node:crypto'
import Fastify, { type FastifyInstance } from 'fastify'
import { afterEach, describe, expect, it } from 'vitest'
import { accessTokensIn, mintReadToken, redactAccessTokens, verifyReadToken } from '../../src/http/read-token.js'
import { installGuard, upgradeAllowed, type GuardAuth } from '../../src/http/guard.js'
import { installErrorHandling } from '../../src/http/errors-plugin.js'
import { signSupervisorToken } from '../../src/tokens.js'

const secret = randomBytes(32)
const NOW = 1_800_000_000

describe('mintReadToken / verifyReadToken', () => {
  const token = mintReadToken(secret, 'ex_a', NOW + 60)

  it('is URL-safe and verifies for its exec before its expiry', () => {
    expect(token).toMatch(/^egr1\.\d+\.[A-Za-z0-9_-]+$/)
    expect(encodeURIComponent(token)).toBe(token)
    expect(verifyReadToken([secret], token, 'ex_a', NOW)).toEqual({ ok: true, expiresAtS: NOW + 60 })
    // During a rotation the previous secret still verifies what it signed.
    expect(verifyReadToken([randomBytes(32), secret], token, 'ex_a', NOW).ok).toBe(true)
  })

  it('refuses another exec, the expiry, another secret, a tampered expiry or MAC, another version', () => {
    const reason = (t: string, execId = 'ex_a', now = NOW, secrets = [secret]): string | undefined => {
      const c = verifyReadToken(secrets, t, execId, now)
      return c.ok ? undefined : c.reason
    }
    expect(reason(token, 'ex_b')).toBe('read token not valid for this exec')
    expect(reason(token, 'ex_a', NOW + 60)).toBe('read token expired')
    expect(reason(token, 'ex_a', NOW + 61)).toBe('read token expired')
    expect(reason(token, 'ex_a', NOW, [randomBytes(32)])).toBe('read token not valid for this exec')
    const [v, exp, mac] = token.split('.') as [string, string, string]
    expect(reason(`${v}.${Number(exp) + 3600}.${mac}`)).toBe('read token not valid for this exec')
    const flipped = Buffer.from(mac, 'base64url')
    flipped[0] = flipped[0]! ^ 1
    expect(reason(`${v}.${exp}.${flipped.toString('base64url')}`)).toBe('read token not valid for this exec')
    for (const bad of [`egr2.${exp}.${mac}`, `egw1.${exp}.${mac}`, `${v}.${exp}`, `${v}.${exp}.${mac}.x`, `${v}.0${exp}.${mac}`, `${v}.-1.${mac}`, `${v}.1e9.${mac}`, `${v}.${exp}.${mac}=`, '', 'egr1..']) {
      expect(reason(bad), bad).toBe('malformed read token')
    }
    // A supervisor token signed by the same secret is not a read token.
    expect(reason(signSupervisorToken(secret, 'ex_a', NOW + 60))).toBe('malformed read token')
  })

  it('is keyed apart from the token secret: the same fields under the bare secret do not verify', async () => {
    const { createHmac } = await import('node:crypto')
    const bare = createHmac('sha256', secret).update(`egr1\nex_a\n${NOW + 60}`).digest('base64url')
    expect(verifyReadToken([secret], `egr1.${NOW + 60}.${bare}`, 'ex_a', NOW).ok).toBe(false)
  })
})

describe('access_token in a URL', () => {
  it('is found however its name is spelled in the query, and every value counts', () => {
    expect(accessTokensIn('/v1/execs/x/events')).toEqual([])
    expect(accessTokensIn('/v1/execs/x/events?stdoutOffset=3')).toEqual([])
    expect(accessTokensIn('/v1/execs/x/events?access_token=t1')).toEqual(['t1'])
    expect(accessTokensIn('/v1/execs/x/events?a=1&access%5Ftoken=t1#frag')).toEqual(['t1'])
    expect(accessTokensIn('/v1/execs/x/events?access_token=t1&access_token=t2')).toEqual(['t1', 't2'])
  })

  it('is redacted in logged URLs, the rest of the URL kept as it came', () => {
    expect(redactAccessTokens('/v1/execs/x/events')).toBe('/v1/execs/x/events')
    expect(redactAccessTokens('/v1/execs/x/events?stdoutOffset=3&access_token=egr1.9.sec')).toBe('/v1/execs/x/events?stdoutOffset=3&access_token=[redacted]')
    expect(redactAccessTokens('/x?access%5ftoken=sec&access_token=sec2&encoding=base64')).toBe('/x?access_token=[redacted]&access_token=[redacted]&encoding=base64')
    expect(redactAccessTokens('/x?access_token=sec#frag')).toBe('/x?access_token=[redacted]#frag')
    expect(redactAccessTokens('/x?access_token')).toBe('/x?access_token=[redacted]')
  })
})

describe('the guard with read tokens', () => {
  let app: FastifyInstance | undefined
  afterEach(async () => { await app?.close(); app = undefined })

  async function guarded (apiTokens: string[]): Promise<FastifyInstance> {
    app = Fastify()
    installErrorHandling(app)
    installGuard(app, { apiTokens: () => apiTokens, tokenSecrets: () => [secret], scheme: 'http' })
    const echo = async (req: { readOnly: boolean }): Promise<unknown> => ({ readOnly: req.readOnly })
    app.get('/v1/execs/:execId/events', echo)
    app.get('/v1/execs/:execId', echo)
    app.post('/v1/execs/:execId/signal', echo)
    app.post('/v1/execs/:execId/read-token', echo)
    app.get('/healthz', { config: { openAccess: true } }, echo)
    await app.ready()
    return app
  }

  const token = mintReadToken(secret, 'ex_a', Math.floor(Date.now() / 1000) + 60)

  for (const apiTokens of [['api-1'], []]) {
    it(`${apiTokens.length > 0 ? 'with' : 'without'} --api-token: opens its exec's events read-only, and nothing else`, async () => {
      const a = await guarded(apiTokens)
      const get = async (url: string, method: 'GET' | 'POST' = 'GET', headers: Record<string, string> = {}): Promise<{ status: number, body: any, auth?: string }> => {
        const res = await a.inject({ method, url, headers: { host: '127.0.0.1', ...headers } })
        return { status: res.statusCode, body: res.json(), auth: res.headers['www-authenticate'] as string | undefined }
      }
      expect(await get(`/v1/execs/ex_a/events?access_token=${token}`)).toMatchObject({ status: 200, body: { readOnly: true } })
      // Beside a valid bearer token the read token still decides, and the request stays read-only.
      expect(await get(`/v1/execs/ex_a/events?access_token=${token}`, 'GET', { authorization: 'Bearer api-1' })).toMatchObject({ status: 200, body: { readOnly: true } })
      const refused = await get(`/v1/execs/ex_b/events?access_token=${token}`)
      expect(refused).toMatchObject({ status: 401, body: { code: 'unauthenticated', detail: 'read token not valid for this exec' } })
      expect(refused.auth).toBe('Bearer realm="exec-gateway", error="invalid_token"')
      for (const [url, method] of [['/v1/execs/ex_a', 'GET'], ['/v1/execs/ex_a/signal', 'POST'], ['/v1/execs/ex_a/read-token', 'POST']] as const) {
        const r = await get(`${url}?access_token=${token}`, method, { authorization: 'Bearer api-1' })
        expect(r, `${method} ${url}`).toMatchObject({ status: 401, body: { code: 'unauthenticated' } })
        expect(r.body.detail).toMatch(/opens only GET/)
      }
      expect((await get(`/v1/execs/ex_a/events?access_token=${token}&access_token=${token}`)).status).toBe(401)
      expect((await get('/v1/execs/ex_a/events?access_token=egr1.1.AAAA')).status).toBe(401)
      // Open routes stay open.
      expect((await get(`/healthz?access_token=${token}`)).status).toBe(200)
      if (apiTokens.length > 0) {
        expect(await get('/v1/execs/ex_a/events', 'GET', { authorization: 'Bearer api-1' })).toMatchObject({ status: 200, body: { readOnly: false } })
        expect((await get('/v1/execs/ex_a/events')).status).toBe(401)
      } else {
        // Without tokens the loopback rules come first, a read token or not.
        expect((await get(`/v1/execs/ex_a/events?access_token=${token}`, 'GET', { host: 'evil.example' })).status).toBe(403)
      }
    })
  }

  it('upgradeAllowed, which cluster mode runs before forwarding an attach, follows the same rules', () => {
    const auth = (apiTokens: string[]): GuardAuth => ({ apiTokens: () => apiTokens, tokenSecrets: () => [secret], scheme: 'http' })
    const req = (url: string, headers: Record<string, string> = {}): { url: string, headers: Record<string, string> } => ({ url, headers: { host: '127.0.0.1:8080', ...headers } })
    const stream = `/v1/execs/ex_a/stream?access_token=${token}`
    expect(upgradeAllowed(req(stream), 'ex_a', auth(['api-1']))).toBe(true)
    expect(upgradeAllowed(req(stream), 'ex_b', auth(['api-1']))).toBe(false)
    expect(upgradeAllowed(req(`${stream}&access_token=x`), 'ex_a', auth(['api-1']))).toBe(false)
    expect(upgradeAllowed(req('/v1/execs/ex_a/stream?access_token=egr1.1.AAAA', { authorization: 'Bearer api-1' }), 'ex_a', auth(['api-1']))).toBe(false)
    expect(upgradeAllowed(req('/v1/execs/ex_a/stream', { authorization: 'Bearer api-1' }), 'ex_a', auth(['api-1']))).toBe(true)
    expect(upgradeAllowed(req('/v1/execs/ex_a/stream'), 'ex_a', auth(['api-1']))).toBe(false)
    expect(upgradeAllowed(req(stream), 'ex_a', auth([]))).toBe(true)
    expect(upgradeAllowed(req(stream), 'ex_b', auth([]))).toBe(false)
    expect(upgradeAllowed(req(stream, { origin: 'http://evil.example' }), 'ex_a', auth([]))).toBe(false)
  })
})
