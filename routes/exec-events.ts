import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { eventFormat } from '../src/http/accept.js'
import { pumpEvents } from '../src/http/event-pump.js'
import { AttachQuerySchema, ExecParamsSchema } from '../src/schemas/exec.js'
import { ExecEventSchema } from '../src/schemas/events.js'
import { ProblemResponse } from '../src/schemas/problem.js'
import { EXEC_NOT_FOUND, findExec } from './execs.js'
import type { RouteContext } from '../src/http/route-context.js'

// The exec's events for curl and SDKs: SSE when the client accepts text/event-stream, NDJSON
// otherwise. Each SSE event's id is "<stdout offset>-<stderr offset>" after it, so a
// reconnecting EventSource resumes exactly where it left off (Last-Event-ID).

const P = ProblemResponse

// The final event's id ends in FINAL_ID_SUFFIX: the offsets alone are those of the last output
// event too, and a client cut off between the two must still get the final event, while one
// that reconnects after it (an EventSource always does) is told with 204 to stop.
const FINAL_ID_SUFFIX = '-end'

function parseLastEventId (value: unknown): { stdout: number, stderr: number, final: boolean } | undefined {
  const m = /^(\d+)-(\d+)(-end)?$/.exec(String(value ?? ''))
  if (m === null) return undefined
  const stdout = Number(m[1])
  const stderr = Number(m[2])
  // Ids this gateway wrote are exact byte counts; a number past 2^53 is not one of them, and
  // resuming from it would echo "1e+23" back in the next id.
  return Number.isSafeInteger(stdout) && Number.isSafeInteger(stderr) ? { stdout, stderr, final: m[3] !== undefined } : undefined
}

const execEvents: FastifyPluginAsyncTypebox<{ ctx: RouteContext }> = async (app, { ctx }) => {
  app.get('/v1/execs/:execId/events', {
    schema: {
      operationId: 'getExecEvents',
      tags: ['execs'],
      summary: 'The exec\'s events as SSE or NDJSON; ends after the final event',
      description: 'Accept: text/event-stream gives SSE (q-values are honoured: the higher of text/event-stream and application/x-ndjson wins; event id "<stdoutOffset>-<stderrOffset>", resumable with Last-Event-ID; the final event\'s id ends in "-end", and a request whose Last-Event-ID is that id gets 204 No Content, which stops an EventSource from reconnecting); anything else gives application/x-ndjson. Each line or data field is one ExecEvent. Disconnecting detaches; it never kills the exec.',
      params: ExecParamsSchema,
      querystring: AttachQuerySchema,
      produces: ['text/event-stream', 'application/x-ndjson'],
      response: { 200: Type.Ref(ExecEventSchema, { description: 'one ExecEvent per NDJSON line or SSE event, until the final exit or error' }), 204: Type.Null({ description: 'SSE: Last-Event-ID is the final event\'s id of a finished exec; nothing more will come' }), 400: P, 401: P, 403: P, 404: EXEC_NOT_FOUND }
    }
  }, async (req, reply) => {
    const entry = await findExec(ctx, req.params.execId)
    const sse = eventFormat(req.headers.accept) === 'sse'
    const resume = sse ? parseLastEventId(req.headers['last-event-id']) : undefined
    // The client has the final event (it sent its id back): 204 is how SSE says "do not reconnect".
    if (resume?.final === true && entry.finished) return await reply.code(204).header('cache-control', 'no-store').send(null)
    const offsets = { stdout: resume?.stdout ?? req.query.stdoutOffset ?? 0, stderr: resume?.stderr ?? req.query.stderrOffset ?? 0 }
    reply.hijack()
    const res = reply.raw
    res.writeHead(200, {
      'content-type': sse ? 'text/event-stream; charset=utf-8' : 'application/x-ndjson; charset=utf-8',
      'cache-control': 'no-store',
      'x-accel-buffering': 'no'
    })
    // Node holds the head until the first body write: a silent exec would leave the client
    // without its 200 until the first output or heartbeat, and client timeouts fire on healthy execs.
    res.flushHeaders()
    res.on('error', () => stop())
    res.on('close', () => stop())
    const position = { stdout: offsets.stdout, stderr: offsets.stderr }
    // One drain listener per congestion, not per write.
    let congested = false
    const stop = pumpEvents(entry, { stdoutOffset: offsets.stdout, stderrOffset: offsets.stderr, encoding: req.query.encoding }, ctx.heartbeatIntervalMs, {
      send: (ev, final, endOffset, _raw, drained) => {
        if (res.destroyed) return true
        const line = JSON.stringify(ev)
        let ok: boolean
        if (sse) {
          if ((ev.type === 'stdout' || ev.type === 'stderr') && endOffset !== undefined) {
            position[ev.type] = endOffset
          } else if (ev.type === 'gap') {
            position[ev.stream] = Math.max(position[ev.stream], ev.to)
          }
          ok = res.write(`id: ${position.stdout}-${position.stderr}${final ? FINAL_ID_SUFFIX : ''}\nevent: ${ev.type}\ndata: ${line}\n\n`)
        } else {
          ok = res.write(line + '\n')
        }
        if (final) { res.end(); return true }
        if (!ok && !congested) {
          congested = true
          res.once('drain', () => { congested = false; drained() })
        }
        return ok
      },
      // Ended without a final event: an EventSource reconnects with Last-Event-ID by itself.
      moved: () => { res.end() }
    })
  })
}
export default execEvents
