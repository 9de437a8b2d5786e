// Log redaction: whatever a log call is handed, credentials leave as "[redacted]".
import { describe, expect, it } from 'vitest'
import { Writable } from 'node:stream'
import Fastify from 'fastify'
import { createLogger } from '../../src/logger.js'

function capture (): { lines: () => any[], stream: Writable } {
  const chunks: string[] = []
  const stream = new Writable({ write (c, _e, cb) { chunks.push(String(c)); cb() } })
  return { stream, lines: () => chunks.join('').split('\n').filter((l) => l !== '').map((l) => JSON.parse(l)) }
}

describe('createLogger', () => {
  it('redacts bearer headers, bearer subprotocols, tokens, secrets and private keys', () => {
    const { stream, lines } = capture()
    const log = createLogger('info', stream)
    log.info({
      req: { headers: { authorization: 'Bearer api-secret-1', 'sec-websocket-protocol': 'exec-gateway.bearer.c2VjcmV0', host: 'h' } },
      headers: { authorization: 'Bearer api-secret-2' },
      token: 'egw1.c2J4.0.mac',
      supervisor: { token: 'egw1.other', authorization: 'Bearer api-secret-3' },
      apiToken: 'api-secret-4',
      privateKey: '-----BEGIN OPENSSH PRIVATE KEY-----',
      identity: { privateKey: '-----BEGIN OPENSSH PRIVATE KEY-----' },
      tokenSecret: 'ab12',
      sandboxId: 'sbx-1'
    }, 'something happened')
    const text = JSON.stringify(lines())
    for (const secret of ['api-secret', 'egw1.', 'c2VjcmV0', 'BEGIN OPENSSH', 'ab12']) expect(text).not.toContain(secret)
    const [line] = lines()
    expect(line.req.headers.authorization).toBe('[redacted]')
    expect(line.req.headers.host).toBe('h')
    expect(line.sandboxId).toBe('sbx-1')
    expect(line.msg).toBe('something happened')
  })

  it('redacts read tokens from logged URLs, Fastify\'s own request lines included', async () => {
    const { stream, lines } = capture()
    const log = createLogger('info', stream)
    log.info({ req: { url: '/v1/execs/x/events?access_token=egr1.9.read-secret-1' }, url: '/y?access%5Ftoken=read-secret-2&encoding=utf8' }, 'plain objects')
    const app = Fastify({ loggerInstance: log })
    app.get('/v1/execs/:execId/events', async () => ({}))
    await app.inject({ url: '/v1/execs/ex_a/events?stdoutOffset=1&access_token=egr1.9.read-secret-3' })
    await app.close()
    const all = lines()
    expect(JSON.stringify(all)).not.toContain('read-secret')
    expect(all[0].req.url).toBe('/v1/execs/x/events?access_token=[redacted]')
    expect(all[0].url).toBe('/y?access_token=[redacted]&encoding=utf8')
    const incoming = all.find((l) => l.msg === 'incoming request')
    expect(incoming.req).toMatchObject({ method: 'GET', url: '/v1/execs/ex_a/events?stdoutOffset=1&access_token=[redacted]' })
    expect(Object.keys(incoming.req).sort()).toEqual(['host', 'method', 'remoteAddress', 'url'])
  })

  it('honours the level', () => {
    const { stream, lines } = capture()
    const log = createLogger('warn', stream)
    log.info('quiet')
    log.warn('loud')
    expect(lines().map((l) => l.msg)).toEqual(['loud'])
  })
})
