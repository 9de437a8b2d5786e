import type { Duplex } from 'node:stream'
import { Client, type ClientChannel } from 'ssh2'
import type { Logger } from 'pino'
import { GatewayError } from '../errors.js'
import { normalizeSignalName, type ExitReport } from './outcome.js'

// One exec over one SSH connection carried by a relay stream. Liveness comes from SSH
// keepalives (a wedged relay fails after interval × (countMax + 1)); after the exit report the
// channel close is awaited for closeWaitMs in total, then the recorded status stands.

export interface SshExecOptions {
  sock: Duplex
  username: string
  privateKey: string | Buffer
  hostVerifier?: ((key: Buffer) => boolean) | undefined
  command: string
  pty?: { cols: number, rows: number } | undefined
  keepaliveIntervalMs: number
  keepaliveCountMax: number
  readyTimeoutMs: number
  closeWaitMs: number
  logger: Logger
  onStarted?: () => void
  onStdout: (chunk: Buffer) => void
  onStderr: (chunk: Buffer) => void
}

export interface SshExecEnd {
  exit: ExitReport | undefined
  failure: GatewayError | undefined
}

export class SshExec {
  readonly #opts: SshExecOptions
  readonly #client = new Client()
  #channel: ClientChannel | undefined
  #ready = false
  #transportClosed = false
  #paused = false
  #exit: ExitReport | undefined
  #failure: GatewayError | undefined
  #closeWaitTimer: NodeJS.Timeout | undefined
  #finished = false
  #resolve!: (end: SshExecEnd) => void
  readonly done: Promise<SshExecEnd>

  constructor (opts: SshExecOptions) {
    this.#opts = opts
    this.done = new Promise((resolve) => { this.#resolve = resolve })
  }

  start (): void {
    const o = this.#opts
    const client = this.#client
    o.sock.on('error', (err) => o.logger.debug({ err }, 'relay stream error'))
    client.on('error', (err: Error & { level?: string }) => this.#onClientError(err))
    client.on('close', () => this.#onTransportClosed())
    client.on('ready', () => {
      this.#ready = true
      client.exec(o.command, o.pty === undefined ? {} : { pty: { cols: o.pty.cols, rows: o.pty.rows, term: 'xterm-256color' } }, (err, channel) => {
        if (err !== undefined && err !== null) {
          // A refusal and a relay that died under the request look alike here; the transport's
          // own close (if that is what happened) arrives in the same turn.
          setImmediate(() => this.#fail(this.#transportClosed
            ? new GatewayError('relay_unavailable', 'the relay closed before the command started')
            : new GatewayError('ssh_failed', `the sandbox refused the exec request: ${err.message}`)))
          return
        }
        this.#attachChannel(channel)
      })
    })
    client.connect({
      sock: o.sock,
      username: o.username,
      privateKey: o.privateKey,
      ...(o.hostVerifier === undefined ? {} : { hostVerifier: o.hostVerifier }),
      keepaliveInterval: o.keepaliveIntervalMs,
      keepaliveCountMax: o.keepaliveCountMax,
      readyTimeout: o.readyTimeoutMs
    })
  }

  get started (): boolean { return this.#channel !== undefined }
  get exitReport (): ExitReport | undefined { return this.#exit }

  writeStdin (data: Buffer): boolean {
    const ch = this.#channel
    if (ch === undefined || !ch.writable) return true
    return ch.write(data)
  }

  // EOF only: a channel close before the exit report would let the sandbox drop the exit status.
  endStdin (): void {
    const ch = this.#channel
    if (ch !== undefined && ch.writable) ch.end()
  }

  // Stops (or restarts) reading the channel: ssh2 then stops adjusting the SSH window, so the
  // sandbox stops sending and the command blocks on its writes.
  setPaused (paused: boolean): void {
    this.#paused = paused
    const ch = this.#channel
    if (ch === undefined || this.#finished) return
    if (paused) { ch.pause(); ch.stderr.pause() } else { ch.resume(); ch.stderr.resume() }
  }

  resize (cols: number, rows: number): void {
    this.#channel?.setWindow(rows, cols, 0, 0)
  }

  // Runs a script on a second channel of the same connection; resolves with its exit code, or
  // undefined when it could not run (connection gone, channel refused) within boundMs.
  runSide (script: string, boundMs: number): Promise<number | undefined> {
    return new Promise((resolve) => {
      if (!this.#ready || this.#finished) { resolve(undefined); return }
      let settled = false
      const settle = (code: number | undefined): void => {
        if (settled) return
        settled = true
        clearTimeout(timer)
        resolve(code)
      }
      const timer = setTimeout(() => settle(undefined), boundMs)
      try {
        this.#client.exec(script, (err, ch) => {
          if (err !== undefined && err !== null) { settle(undefined); return }
          ch.on('error', () => settle(undefined))
          ch.on('exit', (code: number | null) => settle(code ?? undefined))
          ch.on('close', () => settle(undefined))
          ch.resume()
          ch.stderr.resume()
          ch.end()
        })
      } catch {
        settle(undefined)
      }
    })
  }

  // SSH `signal` request to the sandbox's direct child; used when the tag scan found nothing.
  signalChannel (signal: string): void {
    try {
      this.#channel?.signal(signal)
    } catch (err) {
      this.#opts.logger.debug({ err }, 'signal request failed')
    }
  }

  // Ends the exec from outside (shutdown, DELETE): the outcome is this failure unless an exit
  // report already arrived.
  abort (error: GatewayError): void {
    this.#fail(error)
  }

  #attachChannel (channel: ClientChannel): void {
    this.#channel = channel
    const o = this.#opts
    channel.on('data', (chunk: Buffer) => { if (!this.#finished) o.onStdout(chunk) })
    channel.stderr.on('data', (chunk: Buffer) => { if (!this.#finished) o.onStderr(chunk) })
    if (this.#paused) { channel.pause(); channel.stderr.pause() }
    channel.on('error', (err: Error) => o.logger.debug({ err }, 'ssh channel error'))
    channel.stderr.on('error', (err: Error) => o.logger.debug({ err }, 'ssh channel stderr error'))
    channel.on('exit', (code: number | null, signal?: string) => {
      if (this.#exit !== undefined) return
      this.#exit = code !== null && code !== undefined ? { code } : { signal: normalizeSignalName(signal ?? 'UNKNOWN') }
      // Total bound, not per message: a sandbox that trickles data must not hold the exec open.
      this.#closeWaitTimer = setTimeout(() => this.#finish(), o.closeWaitMs)
    })
    // 'close' comes after the readable side ended; let stderr's last push run first.
    channel.on('close', () => setImmediate(() => this.#onChannelClosed()))
    o.onStarted?.()
  }

  #onChannelClosed (): void {
    if (this.#exit === undefined) {
      this.#failure ??= new GatewayError('relay_unavailable', 'the SSH channel closed before the command reported an exit status')
    }
    this.#finish()
  }

  #onTransportClosed (): void {
    this.#transportClosed = true
    if (this.#exit === undefined && this.#failure === undefined) {
      this.#failure = new GatewayError('relay_unavailable', this.#ready
        ? 'the relay closed before the command reported an exit status'
        : 'the relay closed during the SSH handshake')
    }
    this.#finish()
  }

  #onClientError (err: Error & { level?: string }): void {
    this.#opts.logger.debug({ err, level: err.level }, 'ssh client error')
    if (this.#failure !== undefined || this.#finished) return
    // ssh2 classifies its errors by `level`; after the handshake a client-timeout can only be
    // the keepalive giving up.
    if (this.#ready && err.level === 'client-timeout') {
      const { keepaliveIntervalMs: i, keepaliveCountMax: n } = this.#opts
      this.#fail(new GatewayError('relay_unavailable', `no answer to ${n} SSH keepalives over ${i * (n + 1)} ms: the relay is wedged`))
    } else if (this.#ready) {
      this.#fail(new GatewayError('relay_unavailable', `the relay failed before the command reported an exit status: ${err.message}`))
    } else if (err.level === 'client-authentication') {
      this.#fail(new GatewayError('ssh_failed', 'the sandbox SSH daemon rejected the gateway key'))
    } else if (err.level === 'client-timeout') {
      this.#fail(new GatewayError('ssh_failed', `SSH handshake not finished within ${this.#opts.readyTimeoutMs} ms`))
    } else {
      // A relay that closed mid-handshake also surfaces here; its close arrives in the same turn.
      setImmediate(() => this.#fail(this.#transportClosed
        ? new GatewayError('relay_unavailable', `the relay closed during the SSH handshake: ${err.message}`)
        : new GatewayError('ssh_failed', `SSH handshake failed: ${err.message}`)))
    }
  }

  #fail (error: GatewayError): void {
    this.#failure ??= error
    this.#finish()
  }

  #finish (): void {
    if (this.#finished) return
    // Output already received but held back for a slow reader belongs to the exec: hand it
    // over before the outcome (read() emits 'data' synchronously).
    const ch = this.#channel
    if (ch !== undefined) {
      while (ch.read() !== null) { /* emitted as 'data' */ }
      while (ch.stderr.read() !== null) { /* emitted as 'data' */ }
    }
    this.#finished = true
    clearTimeout(this.#closeWaitTimer)
    const end: SshExecEnd = { exit: this.#exit, failure: this.#exit === undefined ? this.#failure : undefined }
    // The connection exists for this exec only: close it now, and cut the relay if the sandbox
    // does not answer the disconnect.
    try { this.#client.end() } catch { /* already closed */ }
    const sock = this.#opts.sock
    if (!sock.destroyed) {
      const cut = setTimeout(() => sock.destroy(), 1000)
      cut.unref()
      sock.once('close', () => clearTimeout(cut))
    }
    this.#resolve(end)
  }
}
