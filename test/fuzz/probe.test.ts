import { it, beforeAll, afterAll } from 'vitest'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import { rawRequest, targetOf } from './raw-http.js'
import { api } from '../helpers/api.js'
import fc from 'fast-check'

let sb: TestSandbox
beforeAll(async () => { sb = await startSandbox('embedded', 'fz') })
afterAll(async () => { await sb?.close() })

it('probe', async () => {
  const t = targetOf(sb.g.publicUrl)
  const r0 = await api(sb.g.publicUrl, 'POST', '/v1/sandboxes/fz/execs?wait=true', { command: ['true'] })
  const id = r0.body.id
  const show = async (label: string, req: any) => {
    try { const r = await rawRequest(t, req); console.log(label, r.status, r.headers['content-type'], r.text.slice(0, 200)) } catch (e) { console.log(label, 'ERR', String(e)) }
  }
  await show('ws-noupgrade', { method: 'GET', path: `/v1/execs/${id}/stream` })
  await show('ws-upgrade', { method: 'GET', path: `/v1/execs/${id}/stream`, headers: [['Upgrade', 'websocket'], ['Connection', 'Upgrade'], ['Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ=='], ['Sec-WebSocket-Version', '13']] })
  await show('ws-upgrade-badkey', { method: 'GET', path: `/v1/execs/${id}/stream`, headers: [['Upgrade', 'websocket'], ['Sec-WebSocket-Key', 'x'], ['Sec-WebSocket-Version', '13']] })
  await show('ws-upgrade-unknown', { method: 'GET', path: `/v1/execs/nope/stream`, headers: [['Upgrade', 'websocket'], ['Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ=='], ['Sec-WebSocket-Version', '13']] })
  await show('ws-upgrade-proto', { method: 'GET', path: `/v1/execs/${id}/stream`, headers: [['Upgrade', 'websocket'], ['Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ=='], ['Sec-WebSocket-Version', '13'], ['Sec-WebSocket-Protocol', 'a b,,;;\u00ff']] })
  await show('dotdot', { method: 'GET', path: `/v1/execs/../healthz` })
  await show('pct', { method: 'GET', path: `/v1/execs/%` })
  await show('pct2', { method: 'GET', path: `/v1/execs/%zz/events` })
  await show('pctnul', { method: 'GET', path: `/v1/execs/%00` })
  await show('utf8', { method: 'GET', path: `/v1/execs/ünï` })
  await show('badutf8', { method: 'GET', path: Buffer.from([0x2f, 0x76, 0x31, 0x2f, 0xff, 0xfe]) })
  await show('long', { method: 'GET', path: `/v1/execs/${'a'.repeat(200)}` })
  await show('ev-lei', { method: 'GET', path: `/v1/execs/${id}/events`, headers: [['Accept', 'text/event-stream'], ['Last-Event-ID', '99999999999999999999999-1']] })
  await show('ev-q', { method: 'GET', path: `/v1/execs/${id}/events?stdoutOffset=9007199254740993&encoding=base64` })
  await show('ev-q2', { method: 'GET', path: `/v1/execs/${id}/events?stdoutOffset=1e3` })
  await show('ev-q3', { method: 'GET', path: `/v1/execs/${id}/events?stdoutOffset=-1` })
  await show('ev-q4', { method: 'GET', path: `/v1/execs/${id}/events?stdoutOffset=1&stdoutOffset=2` })
  await show('ev-q5', { method: 'GET', path: `/v1/execs/${id}/events?__proto__=1` })
  await show('ev-q6', { method: 'GET', path: `/v1/execs/${id}/events?constructor[x]=1` })
  await show('list', { method: 'GET', path: `/v1/execs?status=%ZZ&sandboxId=` })
  await show('list2', { method: 'GET', path: `/v1/execs?status=exited&status=failed` })
  await show('host-bad', { method: 'GET', path: `/v1/execs`, host: 'evil.com' })
  await show('host-none', { method: 'GET', path: `/v1/execs`, host: null })
  await show('host-dup', { method: 'GET', path: `/v1/execs`, headers: [['Host', 'localhost']] })
  await show('host-empty', { method: 'GET', path: `/v1/execs`, host: '' })
  await show('ct-bad', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json; charset=utf-16']], body: '{"command":["true"]}' })
  await show('ct-none', { method: 'POST', path: `/v1/sandboxes/fz/execs`, body: '{"command":["true"]}' })
  await show('ct-garbage', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', ';;;']], body: '{"command":["true"]}' })
  await show('ct-text', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'text/plain']], body: '{"command":["true"]}' })
  await show('proto', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json']], body: '{"command":["true"],"__proto__":{"x":1}}' })
  await show('ctor', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json']], body: '{"command":["true"],"constructor":{"prototype":{"x":1}}}' })
  await show('deep', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json']], body: '['.repeat(100000) + ']'.repeat(100000) })
  await show('deep2', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json']], body: '{"command":["true"],"env":' + '{"a":'.repeat(100000) + '1' + '}'.repeat(100001) })
  await show('deep3', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json']], body: '{"__proto__":' + '{"a":'.repeat(100000) + '1' + '}'.repeat(100001) })
  await show('badjson', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json']], body: Buffer.from([0xff, 0xfe, 0x7b]) })
  await show('empty', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json']], body: '' })
  await show('nocl', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json']] })
  await show('surrogate', { method: 'POST', path: `/v1/sandboxes/fz/execs?wait=true`, headers: [['Content-Type', 'application/json']], body: '{"command":["echo","\\ud800"]}' })
  await show('tofloat', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json']], body: '{"command":["true"],"timeoutSeconds":1.5}' })
  await show('tobig', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json']], body: '{"command":["true"],"timeoutSeconds":1e400}' })
  await show('te', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json'], ['Transfer-Encoding', 'gzip']], body: '{}' })
  await show('ce', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json'], ['Content-Encoding', 'gzip']], body: '{}' })
  await show('wait', { method: 'POST', path: `/v1/sandboxes/fz/execs?wait=1`, headers: [['Content-Type', 'application/json']], body: '{"command":["true"]}' })
  await show('wait2', { method: 'POST', path: `/v1/sandboxes/fz/execs?wait=true&wait=false`, headers: [['Content-Type', 'application/json']], body: '{"command":["true"]}' })
  await show('big', { method: 'POST', path: `/v1/sandboxes/fz/execs`, headers: [['Content-Type', 'application/json']], body: 'x'.repeat(9 * 1024 * 1024) })
  await show('method', { method: 'PROPFIND', path: `/v1/execs` })
  await show('method2', { method: 'PUT', path: `/v1/execs/${id}` })
  await show('options', { method: 'OPTIONS', path: `/v1/execs/${id}` })
  await show('head', { method: 'HEAD', path: `/v1/execs/${id}/events` })
  console.log(fc.sample(fc.string({ unit: 'binary', maxLength: 5 }), 10).map((s) => [...s].map((c) => c.codePointAt(0)!.toString(16))))
})
