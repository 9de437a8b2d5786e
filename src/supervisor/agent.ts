import http2, { type ClientHttp2Session, type ClientHttp2Stream } from 'node:http2'
import net from 'node:net'
import tls from 'node:tls'
import os from 'node:os'
import { randomUUID } from 'node:crypto'
import type { Logger } from 'pino'
import { H2Pinger } from '../relay/h2-ping.js'
import { H2_CONNECTION_WINDOW, H2_STREAM_WINDOW, RELAY_PATH_PREFIX, SESSION_PATH } from '../relay/protocol.js'
import {
  decode, encode, GatewayMessages, LineSplitter, REASON_MAX_CHARS, SupervisorMessages, type GatewayMessage, type SupervisorMessage
} from '../supervisor-plane/messages.js'
import { Keeper } from '../sandbox-sshd/keeper/keeper.js'
import { startEmbeddedSshd, type EmbeddedSshd } from '../sandbox-sshd/server.js'
import { Backoff } from './backoff.js'
import { bridge } from './bridge.js'

// The in-sandbox agent: dials out to the gateway, holds one session, and for every relay the
// gateway asks for opens a TCP connection to the SSH daemon and an HTTP/2 stream, and joins them.

export interface SupervisorOptions {
  gatewayUrl: string
  sandboxId: string
  token: string
  // host:port of an SSH daemon (e.g. OpenSSH); without it, the embedded daemon in-process.
  sshTarget?: { host: string, port: number } | undefined
  sshUser?: string | undefined
  // The target's host public key (OpenSSH one-line), reported so the gateway can pin it.
  sshHostKey?: string | undefined
  // For an https:// gateway: CA certificates to verify it against (default: the system CAs),
  // or a pinned certificate (SHA-256 fingerprint as X509Certificate.fingerprint256 prints it).
  tls?: { ca?: string | Buffer | undefined, pinnedCertSha256?: string | undefined } | undefined
  logger: Logger
  connectTimeoutMs?: number
  /**
   * The embedded daemon's keeper bounds (--keep-bytes-per-exec, --keep-total-bytes,
   * --keep-finished-s). The embedded daemon always keeps its execs; OpenSSH targets cannot.
   */
  keep?: { bytesPerExec?: number | undefined, totalBytes?: number | undefined, finishedS?: number | undefined } | undefined
}

const DEFAULT_KEEP = { bytesPerExec: 8 * 1024 * 1024, totalBytes: 256 * 1024 * 1024, finishedS: 900 }

const DEFAULT_PING_INTERVAL_MS = 10_000
const DEFAULT_PING_TIMEOUT_MS = 20_000
// The fastest the gateway may make us PING or heartbeat, whatever it announces.
const MIN_PING_INTERVAL_MS = 50
const MIN_HEARTBEAT_INTERVAL_MS = 100
// A gateway line longer than this is not one of ours: the session is dropped and redialled.
const GATEWAY_LINE_MAX_BYTES = 64 * 1024
const HEALTHY_SESSION_MS = 10_000
// After a move, how long the old connection's streams may take to finish before it is cut.
const OLD_SESSION_CLOSE_MS = 5000

export class Supervisor {
  readonly #opts: SupervisorOptions
  readonly #log: Logger
  readonly #backoff = new Backoff({ baseMs: 100, maxMs: 5000 })
  #embedded: EmbeddedSshd | undefined
  #keeper: Keeper | undefined
  // The session's connection, and for a moment during a move the new one beside it.
  readonly #clients = new Set<ClientHttp2Session>()
  // A move's new session, once accepted: the loop holds it next instead of dialling.
  #handoff: Promise<void> | undefined
  #moving = false
  #stopped = false
  #loop: Promise<void> | undefined
  #wake: (() => void) | undefined
  #relays = new Set<{ destroy: () => void }>()
  // Tells the gateway which process this is: a process that was superseded may not take its
  // sandbox back while the newer one is connected.
  readonly #instanceId = randomUUID()

  constructor (opts: SupervisorOptions) {
    this.#opts = opts
    this.#log = opts.logger.child({ sandboxId: opts.sandboxId })
  }

  get sshTarget (): { host: string, port: number } | undefined {
    return this.#opts.sshTarget ?? (this.#embedded === undefined ? undefined : { host: this.#embedded.host, port: this.#embedded.port })
  }

  async start (): Promise<void> {
    if (this.#opts.sshTarget === undefined) {
      const log = this.#log.child({ component: 'sshd' })
      const keep = this.#opts.keep
      this.#keeper = new Keeper({
        bytesPerExec: keep?.bytesPerExec ?? DEFAULT_KEEP.bytesPerExec,
        totalBytes: keep?.totalBytes ?? DEFAULT_KEEP.totalBytes,
        finishedS: keep?.finishedS ?? DEFAULT_KEEP.finishedS,
        logger: log
      })
      // Nobody may log in until the gateway has told us its key.
      this.#embedded = await startEmbeddedSshd({ authorizedKeys: [], logger: log, keeper: this.#keeper })
    }
    this.#loop = this.#run()
  }

  async stop (): Promise<void> {
    this.#stopped = true
    this.#wake?.()
    for (const r of this.#relays) r.destroy()
    for (const c of this.#clients) c.destroy()
    await this.#loop
    // Kept execs outlive gateways, not their supervisor: with nobody left to collect their
    // outcome they would run unobserved. TERM, then KILL after a grace.
    await this.#keeper?.shutdown()
    this.#keeper?.close()
    await this.#embedded?.close()
  }

  async #run (): Promise<void> {
    while (!this.#stopped) {
      const started = Date.now()
      let accepted = false
      try {
        const handoff = this.#handoff
        this.#handoff = undefined
        if (handoff !== undefined) accepted = true
        await (handoff ?? this.#session(() => { accepted = true }))
      } catch (err) {
        this.#log.warn({ err: (err as Error).message }, 'supervisor session failed')
      }
      if (this.#stopped) break
      // A move's new session took over from the one that just ended: hold it, no backoff.
      if (this.#handoff !== undefined) continue
      // A session that was accepted and lived a while resets the backoff: one blip after days
      // of health must not cost the next reconnect the maximum delay.
      if (accepted && Date.now() - started >= HEALTHY_SESSION_MS) this.#backoff.reset()
      const delay = this.#backoff.next()
      this.#log.info({ delayMs: delay }, 'reconnecting to the gateway')
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, delay)
        this.#wake = () => { clearTimeout(t); resolve() }
      })
    }
  }

  async #session (onAccepted: () => void): Promise<void> {
    const o = this.#opts
    const url = new URL(o.gatewayUrl)
    const client = http2.connect(url, {
      settings: { initialWindowSize: H2_STREAM_WINDOW },
      // Relays carry SSH: no Nagle delay on the connection that multiplexes them.
      createConnection: () => this.#dial(url)
    })
    this.#clients.add(client)
    client.on('error', (err) => this.#log.debug({ err }, 'gateway connection error'))
    try {
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`could not connect to ${o.gatewayUrl} within ${o.connectTimeoutMs ?? 10000} ms`)), o.connectTimeoutMs ?? 10000)
        client.once('connect', () => { clearTimeout(t); resolve() })
        client.once('error', (err) => { clearTimeout(t); reject(err) })
        client.once('close', () => { clearTimeout(t); reject(new Error('connection closed')) })
      })
      try { client.setLocalWindowSize(H2_CONNECTION_WINDOW) } catch { /* closing */ }
      await this.#holdSession(client, onAccepted)
    } finally {
      // Never tear down an HTTP/2 session from inside one of its own callbacks: re-entering
      // nghttp2 while it is still reading (a GOAWAY, a RST) spins Node 20 at 100% CPU forever
      // in SendPendingData. Let the read finish first.
      await new Promise((resolve) => setImmediate(resolve))
      client.destroy()
      this.#clients.delete(client)
    }
  }

  // The gateway drains (cluster mode): a new session through the same address, which the load
  // balancer sends to another replica, then the old connection is closed gracefully. Until the
  // new session is accepted nothing changes: a try that fails leaves the old session as it was,
  // for the next move message.
  #move (old: ClientHttp2Session): void {
    if (this.#moving || this.#stopped) return
    this.#moving = true
    let tookOver = false
    const next: Promise<void> = this.#session(() => {
      this.#moving = false
      if (tookOver) return
      tookOver = true
      this.#handoff = next
      this.#log.info('the new session is accepted; leaving the draining gateway')
      setImmediate(() => {
        try { old.close() } catch { /* gone */ }
        setTimeout(() => old.destroy(), OLD_SESSION_CLOSE_MS).unref()
      })
    })
    next.catch((err: Error) => {
      if (!tookOver) this.#log.warn({ err: err.message }, 'could not open a new session to move to; staying')
    }).finally(() => { if (!tookOver) this.#moving = false })
  }

  #dial (url: URL): net.Socket {
    const host = url.hostname.replace(/^\[|\]$/g, '')
    if (url.protocol !== 'https:') return net.connect({ host, port: Number(url.port || 80), noDelay: true })
    const t = this.#opts.tls
    const pinned = t?.pinnedCertSha256
    const sock = tls.connect({
      host,
      port: Number(url.port || 443),
      ALPNProtocols: ['h2'],
      minVersion: 'TLSv1.2',
      ...(net.isIP(host) === 0 ? { servername: host } : {}),
      ...(t?.ca === undefined ? {} : { ca: t.ca }),
      // A pinned certificate replaces chain and name checks: it is the stronger check.
      ...(pinned === undefined
        ? {}
        : {
            rejectUnauthorized: false,
            checkServerIdentity: () => undefined
          })
    })
    sock.setNoDelay(true)
    if (pinned !== undefined) {
      // Checked before any byte of ours (the token) is written: HTTP/2 waits for secureConnect.
      sock.once('secureConnect', () => {
        const got = sock.getPeerX509Certificate()?.fingerprint256
        if (got !== pinned) sock.destroy(new Error(`the gateway's TLS certificate ${got ?? '(none)'} is not the pinned ${pinned}`))
      })
    }
    return sock
  }

  #holdSession (client: ClientHttp2Session, onAccepted: () => void): Promise<void> {
    const o = this.#opts
    return new Promise<void>((resolve, reject) => {
      const dead = (reason: string): void => { this.#log.warn({ reason }, 'gateway connection is dead'); setImmediate(() => client.destroy()) }
      // Liveness from the first byte: a connection that dies before the session is accepted
      // must not hold this supervisor forever.
      let pinger = new H2Pinger(client, { intervalMs: DEFAULT_PING_INTERVAL_MS, timeoutMs: DEFAULT_PING_TIMEOUT_MS, onDead: dead })
      const acceptBound = o.connectTimeoutMs ?? 10_000
      const acceptTimer = setTimeout(() => dead(`session not accepted within ${acceptBound} ms`), acceptBound)
      let heartbeat: NodeJS.Timeout | undefined
      const req = client.request({
        ':method': 'POST',
        ':path': SESSION_PATH,
        authorization: `Bearer ${o.token}`,
        'content-type': 'application/x-ndjson'
      }, { endStream: false })
      const send = (msg: SupervisorMessage): void => { if (req.writable) req.write(encode(msg)) }
      const finish = (err?: Error): void => {
        clearInterval(heartbeat)
        clearTimeout(acceptTimer)
        pinger.stop()
        if (err === undefined) resolve()
        else reject(err)
      }
      const onMessage = (msg: GatewayMessage): void => {
        if (msg.type === 'accepted') {
          try {
            this.#embedded?.setAuthorizedKeys([msg.gatewayPublicKey])
          } catch (err) {
            // Relays will then fail SSH auth with a clear 502; the session itself stays up.
            this.#log.error({ err: (err as Error).message }, 'the gateway sent an unusable public key')
          }
          // The gateway's own liveness bounds, capped both ways: a gateway that went half-dead
          // is noticed as fast as the gateway would notice us, and no announced value can make
          // us PING or heartbeat in a tight loop.
          clearTimeout(acceptTimer)
          pinger.stop()
          pinger = new H2Pinger(client, {
            intervalMs: clamp(msg.pingIntervalMs, MIN_PING_INTERVAL_MS, DEFAULT_PING_INTERVAL_MS),
            timeoutMs: clamp(msg.pingTimeoutMs, MIN_PING_INTERVAL_MS, DEFAULT_PING_TIMEOUT_MS),
            onDead: dead
          })
          // A second "accepted" replaces the first's heartbeat, never adds one.
          clearInterval(heartbeat)
          heartbeat = setInterval(() => send({ type: 'heartbeat' }), Math.max(MIN_HEARTBEAT_INTERVAL_MS, msg.heartbeatIntervalMs))
          onAccepted()
          this.#log.info({ sessionId: msg.sessionId }, 'supervisor session accepted')
        } else if (msg.type === 'relay') {
          this.#openRelay(client, msg.relayId, send)
        } else if (msg.type === 'superseded') {
          this.#log.warn('another supervisor process took over this sandbox; this one stands by until it goes away')
        } else if (msg.type === 'rejected') {
          this.#log.warn({ reason: msg.reason }, 'the gateway refused this session')
        } else if (msg.type === 'move') {
          this.#move(client)
        }
      }
      req.on('error', (err) => finish(err))
      req.on('close', () => finish())
      client.once('close', () => finish())
      const hello: SupervisorMessage = { type: 'hello', instanceId: this.#instanceId, sshHostKey: o.sshHostKey ?? this.#embedded?.hostPublicKey, sshUser: o.sshUser ?? os.userInfo().username, ...(this.#keeper === undefined ? {} : { keepsExecs: true }) }
      // The gateway checks it with the same schema and ignores a hello it cannot take.
      const own = decode(SupervisorMessages, Buffer.from(JSON.stringify(hello)))
      if (!own.ok) this.#log.error({ why: own.why }, 'the gateway will refuse this hello (check --ssh-user and --ssh-host-key)')
      send(hello)
      // The gateway ending its side (shutdown, supersede) ends ours, so the connection can go.
      req.on('end', () => { if (req.writable) req.end() })
      req.on('response', (headers) => {
        const status = Number(headers[':status'])
        if (status !== 200) {
          let body = ''
          req.setEncoding('utf8')
          req.on('data', (c: string) => { body += c })
          req.on('end', () => finish(new Error(`gateway refused the session: ${status} ${body.slice(0, 500)}`)))
          return
        }
        const lines = new LineSplitter(GATEWAY_LINE_MAX_BYTES)
        req.on('data', (chunk: Buffer) => {
          pinger.touch()
          lines.push(chunk, (line) => {
            if (line.length === 0) return 'go on'
            const d = decode(GatewayMessages, line)
            if (!d.ok) { this.#log.warn({ why: d.why, bytes: line.length }, 'bad message from gateway'); return 'go on' }
            // A handler that throws drops this session (the loop reconnects), never the process.
            try { onMessage(d.msg) } catch (err) {
              this.#log.error({ type: d.msg.type, err: err instanceof Error ? err.message : typeof err }, 'handling a gateway message failed; reconnecting')
              dead('a gateway message could not be handled')
              return 'stop'
            }
            return 'go on'
          }, (bytes) => {
            this.#log.warn({ bytes }, 'gateway session line too long; reconnecting')
            dead('gateway session line too long')
          })
        })
      })
    })
  }

  #openRelay (client: ClientHttp2Session, relayId: string, sendMessage: (msg: SupervisorMessage) => void): void {
    // The gateway refuses a reason over its bound (and the whole message with it).
    const send = (msg: SupervisorMessage): void => {
      sendMessage(msg.type === 'relay_failed' ? { ...msg, reason: msg.reason.slice(0, REASON_MAX_CHARS) } : msg)
    }
    const target = this.sshTarget
    if (target === undefined) { send({ type: 'relay_failed', relayId, reason: 'no SSH target' }); return }
    const log = this.#log.child({ relayId })
    const tcp = net.connect({ host: target.host, port: target.port, noDelay: true })
    const connectTimer = setTimeout(() => tcp.destroy(new Error(`connect to ${target.host}:${target.port} timed out`)), 5000)
    let stream: ClientHttp2Stream | undefined
    const handle = { destroy: () => { tcp.destroy(); stream?.destroy() } }
    this.#relays.add(handle)
    tcp.once('close', () => { clearTimeout(connectTimer); this.#relays.delete(handle) })
    tcp.once('error', (err) => {
      clearTimeout(connectTimer)
      if (stream === undefined) {
        log.warn({ err: err.message }, 'cannot reach the SSH daemon')
        send({ type: 'relay_failed', relayId, reason: `cannot reach the sandbox SSH daemon at ${target.host}:${target.port}: ${err.message}` })
      }
    })
    tcp.once('connect', () => {
      clearTimeout(connectTimer)
      if (client.destroyed || client.closed) { tcp.destroy(); return }
      const s = client.request({
        ':method': 'POST',
        ':path': RELAY_PATH_PREFIX + relayId,
        authorization: `Bearer ${this.#opts.token}`,
        'content-type': 'application/octet-stream'
      }, { endStream: false })
      stream = s
      s.on('response', (headers) => {
        const status = Number(headers[':status'])
        if (status !== 200) {
          log.warn({ status }, 'gateway refused the relay')
          // Said on the session, so the exec fails now instead of at the relay-open bound
          // (a retired token secret refuses relays while the session lives on).
          send({ type: 'relay_failed', relayId, reason: `the gateway refused the relay stream (HTTP ${status}${status === 401 ? ': this supervisor\'s token is no longer accepted' : ''})` })
          handle.destroy()
        }
      })
      bridge(tcp, s, log)
    })
  }
}

function clamp (n: number, min: number, max: number): number {
  return Math.min(max, Math.max(min, n))
}
