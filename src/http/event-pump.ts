import type { AttachOptions, ExecEntry } from '../execs/exec-entry.js'
import type { ExecEvent } from '../schemas/events.js'

// Feeds one reader (WebSocket, SSE, NDJSON): replay from its offsets, live output, a heartbeat
// after heartbeatMs of silence so proxies and browsers can tell a silent command from a dead
// connection, and the final event. The sink says when it is congested; the pump then holds the
// exec's flow until the sink drains, so a slow reader slows the command instead of growing the
// gateway's memory. Returns the function that detaches the reader.

export interface EventSink {
  // Returns false when the sink is congested; it must then call `drained` once it is not.
  send: (ev: ExecEvent, final: boolean, endOffset: number | undefined, raw: Buffer | undefined, drained: () => void) => boolean
  // The exec moved to another replica (ExecEntry.moveAway): no final event will come here, and
  // the reader is to reconnect.
  moved: () => void
}

export function pumpEvents (entry: ExecEntry, opts: AttachOptions, heartbeatMs: number, sink: EventSink): () => void {
  let timer: NodeJS.Timeout | undefined
  let stopped = false
  const reader = {}
  const drained = (): void => { entry.releaseFlow(reader) }
  // Re-armed on every chunk: refresh() moves the one timer instead of making a new one per chunk.
  const arm = (): void => {
    if (stopped) return
    if (timer === undefined) timer = setTimeout(beat, heartbeatMs)
    else timer.refresh()
  }
  const beat = (): void => {
    if (stopped) return
    deliver({ type: 'heartbeat', time: new Date().toISOString() }, false)
    arm()
  }
  const deliver = (ev: ExecEvent, final: boolean, endOffset?: number, raw?: Buffer): void => {
    if (!sink.send(ev, final, endOffset, raw, drained) && !final) entry.holdFlow(reader)
  }
  const stop = (): void => {
    stopped = true
    clearTimeout(timer)
    entry.off('moved', onMoved)
    detach()
    entry.releaseFlow(reader)
  }
  const onMoved = (): void => {
    if (stopped) return
    stop()
    sink.moved()
  }
  entry.once('moved', onMoved)
  arm()
  const detach = entry.attach(opts, (ev, endOffset, raw) => {
    if (stopped) return
    const final = ev.type === 'exit' || ev.type === 'error'
    if (final) { stopped = true; clearTimeout(timer); entry.releaseFlow(reader) } else arm()
    deliver(ev, final, endOffset, raw)
  })
  if (stopped) detach()
  return stop
}
