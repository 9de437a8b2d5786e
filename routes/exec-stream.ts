import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import type { WebSocket, RawData } from 'ws'
import { GatewayError } from '../src/errors.js'
import type { ExecEntry } from '../src/execs/exec-entry.js'
import { STDIN_BUFFER_MAX_BYTES } from '../src/execs/stdin-flow.js'
import { pumpEvents } from '../src/http/event-pump.js'
import { upgradeProblem } from '../src/http/transport-refusals.js'
import { AttachQuerySchema, ExecParamsSchema } from '../src/schemas/exec.js'
import { decodeClientFrame } from '../src/schemas/frames.js'
import { ProblemResponse } from '../src/schemas/problem.js'
import {
  BINARY_SUBPROTOCOL, CLOSE_ERROR, CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_RECONNECT, JSON_SUBPROTOCOL,
  STDERR_CHANNEL, STDIN_CHANNEL, STDOUT_CHANNEL
} from '../src/schemas/websocket.js'
import { EXEC_NOT_FOUND, findExec } from './execs.js'
import type { RouteContext } from '../src/http/route-context.js'

// WebSocket attach. JSON text events by default; with the exec-gateway.v1.binary subprotocol,
// output travels as binary frames (one channel byte, then raw bytes) and control events stay
// JSON. Closing the socket detaches; only DELETE or a signal ends the exec.

const P = ProblemResponse
const SWITCHING = Type.Null({
  description: 'switching to the WebSocket protocol',
  headers: { 'Sec-WebSocket-Protocol': { type: 'string', description: `${BINARY_SUBPROTOCOL} when the client offered it, else ${JSON_SUBPROTOCOL} when offered; absent otherwise (a bearer subprotocol is never selected)` } }
})
const STDOUT_BYTE = Buffer.from([STDOUT_CHANNEL])
const STDERR_BYTE = Buffer.from([STDERR_CHANNEL])
const HIGH_WATER = 1024 * 1024
const LOW_WATER = 256 * 1024
const STDIN_OVERFLOW = `stdin overflow: the exec already holds ${STDIN_BUFFER_MAX_BYTES} bytes of stdin beyond its pause mark`

const execStream: FastifyPluginAsyncTypebox<{ ctx: RouteContext }> = async (app, { ctx }) => {
  app.get('/v1/execs/:execId/stream', {
    websocket: true,
    schema: {
      operationId: 'attachExec',
      tags: ['execs'],
      summary: 'WebSocket attach: the exec\'s events, and stdin/eof/resize/signal frames',
      params: ExecParamsSchema,
      querystring: AttachQuerySchema,
      response: { 101: SWITCHING, 400: P, 401: P, 403: P, 404: EXEC_NOT_FOUND }
    },
    // A plain HTTP 404 before the upgrade, not an open-then-close, for an unknown exec.
    preValidation: async (req) => {
      // Kept for the handler: an exec another replica finished comes from the cluster directory
      // (cluster mode), not from this replica's records.
      found.set(req.raw, await findExec(ctx, (req.params as { execId: string }).execId))
      const why = upgradeProblem(req.raw)
      if (why !== undefined) throw new GatewayError('invalid_argument', why)
    }
  }, (socket, req) => {
    const entry = found.get(req.raw) ?? ctx.execs.get(req.params.execId)
    found.delete(req.raw)
    if (entry === undefined) { socket.close(CLOSE_POLICY, 'exec not found'); return }
    const binary = socket.protocol === BINARY_SUBPROTOCOL
    socket.on('error', (err) => req.log.debug({ err }, 'websocket error'))
    // While the exec cannot take this socket's stdin, the socket is not read, so TCP
    // backpressure reaches the client. stdinWait, set while paused, cancels that wait.
    let stdinWait: (() => void) | undefined
    const stopWaiting = (): void => { stdinWait?.(); stdinWait = undefined }
    // A paused socket would not read the client's close frame, and ws would then hold the
    // connection for its 30 s close timeout.
    const close = (code: number, why: string): void => {
      stopWaiting()
      socket.resume()
      socket.close(code, why)
    }
    const client: FrameClient = {
      refuse: (why) => close(CLOSE_POLICY, why.slice(0, 120)),
      writeStdin: (bytes) => {
        const result = ctx.execs.writeStdin(entry, bytes)
        if (result === 'overflow') { close(CLOSE_POLICY, STDIN_OVERFLOW); return }
        if (result !== 'paused' || stdinWait !== undefined) return
        socket.pause()
        stdinWait = ctx.execs.onStdinWritable(entry, () => { stdinWait = undefined; socket.resume() })
      }
    }
    // Bytes handed to ws whose write has not completed: above HIGH_WATER the reader holds the
    // exec's flow, and releases it once they fall below LOW_WATER.
    let unsent = 0
    let congested = false
    const sendCounted = (data: Buffer | string, binaryFrame: boolean, drained: () => void, channel?: Buffer): boolean => {
      const size = (typeof data === 'string' ? Buffer.byteLength(data) : data.length) + (channel?.length ?? 0)
      unsent += size
      // The channel byte and the bytes go as two fragments of one message: no per-chunk copy.
      if (channel !== undefined) socket.send(channel, { binary: true, fin: false })
      socket.send(data, { binary: binaryFrame, fin: true }, () => {
        unsent -= size
        if (congested && unsent <= LOW_WATER) { congested = false; drained() }
      })
      if (!congested && unsent > HIGH_WATER) congested = true
      return !congested
    }
    const stop = pumpEvents(entry, { stdoutOffset: req.query.stdoutOffset, stderrOffset: req.query.stderrOffset, encoding: binary ? 'binary' : req.query.encoding }, ctx.heartbeatIntervalMs, {
      send: (ev, final, _endOffset, raw, drained) => {
        if (socket.readyState !== socket.OPEN) return true
        let ok: boolean
        if (binary && raw !== undefined && (ev.type === 'stdout' || ev.type === 'stderr')) {
          ok = sendCounted(raw, true, drained, ev.type === 'stdout' ? STDOUT_BYTE : STDERR_BYTE)
        } else {
          ok = sendCounted(JSON.stringify(ev), false, drained)
        }
        // A gateway going down says so with 1001, whatever it cut off.
        if (ev.type === 'error') close(ev.code === 'shutting_down' ? CLOSE_GOING_AWAY : CLOSE_ERROR, ev.code)
        else if (final) close(CLOSE_NORMAL, 'exec ended')
        return ok
      },
      moved: () => { close(CLOSE_RECONNECT, 'the exec moved to another replica; reconnect with your offsets') }
    })
    socket.on('close', () => { stop(); stopWaiting() })
    socket.on('message', (data: RawData, isBinary: boolean) => {
      // Attached with a read token: it may watch, never type, resize or signal.
      if (req.readOnly) { if (socket.readyState === socket.OPEN) client.refuse(READ_ONLY); return }
      onClientFrame(ctx, entry, socket, client, data, isBinary)
    })
  })
}

// What a client frame may do to its socket.
interface FrameClient {
  // Closes with 1008 and the reason.
  refuse: (why: string) => void
  writeStdin: (bytes: Buffer) => void
}

// The exec each upgrade's preValidation found, for its handler.
const found = new WeakMap<object, ExecEntry>()

const NOT_INTERACTIVE = 'stdin frames need an exec created with interactive: true'
const NOT_TTY = 'resize frames need an exec created with tty: true'
const READ_ONLY = 'attached with a read token (access_token): read-only, no stdin, eof, resize or signal frames'

function onClientFrame (ctx: RouteContext, entry: ExecEntry, socket: WebSocket, client: FrameClient, data: RawData, isBinary: boolean): void {
  // ws still delivers frames that arrive while it closes: after a refusal (or the final event)
  // nothing the client sends may reach the exec any more.
  if (socket.readyState !== socket.OPEN) return
  const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data as ArrayBuffer)
  if (isBinary) {
    if (buf[0] !== STDIN_CHANNEL) { client.refuse(`binary frames from the client must start with channel byte ${STDIN_CHANNEL} (stdin)`); return }
    if (!entry.spec.interactive) { client.refuse(NOT_INTERACTIVE); return }
    client.writeStdin(buf.subarray(1))
    return
  }
  const decoded = decodeClientFrame(buf.toString('utf8'))
  if (!decoded.ok) { client.refuse(decoded.why); return }
  const frame = decoded.frame
  switch (frame.type) {
    case 'stdin':
      if (!entry.spec.interactive) { client.refuse(NOT_INTERACTIVE); return }
      client.writeStdin(Buffer.from(frame.data, 'utf8'))
      return
    case 'eof':
      ctx.execs.endStdin(entry)
      return
    case 'resize':
      if (!entry.spec.tty) { client.refuse(NOT_TTY); return }
      ctx.execs.resize(entry, frame.cols, frame.rows)
      return
    case 'signal':
      if (!entry.finished) ctx.execs.signal(entry, frame.signal)
  }
}

export default execStream
