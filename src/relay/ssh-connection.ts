import { EventEmitter } from 'node:events'
import type { Duplex } from 'node:stream'
import { Client, type ClientChannel } from 'ssh2'
import type { Logger } from 'pino'
import { GatewayError } from '../errors.js'
import { sshClientFailure, sshHandshakeBreak, type SshClientError } from '../errors.js'
import type { RefusalReason, Refusals } from '../refusals.js'
import { boundedText } from './bounded-text.js'
import { GATEWAY_KEX, installSshGuard } from './ssh-guard.js'

// One SSH connection over one relay stream, carrying one or (pooled) several exec channels.
// Liveness is SSH keepalive: a wedged relay fails after interval × (countMax + 1). When the
// connection dies it says why, once ('failure'), and every channel on it ends with that reason.
// The daemon at the other end runs in the sandbox and may be hostile: ssh-guard.ts holds it to
// the protocol, and every string of its that reaches a record or a log is bounded.

export interface SshConnectionOptions {
  sock: Duplex
  username: string
  privateKey: string | Buffer
  hostVerifier?: ((key: Buffer) => boolean) | undefined
  keepaliveIntervalMs: number
  keepaliveCountMax: number
  readyTimeoutMs: number
  logger: Logger
  sandboxId: string
  refusals: Refusals
  maxRekeysPerMinute: number
  maxRefusedChannelOpens: number
}

// Stdin the sandbox's SSH window lets through goes straight into the relay stream. A daemon
// that grants a huge window and never reads its relay would have the gateway hold all of it
// there: past this, writers are paused as they are for a full channel (the same 2 MiB).
const RELAY_STDIN_HIGH_WATER = 2 * 1024 * 1024
// Replies to the daemon's requests that the relay has not taken; past this it is failed.
const RELAY_BACKLOG_MAX = 16 * 1024 * 1024
// After our DISCONNECT, how long the daemon has to close its side before the relay is cut. An
// honest one closes in a round trip; a wedged or hostile one must not keep the stream (and its
// supervisor's slot) for as long as it likes.
const DISCONNECT_ANSWER_MS = 1000
// What a side script may print that is kept: a path, a word.
const SIDE_STDOUT_MAX = 4096

interface SideResult { code: number | undefined, stdout: string, truncated: boolean }

// A failed exec request, and whether the command certainly never started (its channel never
// opened), which is the only case where running it on another connection is safe.
export class ExecOpenError extends Error {
  readonly error: GatewayError
  readonly neverStarted: boolean
  constructor (error: GatewayError, neverStarted: boolean) {
    super(error.detail)
    this.error = error
    this.neverStarted = neverStarted
  }
}

export class SshConnection extends EventEmitter {
  readonly #opts: SshConnectionOptions
  readonly #client = new Client()
  readonly ready: Promise<void>
  #isReady = false
  #transportClosed = false
  #failure: GatewayError | undefined
  #ended = false
  readonly #relayDrainWaiters = new Set<() => void>()

  constructor (opts: SshConnectionOptions) {
    super()
    this.#opts = opts
    const client = this.#client
    opts.sock.on('error', (err) => opts.logger.debug({ err: boundedText(err.message) }, 'relay stream error'))
    opts.sock.on('drain', () => {
      const waiters = [...this.#relayDrainWaiters]
      this.#relayDrainWaiters.clear()
      for (const w of waiters) w()
    })
    this.ready = new Promise<void>((resolve, reject) => {
      client.once('ready', () => { this.#isReady = true; resolve() })
      this.once('failure', (err: GatewayError) => reject(err))
    })
    // Nobody may be waiting on ready when it fails later; that is not an unhandled rejection.
    this.ready.catch(() => {})
    client.on('error', (err: Error & { level?: string }) => this.#onClientError(err))
    client.on('close', () => this.#onClosed())
    // The sandbox ending its side (ssh2's server does so on a packet it refuses) leaves ssh2's
    // client half-open with its keepalive stopped: without this, the exec would wait forever.
    client.on('end', () => { this.#onClosed(); if (!opts.sock.destroyed) setImmediate(() => opts.sock.destroy()) })
    client.connect({
      sock: opts.sock,
      username: opts.username,
      privateKey: opts.privateKey,
      ...(opts.hostVerifier === undefined ? {} : { hostVerifier: opts.hostVerifier }),
      keepaliveInterval: opts.keepaliveIntervalMs,
      keepaliveCountMax: opts.keepaliveCountMax,
      readyTimeout: opts.readyTimeoutMs,
      algorithms: { kex: GATEWAY_KEX }
    })
    try {
      installSshGuard(client, {
        maxRekeysPerMinute: opts.maxRekeysPerMinute,
        maxRefusedChannelOpens: opts.maxRefusedChannelOpens,
        relayBacklog: () => opts.sock.writableLength,
        maxRelayBacklog: RELAY_BACKLOG_MAX,
        refuse: (reason, message, fields) => opts.refusals.refuse(reason, opts.sandboxId, message, fields),
        fail: (reason, detail, fields) => this.#violation(reason, detail, fields)
      })
    } catch (err) {
      opts.sock.destroy()
      throw err
    }
  }

  get failure (): GatewayError | undefined { return this.#failure }
  get alive (): boolean { return this.#failure === undefined && !this.#ended }

  // True while the relay holds RELAY_STDIN_HIGH_WATER or more that it has not taken; a 'drain'
  // is then certain to come (or the relay dies, and every exec on it ends).
  get relayBacklogged (): boolean {
    const sock = this.#opts.sock
    return sock.writableNeedDrain && sock.writableLength >= RELAY_STDIN_HIGH_WATER
  }

  // Calls cb once when the relay has taken all it held; returns the function that cancels it.
  onRelayDrain (cb: () => void): () => void {
    this.#relayDrainWaiters.add(cb)
    return () => { this.#relayDrainWaiters.delete(cb) }
  }

  // `attach` runs inside ssh2's callback, before anything else: on a warm connection the exec's
  // reply, its output, its exit-status and its close can all arrive in the same read, and an
  // 'exit' emitted before its listener is attached is lost for good.
  // `env` goes out as env requests before the exec request on the same channel (ssh2 sends them
  // first, unanswered): the keeper protocol's KEEP_ENV rides there.
  openExec<T> (command: string, pty: { cols: number, rows: number } | undefined, attach: (channel: ClientChannel) => T, env?: Record<string, string>): Promise<T> {
    return new Promise((resolve, reject) => {
      if (!this.alive) {
        reject(new ExecOpenError(this.#failure ?? new GatewayError('relay_unavailable', 'the SSH connection is closed'), true))
        return
      }
      const onReply = (err: Error | undefined, channel: ClientChannel): void => {
        if (err === undefined || err === null) { resolve(attach(channel)); return }
        // ssh2 marks a refused channel open with a numeric reason: then nothing ran.
        const neverStarted = typeof (err as Error & { reason?: unknown }).reason === 'number'
        // A refusal and a relay that died under the request look alike here; the transport's own
        // close (if that is what happened) arrives in the same turn.
        setImmediate(() => reject(new ExecOpenError(this.#transportClosed
          ? (this.#failure ?? new GatewayError('relay_unavailable', 'the relay closed before the command started', { cause: err }))
          : new GatewayError('ssh_failed', `the sandbox refused the exec request: ${boundedText(err.message)}`, { cause: err }), neverStarted)))
      }
      try {
        this.#client.exec(command, {
          ...(pty === undefined ? {} : { pty: { cols: pty.cols, rows: pty.rows, term: 'xterm-256color' } }),
          ...(env === undefined ? {} : { env })
        }, onReply)
      } catch (err) {
        // ssh2 throws ("Not connected") when its transport went away without telling us.
        const failure = new GatewayError('relay_unavailable', `the SSH connection is unusable: ${boundedText((err as Error).message)}`, { cause: err })
        this.#fail(failure)
        reject(new ExecOpenError(failure, true))
      }
    })
  }

  // Runs a script with `input` as its stdin on a channel of its own: its exit code and up to
  // maxBytes of its stdout, or undefined when it could not run (connection gone, channel
  // refused) within boundMs. What it prints comes from the sandbox: `truncated` says a prefix.
  async runSide (script: string, input: Buffer, boundMs: number, maxBytes: number): Promise<{ code: number | undefined, stdout: string, truncated: boolean } | undefined> {
    return await this.#side(script, boundMs, input, maxBytes)
  }

  // Runs a control request (the keeper protocol) on a channel of its own: its exit code and up
  // to maxBytes of its stdout, or undefined when no answer came within boundMs. The daemon may
  // be hostile: what it says is capped, and `truncated` tells the caller not to trust a prefix.
  async control (line: string, boundMs: number, maxBytes: number): Promise<{ code: number | undefined, stdout: string, truncated: boolean } | undefined> {
    const r = await this.#side(line, boundMs, undefined, maxBytes)
    return r === undefined ? undefined : { code: r.code, stdout: r.stdout, truncated: r.truncated }
  }

  // Writes `content` to a new private file in the sandbox's temp dir and resolves with its path.
  // Command lines too long for one SSH packet (ssh2 servers refuse packets over 35,000 bytes) or
  // for one argv string of `sh -c` (Linux: 128 KiB) travel this way, as channel data.
  async stage (content: Buffer, boundMs: number): Promise<string> {
    // eslint-disable-next-line no-template-curly-in-string -- a shell expansion, for sh
    const script = 'umask 077 && f=$(mktemp "${TMPDIR:-/tmp}/exec-gateway.XXXXXXXXXX") && cat > "$f" && printf %s "$f"'
    const r = await this.#side(script, boundMs, content, SIDE_STDOUT_MAX)
    const path = r?.stdout.trim() ?? ''
    if (r === undefined || r.code !== 0 || !path.startsWith('/')) {
      throw this.#failure ?? new GatewayError('ssh_failed', `could not stage the command line in the sandbox (exit ${String(r?.code)}): ${r === undefined ? 'no answer within ' + boundMs + ' ms' : boundedText(r.stdout, 200)}`)
    }
    return path
  }

  #side (script: string, boundMs: number, input: Buffer | undefined, maxBytes: number): Promise<SideResult | undefined> {
    return new Promise((resolve) => {
      if (!this.#isReady || !this.alive) { resolve(undefined); return }
      let settled = false
      const chunks: Buffer[] = []
      let taken = 0
      let truncated = false
      let code: number | undefined
      const settle = (result: SideResult | undefined): void => {
        if (settled) return
        settled = true
        clearTimeout(timer)
        resolve(result)
      }
      const timer = setTimeout(() => settle(undefined), boundMs)
      try {
        this.#client.exec(script, (err, ch) => {
          if (err !== undefined && err !== null) { settle(undefined); return }
          ch.on('error', () => settle(undefined))
          ch.on('data', (b: Buffer) => {
            const room = maxBytes - taken
            if (b.length > room) truncated = true
            if (room <= 0) return
            const part = b.length > room ? b.subarray(0, room) : b
            chunks.push(part)
            taken += part.length
          })
          ch.on('exit', (c: number | null) => { code = c ?? undefined })
          // The exit status can arrive before the last output: settle on close.
          ch.on('close', () => settle({ code, stdout: Buffer.concat(chunks).toString('utf8'), truncated }))
          ch.stderr.resume()
          if (input !== undefined) ch.write(input)
          ch.end()
        })
      } catch {
        settle(undefined)
      }
    })
  }

  // True once end() was called: a close after that is ours, not a failure of the relay.
  get endedByUs (): boolean { return this.#ended }

  // Closes the connection; the relay is cut if the sandbox does not answer the disconnect.
  end (): void {
    if (this.#ended) return
    this.#ended = true
    try { this.#client.end() } catch { /* already closed */ }
    const sock = this.#opts.sock
    if (!sock.destroyed) {
      const cut = setTimeout(() => sock.destroy(), DISCONNECT_ANSWER_MS)
      cut.unref()
      sock.once('close', () => clearTimeout(cut))
    }
  }

  #fail (err: GatewayError): void {
    if (this.#failure !== undefined) return
    this.#failure = err
    this.emit('failure', err)
  }

  // The daemon broke the protocol: counted, logged at the sandbox's rate, and the relay cut at
  // once, so nothing more it sent is parsed.
  #violation (reason: RefusalReason, detail: string, fields: Record<string, unknown> = {}): void {
    if (this.#failure !== undefined) return
    this.#opts.refusals.refuse(reason, this.#opts.sandboxId, `${detail}; the SSH connection is closed`, fields)
    this.#fail(new GatewayError('ssh_failed', detail))
    this.#opts.sock.destroy()
  }

  #onClosed (): void {
    this.#transportClosed = true
    this.#fail(new GatewayError('relay_unavailable', this.#isReady
      ? 'the relay closed before the command reported an exit status'
      : 'the relay closed during the SSH handshake'))
  }

  #onClientError (err: SshClientError): void {
    // ssh2's messages carry the daemon's own strings (a disconnect's description, say).
    const said = boundedText(err.message)
    this.#opts.logger.debug({ err: said, level: err.level }, 'ssh client error')
    if (this.#failure !== undefined) return
    // ssh2 classifies its errors by `level`; errors.ts says what each level means.
    const { readyTimeoutMs, keepaliveIntervalMs, keepaliveCountMax } = this.#opts
    const failure = sshClientFailure(err, said, { ready: this.#isReady, readyTimeoutMs, keepaliveIntervalMs, keepaliveCountMax })
    if (failure !== undefined) this.#fail(failure)
    // A relay that closed mid-handshake also surfaces here; its close arrives in the same turn.
    else setImmediate(() => this.#fail(sshHandshakeBreak(err, said, this.#transportClosed)))
    // ssh2 destroys its socket on these errors; make sure nothing is left half-open.
    if (!this.#isReady) this.end()
  }
}
