import { STATUS_CODES, type Server as HttpServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify'
import { problem, protocolProblem, type Problem } from '../errors.js'
import { sendProblem } from './errors-plugin.js'

// Requests refused before any route runs (by Node's parser, Fastify's router, or methods Node
// handles itself) still get a problem+json with a stable code, like every other refusal.

// A whole response, for sockets that Node hands over without a ServerResponse.
function rawResponse (p: Problem): string {
  const b = JSON.stringify(p)
  return `HTTP/1.1 ${p.status} ${STATUS_CODES[p.status] ?? ''}\r\ncontent-type: application/problem+json\r\ncontent-length: ${Buffer.byteLength(b)}\r\nconnection: close\r\n\r\n${b}`
}

// Fastify's router: malformed percent-escapes, over-long path parameters.
export function frameworkErrors (err: FastifyError, _req: FastifyRequest, reply: FastifyReply): void {
  void sendProblem(reply, problem('invalid_argument', err.code === 'FST_ERR_MAX_PARAM_LENGTH' ? 'a path parameter is too long' : `malformed request: ${err.message}`))
}

// Node's HTTP parser: malformed requests and header sections too large to read.
export function clientErrorHandler (err: Error & { code?: string }, socket: Socket): void {
  if (!socket.writable || (err.code === 'ECONNRESET')) { socket.destroy(); return }
  const tooLarge = err.code === 'HPE_HEADER_OVERFLOW'
  socket.end(rawResponse(tooLarge
    ? protocolProblem(431, 'the request headers are too large')
    : problem('invalid_argument', `malformed HTTP request (${err.code ?? 'parse error'})`)))
}

export function installServerRefusals (server: HttpServer): void {
  // Expect other than 100-continue.
  server.on('checkExpectation', (req: IncomingMessage, res: ServerResponse) => {
    const p = protocolProblem(417, `Expect: ${String(req.headers.expect)} is not supported`)
    res.writeHead(p.status, { 'content-type': 'application/problem+json', connection: 'close' }).end(JSON.stringify(p))
  })
  // This is not a proxy.
  server.on('connect', (_req: IncomingMessage, socket: Socket) => {
    socket.on('error', () => {})
    socket.end(rawResponse(problem('method_not_allowed', 'CONNECT is not supported: this is not a proxy')))
  })
}

// ws checks the handshake itself but refuses a bad one with a text/html 400, and
// @fastify/websocket answers a GET without an upgrade with an empty 404: both are refused here
// first, as problems like every other refusal. The checks are ws's own (websocket-server.js).
const WS_KEY = /^[+/0-9A-Za-z]{22}==$/
const TOKEN = "[!#$%&'*+.^_`|~0-9A-Za-z-]+"
const PROTOCOL_LIST = new RegExp(`^${TOKEN}(?:[ \\t]*,[ \\t]*${TOKEN})*$`)

// Node sets `upgrade` on a request it hands to 'upgrade' listeners (@types/node omits it).
export function upgradeProblem (raw: IncomingMessage & { upgrade?: boolean }): string | undefined {
  const h = raw.headers
  if (raw.upgrade !== true) return 'this is a WebSocket endpoint: send Connection: Upgrade and Upgrade: websocket (or read /v1/execs/{execId}/events)'
  if (String(h.upgrade).toLowerCase() !== 'websocket') return `Upgrade: must be websocket, got ${JSON.stringify(h.upgrade)}`
  const key = h['sec-websocket-key']
  if (typeof key !== 'string' || !WS_KEY.test(key)) return 'Sec-WebSocket-Key: must be 16 bytes in base64'
  const version = Number(h['sec-websocket-version'])
  if (version !== 13 && version !== 8) return 'Sec-WebSocket-Version: must be 13'
  const offered = h['sec-websocket-protocol']
  if (offered !== undefined) {
    const names = offered.split(',').map((p) => p.trim())
    if (!PROTOCOL_LIST.test(offered) || new Set(names).size !== names.length) return 'Sec-WebSocket-Protocol: must be a comma-separated list of distinct tokens'
  }
  return undefined
}
