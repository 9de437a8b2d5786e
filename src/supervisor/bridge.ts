import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import type { Logger } from 'pino'

// Joins the SSH daemon's TCP socket and the relay's HTTP/2 stream with backpressure both ways.
// An end on one side half-closes the other (the SSH daemon may still be sending); an error or
// reset on either side tears down both, so the gateway sees the relay die instead of hanging.
export function bridge (tcp: Socket, stream: Duplex, log: Logger): void {
  let torn = false
  const teardown = (why: string, err?: Error): void => {
    if (torn) return
    torn = true
    log.debug({ why, err: err?.message }, 'relay torn down')
    tcp.destroy()
    // The HTTP/2 stream is destroyed on the next turn, never inside an nghttp2 callback.
    setImmediate(() => stream.destroy())
  }
  tcp.pipe(stream)
  stream.pipe(tcp)
  tcp.on('error', (err) => teardown('ssh daemon socket error', err))
  stream.on('error', (err) => teardown('relay stream error', err))
  tcp.on('close', () => { if (!stream.writableEnded) teardown('ssh daemon socket closed') })
  stream.on('close', () => teardown('relay stream closed'))
}
