// A real TCP proxy on 127.0.0.1:0 for fault injection between two real endpoints.
//
// Modes (global to the proxy, applied to current and future connections):
// - pass: bytes are forwarded as they arrive, with backpressure.
// - delay: every chunk (and FIN / teardown) is forwarded delayMs after it was read, in order.
// - blackhole: nothing is forwarded in either direction and nothing is closed. Both sockets are
//   paused rather than drained-and-dropped: that is what a SIGSTOPped peer looks like on the wire
//   (the kernel keeps ACKing until its buffers fill, then the window closes; no FIN, no RST), so the
//   endpoints can only notice through their own timeouts and keepalives. Nothing is lost: bytes
//   already read wait in the proxy and flow again if the mode returns to pass.
import { connect, createServer, type Server, type Socket } from 'node:net'

type TcpProxyMode = 'pass' | 'blackhole' | 'delay'

export interface TcpProxy {
  host: string
  port: number
  setMode(mode: TcpProxyMode, delayMs?: number): void
  /** RST every current connection on both sides (client and target). */
  resetAll(): void
  /** Same as setMode('blackhole'): a half-open link on current and future connections. */
  blackholeAll(): void
  /** Client connections currently open through the proxy. */
  connectionCount(): number
  /** New connections go to this target (a load balancer moving a client to another backend). */
  setTarget(host: string, port: number): void
  /** A half-open link on the connections open now only; new ones pass (a path that died). */
  blackholeCurrent(): void
  close(): Promise<void>
}

export interface StartTcpProxyOptions {
  targetHost: string
  targetPort: number
}

const HOST = '127.0.0.1'

type Item = { due: number } & ({ kind: 'data'; chunk: Buffer } | { kind: 'end' } | { kind: 'destroy' })

interface ProxyState {
  mode: TcpProxyMode
  delayMs: number
}

/** One direction of one connection: an ordered queue so mode changes never reorder bytes. */
class Direction {
  private readonly queue: Item[] = []
  private timer: NodeJS.Timeout | undefined
  private waitingDrain = false
  private disposed = false

  private readonly state: ProxyState
  private readonly src: Socket
  private readonly dst: Socket

  constructor (state: ProxyState, src: Socket, dst: Socket) {
    this.state = state
    this.src = src
    this.dst = dst
    src.on('data', (chunk: Buffer) => this.push({ kind: 'data', chunk, due: this.dueTime() }))
    src.on('end', () => this.push({ kind: 'end', due: this.dueTime() }))
    // Closing (error, RST or full close) tears down the other side too, after the bytes before it.
    src.on('close', () => this.push({ kind: 'destroy', due: this.dueTime() }))
    dst.on('drain', () => {
      this.waitingDrain = false
      this.updateFlow()
    })
  }

  private dueTime (): number {
    return Date.now() + (this.state.mode === 'delay' ? this.state.delayMs : 0)
  }

  private push (item: Item): void {
    if (this.disposed) return
    this.queue.push(item)
    this.flush()
  }

  /** Forwards every item that is due, unless blackholed; arms one timer for the next one. */
  flush (): void {
    clearTimeout(this.timer)
    this.timer = undefined
    if (this.state.mode === 'blackhole') {
      this.updateFlow()
      return
    }
    const now = Date.now()
    while (this.queue.length > 0 && this.queue[0]!.due <= now) {
      const item = this.queue.shift()!
      if (item.kind === 'data') {
        if (!this.dst.destroyed && !this.dst.write(item.chunk)) this.waitingDrain = true
      } else if (item.kind === 'end') {
        if (!this.dst.destroyed) this.dst.end()
      } else {
        this.dst.destroy()
        this.queue.length = 0
      }
    }
    if (this.queue.length > 0) {
      this.timer = setTimeout(() => this.flush(), Math.max(1, this.queue[0]!.due - now))
    }
    this.updateFlow()
  }

  updateFlow (): void {
    if (this.src.destroyed) return
    if (this.state.mode === 'blackhole' || this.waitingDrain) this.src.pause()
    else this.src.resume()
  }

  dispose (): void {
    this.disposed = true
    clearTimeout(this.timer)
    this.timer = undefined
    this.queue.length = 0
  }
}

interface Connection {
  client: Socket
  upstream: Socket
  directions: [Direction, Direction]
  // This connection's view of the mode: the proxy's, unless it was blackholed on its own.
  view: ProxyState & { own: TcpProxyMode | undefined }
}

export function startTcpProxy (opts: StartTcpProxyOptions): Promise<TcpProxy> {
  const state: ProxyState = { mode: 'pass', delayMs: 0 }
  const connections = new Set<Connection>()
  const target = { host: opts.targetHost, port: opts.targetPort }

  const server: Server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => {
    client.on('error', () => undefined)
    client.setNoDelay(true)
    const upstream = connect({ host: target.host, port: target.port, allowHalfOpen: true })
    upstream.on('error', () => undefined)
    upstream.setNoDelay(true)
    const view = {
      own: undefined as TcpProxyMode | undefined,
      get mode (): TcpProxyMode { return this.own ?? state.mode },
      set mode (m: TcpProxyMode) { state.mode = m },
      get delayMs (): number { return state.delayMs },
      set delayMs (d: number) { state.delayMs = d }
    }
    const directions: [Direction, Direction] = [new Direction(view, client, upstream), new Direction(view, upstream, client)]
    const conn: Connection = { client, upstream, directions, view }
    connections.add(conn)
    let closedSides = 0
    const onSideClosed = (): void => {
      closedSides++
      if (closedSides === 2) {
        for (const d of directions) d.dispose()
        connections.delete(conn)
      }
    }
    client.once('close', onSideClosed)
    upstream.once('close', onSideClosed)
    // Data listeners put both sockets in flowing mode; apply the current mode (blackhole pauses).
    for (const d of directions) d.updateFlow()
  })
  server.on('error', () => undefined)

  const applyMode = (): void => {
    for (const conn of connections) for (const d of conn.directions) d.flush()
  }

  return new Promise((resolve, reject) => {
    const onListenError = (err: Error): void => reject(err)
    server.once('error', onListenError)
    server.listen(0, HOST, () => {
      server.off('error', onListenError)
      const addr = server.address()
      if (addr === null || typeof addr === 'string') {
        reject(new Error('tcp proxy: unexpected listen address'))
        return
      }
      let closing: Promise<void> | undefined
      resolve({
        host: HOST,
        port: addr.port,
        setMode (mode, delayMs) {
          if (mode === 'delay' && (delayMs === undefined || !(delayMs >= 0))) {
            throw new Error('tcp proxy: delay mode needs delayMs >= 0')
          }
          state.mode = mode
          state.delayMs = mode === 'delay' ? delayMs! : 0
          applyMode()
        },
        resetAll () {
          for (const conn of connections) {
            for (const d of conn.directions) d.dispose()
            for (const sock of [conn.client, conn.upstream]) {
              try {
                sock.resetAndDestroy()
              } catch {
                // no TCP handle any more (already destroyed): nothing to reset
                sock.destroy()
              }
            }
          }
        },
        blackholeAll () {
          state.mode = 'blackhole'
          applyMode()
        },
        connectionCount () {
          return connections.size
        },
        setTarget (host, port) {
          target.host = host
          target.port = port
        },
        blackholeCurrent () {
          for (const conn of connections) {
            conn.view.own = 'blackhole'
            for (const d of conn.directions) { d.flush(); d.updateFlow() }
          }
        },
        close () {
          closing ??= new Promise<void>((resolve) => {
            server.close(() => resolve())
            for (const conn of connections) {
              for (const d of conn.directions) d.dispose()
              conn.client.destroy()
              conn.upstream.destroy()
            }
          })
          return closing
        }
      })
    })
  })
}
