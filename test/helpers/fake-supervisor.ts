import http2, { type ClientHttp2Session, type ClientHttp2Stream } from 'node:http2'
import { SESSION_PATH } from '../../src/relay/protocol.js'
import { decode, encode, GatewayMessages, LineSplitter, type GatewayMessage, type SupervisorMessage } from '../../src/supervisor-plane/messages.js'

// A minimal supervisor speaking the real wire protocol (src/supervisor-plane/messages.ts) over a real
// node:http2 connection, for the conformance rows a real supervisor cannot produce on demand:
// one that never opens a relay, one that refuses relays with a reason, one that is superseded
// while relays wait on it. It holds the session and answers PINGs (node:http2 does that by
// itself); it never opens relay streams and never reconnects.

type FakeRelayHandler = 'ignore' | 'fail' | ((relayId: string) => void)

export interface FakeSupervisorOptions {
  /** The gateway's supervisor listener, e.g. TestGateway.supervisorUrl. */
  supervisorUrl: string
  /** Signed supervisor token for the sandbox (TestGateway.token(sandboxId)). */
  token: string
  /** What to do with a relay request: nothing, refuse it with relay_failed, or a callback. Default 'ignore'. */
  onRelay?: FakeRelayHandler
  /** Reason sent with relay_failed when onRelay is 'fail'. */
  failReason?: string
  /** Bound on the session being accepted; default 5000 ms. */
  acceptTimeoutMs?: number
}

export interface FakeSupervisor {
  /** Relay ids the gateway asked for, in order (re-offers included). */
  readonly relayRequests: string[]
  /** Every message the gateway sent on the session stream, in order. */
  readonly messages: GatewayMessage[]
  /** The `accepted` message. */
  readonly accepted: Extract<GatewayMessage, { type: 'accepted' }>
  /** True once a `superseded` message arrived. */
  superseded: () => boolean
  /** True once the session stream is closed (ended by the gateway, reset, or the connection gone). */
  sessionClosed: () => boolean
  /** Resolves when the session stream is closed. */
  readonly closedPromise: Promise<void>
  /** Sends {"type":"relay_failed","relayId","reason"}. */
  failRelay: (relayId: string, reason: string) => void
  /** Sends any supervisor message on the session stream. */
  send: (msg: SupervisorMessage) => void
  /** Writes raw bytes on the session stream (hostile tests: anything at all). */
  sendRaw: (data: string | Buffer) => void
  /** Resolves when `n` relay requests have arrived (bounded). */
  waitRelays: (n: number, timeoutMs?: number) => Promise<void>
  /** Tears the connection down (deferred out of any http2 callback). Idempotent. */
  close: () => Promise<void>
}

export async function startFakeSupervisor (opts: FakeSupervisorOptions): Promise<FakeSupervisor> {
  const onRelay = opts.onRelay ?? 'ignore'
  const relayRequests: string[] = []
  const messages: GatewayMessage[] = []
  const relayWaiters = new Set<() => void>()
  let superseded = false
  let closed = false
  let closing: Promise<void> | undefined

  const client: ClientHttp2Session = http2.connect(opts.supervisorUrl)
  client.on('error', () => { /* seen through the stream's close */ })

  const req: ClientHttp2Stream = client.request({
    ':method': 'POST',
    ':path': SESSION_PATH,
    authorization: `Bearer ${opts.token}`,
    'content-type': 'application/x-ndjson'
  }, { endStream: false })
  req.on('error', () => { /* seen through close */ })

  const send = (msg: SupervisorMessage): void => {
    if (!req.destroyed && req.writable) req.write(encode(msg))
  }
  const sendRaw = (data: string | Buffer): void => {
    if (!req.destroyed && req.writable) req.write(data)
  }
  const failRelay = (relayId: string, reason: string): void => send({ type: 'relay_failed', relayId, reason })

  let markClosed!: () => void
  const closedPromise = new Promise<void>((resolve) => { markClosed = resolve })
  req.on('close', () => { closed = true; markClosed() })
  client.on('close', () => { closed = true; markClosed() })

  const close = async (): Promise<void> => {
    closing ??= new Promise<void>((resolve) => {
      // Never destroy an http2 session from inside one of its own callbacks (Node 20 nghttp2 spin).
      setImmediate(() => {
        if (client.destroyed) { resolve(); return }
        client.once('close', () => resolve())
        client.destroy()
      })
    })
    await closing
  }

  const accepted = await new Promise<Extract<GatewayMessage, { type: 'accepted' }>>((resolve, reject) => {
    let settled = false
    const settle = (err: Error | undefined, msg?: Extract<GatewayMessage, { type: 'accepted' }>): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      if (err !== undefined) reject(err)
      else resolve(msg!)
    }
    const timer = setTimeout(() => settle(new Error(`fake supervisor: no "accepted" within ${opts.acceptTimeoutMs ?? 5000} ms`)), opts.acceptTimeoutMs ?? 5000)
    req.on('close', () => settle(new Error('fake supervisor: the session stream closed before "accepted"')))
    req.on('response', (headers) => {
      const status = Number(headers[':status'])
      if (status !== 200) {
        let body = ''
        req.setEncoding('utf8')
        req.on('data', (c: string) => { body += c })
        req.on('end', () => settle(new Error(`fake supervisor: session refused: ${status} ${body}`)))
        return
      }
      const lines = new LineSplitter(1024 * 1024)
      req.on('data', (chunk: Buffer) => {
        lines.push(chunk, (line) => {
          const d = decode(GatewayMessages, line)
          if (!d.ok) return 'go on'
          const msg = d.msg
          messages.push(msg)
          if (msg.type === 'accepted') settle(undefined, msg)
          else if (msg.type === 'superseded') superseded = true
          else if (msg.type === 'relay') {
            relayRequests.push(msg.relayId)
            for (const w of [...relayWaiters]) w()
            if (onRelay === 'fail') {
              const reason = opts.failReason ?? 'fake supervisor refuses every relay'
              // Answer on the next turn, outside the data callback.
              setImmediate(() => failRelay(msg.relayId, reason))
            } else if (typeof onRelay === 'function') {
              const id = msg.relayId
              setImmediate(() => onRelay(id))
            }
          }
          return 'go on'
        }, () => { /* a gateway never sends such a line */ })
      })
    })
    send({ type: 'hello' })
  }).catch(async (err: unknown) => { await close(); throw err })

  const waitRelays = async (n: number, timeoutMs = 5000): Promise<void> => {
    if (relayRequests.length >= n) return
    await new Promise<void>((resolve, reject) => {
      const check = (): void => {
        if (relayRequests.length < n) return
        clearTimeout(timer)
        relayWaiters.delete(check)
        resolve()
      }
      const timer = setTimeout(() => {
        relayWaiters.delete(check)
        reject(new Error(`fake supervisor: ${relayRequests.length} relay requests after ${timeoutMs} ms, wanted ${n}`))
      }, timeoutMs)
      relayWaiters.add(check)
    })
  }

  return {
    relayRequests,
    messages,
    accepted,
    superseded: () => superseded,
    sessionClosed: () => closed,
    closedPromise,
    failRelay,
    send,
    sendRaw,
    waitRelays,
    close
  }
}
