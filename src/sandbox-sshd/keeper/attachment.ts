import type { ServerChannel } from 'ssh2'
import { ChannelOutput } from '../channel-output.js'
import { sendExitReport, type ExitOutcome } from '../exit-report.js'

export type StreamName = 'stdout' | 'stderr'
export interface Offsets { stdout: number, stderr: number }

/** What an attachment needs of its kept exec. */
export interface AttachSource {
  /** The next kept piece at or after the offsets, the two streams interleaved by arrival. */
  next: (from: Offsets) => { stream: StreamName, data: Buffer } | undefined
  /** Set once the exec's output is final: nothing more will be spooled. */
  final: () => { outcome: ExitOutcome, message: string } | undefined
  /** The attachment handed output over: room in the spools may have been freed. */
  sent: () => void
  /** The client's stdin: false when the command's side is full (pause until resumeInput) */
  takeInput: (chunk: Buffer) => boolean
  /** The client's EOF, after every byte it sent before it. */
  endInput: () => void
  /** The channel closed (client gone or connection lost): a detach, never the exec's end. */
  gone: (att: Attachment) => void
}

// Output handed to ssh2 but not yet taken by it. ssh2 buffers what the window does not let
// through; this keeps that small, so the spool (which can replay it) holds the rest.
const MAX_IN_FLIGHT_BYTES = 256 * 1024

/**
 * One channel attached to a kept exec: sends the exec's output from its offsets (replay, then
 * live), then the exit report once every byte has been sent; feeds the channel's data to the
 * command's stdin. A channel that goes away only detaches; a superseded one is closed without a
 * report.
 */
export class Attachment {
  readonly channel: ServerChannel
  readonly sentUpTo: Offsets
  readonly #output: ChannelOutput
  readonly #source: AttachSource
  #inFlight = 0
  #pumping = false
  #reporting = false
  #closed = false
  // The client's EOF was seen on its session; it applies once the data before it is consumed.
  #eofSeen = false

  constructor (channel: ServerChannel, from: Offsets, source: AttachSource, onError: (err: Error) => void) {
    this.channel = channel
    this.sentUpTo = { ...from }
    this.#source = source
    this.#output = new ChannelOutput(channel)
    channel.on('error', onError)
    channel.stderr.on('error', onError)
    channel.on('data', (chunk: Buffer) => {
      if (this.#closed) return
      if (!source.takeInput(chunk)) channel.pause()
    })
    channel.once('end', () => {
      if (!this.#closed && this.#eofSeen) source.endInput()
    })
    channel.once('close', () => { this.lost() })
  }

  /**
   * The client closed the channel or its connection went away. ssh2 may say so on the session
   * (or only with the connection) before the channel itself can emit 'close'.
   */
  lost (): void {
    if (this.#closed) return
    this.#closed = true
    this.channel.resume()
    this.#source.gone(this)
  }

  get closed (): boolean { return this.#closed }

  /** The session saw the client's EOF (ssh2 emits it there, before the data it follows is read). */
  eof (): void { this.#eofSeen = true }

  resumeInput (): void {
    if (!this.#closed) this.channel.resume()
  }

  /** Sends what there is to send; the exec calls it whenever there may be more. */
  pump (): void {
    if (this.#closed || this.#reporting || this.#pumping) return
    this.#pumping = true
    let sentAny = false
    try {
      while (this.#inFlight < MAX_IN_FLIGHT_BYTES) {
        const piece = this.#source.next(this.sentUpTo)
        if (piece === undefined) break
        const n = piece.data.length
        this.sentUpTo[piece.stream] += n
        this.#inFlight += n
        sentAny = true
        const side = piece.stream === 'stdout' ? this.#output.stdout : this.#output.stderr
        side.write(piece.data, () => {
          this.#inFlight -= n
          this.pump()
        })
      }
    } finally {
      this.#pumping = false
    }
    if (sentAny) this.#source.sent()
    this.#maybeReport()
  }

  #maybeReport (): void {
    const final = this.#source.final()
    if (final === undefined || this.#inFlight > 0 || this.#closed || this.#reporting) return
    if (this.#source.next(this.sentUpTo) !== undefined) return
    this.#reporting = true
    this.#output.flush(() => {
      if (this.#closed) return
      sendExitReport(this.channel, final.outcome, final.message)
    })
  }

  /** Cut off (superseded, detached by a status request, or the exec forgotten): no report. */
  close (): void {
    if (this.#closed) return
    this.#closed = true
    this.channel.removeAllListeners('data')
    // Keep draining what the client still sends, so ssh2 can complete the close.
    this.channel.resume()
    try {
      this.channel.close()
    } catch {
      // Already gone with its connection.
    }
  }
}
