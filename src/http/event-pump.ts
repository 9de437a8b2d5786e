import type { AttachOptions, ExecEntry } from '../execs/exec-entry.js'
import type { ExecEvent } from '../schemas/events.js'

// Feeds one reader (WebSocket, SSE, NDJSON): replay from its offsets, live output, a heartbeat
// after heartbeatMs of silence so proxies and browsers can tell a silent command from a dead
// connection, and the final event. Returns the function that detaches the reader.
export function pumpEvents (entry: ExecEntry, opts: AttachOptions, heartbeatMs: number, send: (ev: ExecEvent, final: boolean, endOffset?: number) => void): () => void {
  let timer: NodeJS.Timeout | undefined
  let stopped = false
  const arm = (): void => {
    clearTimeout(timer)
    if (stopped) return
    timer = setTimeout(() => { send({ type: 'heartbeat', time: new Date().toISOString() }, false); arm() }, heartbeatMs)
  }
  const stop = (): void => {
    stopped = true
    clearTimeout(timer)
    detach()
  }
  arm()
  const detach = entry.attach(opts, (ev, endOffset) => {
    if (stopped) return
    const final = ev.type === 'exit' || ev.type === 'error'
    if (final) { stopped = true; clearTimeout(timer) } else arm()
    send(ev, final, endOffset)
  })
  if (stopped) detach()
  return stop
}
