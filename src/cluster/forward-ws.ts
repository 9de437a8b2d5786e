import { STATUS_CODES, type IncomingMessage, type Server as HttpServer } from 'node:http'
import type { Duplex } from 'node:stream'
import { WebSocket, WebSocketServer } from 'ws'
import { upgradeProblem } from '../http/transport-refusals.js'
import { problem } from '../errors.js'
import {
  FORWARDED_BY_HEADER, forwardRequestHeaders, isForwarded, replicaUnavailable,
  type ForwardIdentity, type ForwardProblem
} from './forward-headers.js'
import { closeLike, relayFrames, type Relay, type RelayOptions } from './ws-relay.js'

// A WebSocket attach forwarded to the replica that owns the exec, as a 1:1 bridge at the
// upgrade: the owner's handshake is done first, so the client gets the owner's answer (its
// selected subprotocol, or its plain HTTP refusal with its body) and never an open-then-close
// that a direct attach would not have given.

export interface ForwardTarget extends ForwardIdentity {
  // The owner's internal listener (http: or https:); the request's path and query are kept.
  targetBaseUrl: string
}

type Listener = (req: IncomingMessage, socket: Duplex, head: Buffer) => void

export interface UpgradeOptions extends RelayOptions {
  // The owner's handshake bound (connect + 101).
  handshakeTimeoutMs?: number
  // Bounds `decide` (a directory lookup): past it the upgrade is refused as unavailable.
  decideTimeoutMs?: number
  // The largest message taken from the client (as the gateway's own listener).
  maxPayloadBytes?: number
  unavailable?: (detail: string) => ForwardProblem
}

export interface UpgradeInterception {
  // Open bridges.
  readonly bridges: number
  // Bytes the bridges hold, handed to ws and not yet written, towards clients and owners.
  queued: () => { toClients: number, toOwners: number }
  // Closes every bridge with `code` both ways, waits up to timeoutMs, then terminates the rest.
  closeAll: (code?: number, timeoutMs?: number) => Promise<void>
  // Gives the 'upgrade' event back to the listeners it was taken from.
  uninstall: () => void
}

// The owner's refusal is relayed whole; a refusal is a problem body, far below this.
const REFUSAL_BODY_MAX_BYTES = 64 * 1024
const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000
const DEFAULT_DECIDE_TIMEOUT_MS = 5000
const DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024

function rawResponse (status: number, statusMessage: string, headers: Array<[string, string]>, body: Buffer): Buffer {
  const lines = [`HTTP/1.1 ${status} ${statusMessage}`, ...headers.map(([k, v]) => `${k}: ${v}`), `content-length: ${body.length}`, 'connection: close', '', '']
  return Buffer.concat([Buffer.from(lines.join('\r\n'), 'latin1'), body])
}

function sendProblemRaw (socket: Duplex, p: ForwardProblem): void {
  if (socket.destroyed) return
  const body = Buffer.from(JSON.stringify(p))
  socket.end(rawResponse(p.status, STATUS_CODES[p.status] ?? '', [['content-type', 'application/problem+json']], body))
}

const SKIP_REFUSAL_HEADERS = new Set(['connection', 'keep-alive', 'transfer-encoding', 'content-length', 'upgrade'])

// The owner's non-101 answer, status line, headers and body, as a direct client would get it.
function relayRefusal (socket: Duplex, res: IncomingMessage, fail: (detail: string) => void): void {
  const chunks: Buffer[] = []
  let size = 0
  res.on('data', (c: Buffer) => {
    size += c.length
    if (size > REFUSAL_BODY_MAX_BYTES) { res.destroy(); fail(`the owner's refusal is over ${REFUSAL_BODY_MAX_BYTES} bytes`); return }
    chunks.push(c)
  })
  res.on('error', () => fail('the owner broke off its refusal'))
  res.on('end', () => {
    const headers: Array<[string, string]> = []
    for (let i = 0; i < res.rawHeaders.length; i += 2) {
      const name = res.rawHeaders[i]!
      if (!SKIP_REFUSAL_HEADERS.has(name.toLowerCase())) headers.push([name, res.rawHeaders[i + 1]!])
    }
    if (!socket.destroyed) socket.end(rawResponse(res.statusCode ?? 502, res.statusMessage ?? '', headers, Buffer.concat(chunks)))
  })
}

function offeredProtocols (req: IncomingMessage): string[] {
  const h = req.headers['sec-websocket-protocol']
  if (h === undefined) return []
  return h.split(',').map((p) => p.trim()).filter((p) => p !== '')
}

function toWsUrl (base: string, path: string): string {
  const u = new URL(path, base)
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:'
  return u.toString()
}

// Takes the server's 'upgrade' event: each upgrade waits for `decide` (bounded), then is either
// bridged to the target it names or handed to the listeners that were there before (those of
// @fastify/websocket: install this after app.ready(), when its listener exists). Upgrades
// bridged here pass no Fastify hook of this replica (guard, refusals, rate limit): the owner's
// run on the forwarded request, or `decide` refuses by throwing. On shutdown call closeAll();
// uninstall() only before app.close(), which removes @fastify/websocket's listener itself.
export function interceptUpgrades (server: HttpServer, decide: (req: IncomingMessage) => Promise<ForwardTarget | undefined>, opts: UpgradeOptions = {}): UpgradeInterception {
  const captured = server.listeners('upgrade') as Listener[]
  server.removeAllListeners('upgrade')
  const unavailable = opts.unavailable ?? replicaUnavailable
  const decideTimeoutMs = opts.decideTimeoutMs ?? DEFAULT_DECIDE_TIMEOUT_MS
  // The client side of every bridge; each handshake selects what its owner selected.
  const selected = new WeakMap<IncomingMessage, string | false>()
  const wss = new WebSocketServer({
    noServer: true,
    perMessageDeflate: false,
    maxPayload: opts.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES,
    handleProtocols: (_offered, req) => selected.get(req) ?? false
  })
  wss.on('error', () => {})
  const open = new Set<{ client: WebSocket, upstream: WebSocket, relay: Relay }>()

  const bridge = (req: IncomingMessage, socket: Duplex, head: Buffer, target: ForwardTarget): void => {
    const fail = (detail: string): void => sendProblemRaw(socket, unavailable(detail))
    if (isForwarded(req.headers)) {
      fail(`this upgrade was already forwarded by replica ${String(req.headers[FORWARDED_BY_HEADER])}; replicas do not forward a request twice (the exec's owner is changing: retry)`)
      return
    }
    const why = upgradeProblem(req)
    if (why !== undefined) { sendProblemRaw(socket, problem('invalid_argument', why)); return }
    const headers = forwardRequestHeaders(req, target, ['sec-websocket-key', 'sec-websocket-version', 'sec-websocket-extensions', 'sec-websocket-protocol'])
    // The whole offer, a bearer subprotocol too: the owner's guard then sees what a direct
    // attach shows it (this dispatcher runs before any Fastify hook of this replica), and the
    // owner never selects a bearer subprotocol, so the selection is unchanged.
    const protocols = offeredProtocols(req)
    // Offered as a plain header, not through ws's protocols argument: ws's client fails a
    // handshake whose server selects none of the offered subprotocols, which the owner does
    // (and a direct client then gets a 101 without one). The owner's choice is read from the
    // 101 in 'upgrade', which ws emits before its own check, and removed there so that check
    // (nothing offered, nothing selected) passes; it is checked against the offer here.
    if (protocols.length > 0) headers['sec-websocket-protocol'] = protocols.join(', ')
    let ownerSelected: string | false = false
    let upstream: WebSocket
    try {
      upstream = new WebSocket(toWsUrl(target.targetBaseUrl, req.url ?? '/'), [], {
        headers: headers as Record<string, string>,
        perMessageDeflate: false,
        followRedirects: false,
        handshakeTimeout: opts.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS,
        // What the owner sends was already bounded by the owner.
        maxPayload: 0
      })
    } catch (err) {
      sendProblemRaw(socket, problem('invalid_argument', `cannot forward this upgrade: ${(err as Error).message}`))
      return
    }
    let settled = false
    // The client leaving during the owner's handshake ends it.
    const onEarlyClose = (): void => { if (!settled) { settled = true; upstream.terminate() } }
    socket.on('close', onEarlyClose)
    upstream.on('error', (err) => {
      if (settled) return
      settled = true
      fail(`the replica that owns this exec (${new URL(target.targetBaseUrl).host}) cannot be reached: ${err.message}`)
    })
    upstream.on('unexpected-response', (_r, res) => {
      if (settled) { res.destroy(); return }
      settled = true
      relayRefusal(socket, res, (detail) => { upstream.terminate(); fail(detail) })
      res.on('close', () => upstream.terminate())
    })
    upstream.on('upgrade', (res: IncomingMessage) => {
      const chosen = res.headers['sec-websocket-protocol']
      delete res.headers['sec-websocket-protocol']
      if (chosen === undefined) return
      if (protocols.includes(chosen)) { ownerSelected = chosen; return }
      settled = true
      upstream.terminate()
      fail(`the owner selected the subprotocol ${JSON.stringify(chosen)}, which the client did not offer`)
    })
    upstream.on('open', () => {
      if (settled) { upstream.terminate(); return }
      settled = true
      socket.off('close', onEarlyClose)
      // Nothing from the owner is read until the client side exists.
      upstream.pause()
      selected.set(req, ownerSelected)
      // A handshake ws refuses itself is answered by ws and its socket destroyed.
      let bridged = false
      socket.once('close', () => { if (!bridged) upstream.terminate() })
      wss.handleUpgrade(req, socket, head, (client) => {
        bridged = true
        client.on('error', () => {})
        const relay = relayFrames(client, upstream, opts)
        const entry = { client, upstream, relay }
        open.add(entry)
        void relay.closed.then(() => open.delete(entry))
        upstream.resume()
      })
    })
  }

  const dispatch = (req: IncomingMessage, socket: Duplex, head: Buffer): void => {
    // Node removed its own error listener before the event; the socket is not flowing (no
    // 'data' listener), so what the client sends while `decide` runs waits in its buffer.
    const guard = (): void => {}
    socket.on('error', guard)
    let timer: NodeJS.Timeout | undefined
    const bounded = Promise.race([decide(req), new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`no routing decision within ${decideTimeoutMs} ms`)), decideTimeoutMs)
    })]).finally(() => clearTimeout(timer))
    bounded.then((target) => {
      socket.off('error', guard)
      if (socket.destroyed) return
      if (target !== undefined) { socket.on('error', () => {}); bridge(req, socket, head, target); return }
      for (const l of captured) l.call(server, req, socket, head)
      // As Node does when nothing listens for upgrades.
      if (captured.length === 0) socket.destroy()
    }, (err: unknown) => {
      socket.off('error', guard)
      socket.on('error', () => {})
      sendProblemRaw(socket, unavailable(`cannot route this upgrade: ${(err as Error).message}`))
    })
  }
  server.on('upgrade', dispatch)

  return {
    get bridges () { return open.size },
    queued: () => {
      let toClients = 0
      let toOwners = 0
      for (const b of open) { toClients += b.relay.queuedToClient(); toOwners += b.relay.queuedToUpstream() }
      return { toClients, toOwners }
    },
    closeAll: async (code = 1001, timeoutMs = 2000) => {
      const all = [...open]
      for (const b of all) {
        closeLike(b.client, code, 'replica shutting down')
        closeLike(b.upstream, code, 'replica shutting down')
      }
      let timer: NodeJS.Timeout | undefined
      await Promise.race([
        Promise.all(all.map(async (b) => await b.relay.closed)),
        new Promise<void>((resolve) => { timer = setTimeout(resolve, timeoutMs) })
      ])
      clearTimeout(timer)
      for (const b of all) { b.client.terminate(); b.upstream.terminate() }
    },
    uninstall: () => {
      server.off('upgrade', dispatch)
      for (const l of captured) server.on('upgrade', l)
    }
  }
}
