import { createClient, ErrorReply, RESP_TYPES } from 'redis'

// The one place that configures node-redis for the directory and turns its failures into one
// typed error. node-redis alone never gives up on a command it has written: its `timeout`
// command option only covers the wait in its write queue, so a command sent to a Redis that is
// SIGSTOPped (or behind a dead link) waits for its reply forever. Every round trip is therefore
// raced against our own timer here, and RedisLink replaces a connection that went silent.

export const DIRECTORY_UNAVAILABLE = 'directory_unavailable'

// Redis cannot be reached, or did not answer within the bound. The outcome of a write that
// failed this way is unknown: Redis may still apply it once it runs again, so every directory
// write is safe to repeat.
export class DirectoryUnavailable extends Error {
  readonly code = DIRECTORY_UNAVAILABLE

  constructor (message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'DirectoryUnavailable'
  }
}

// Replies that mean "this Redis cannot serve right now", not "the command is wrong".
const TRANSIENT_REPLIES = ['LOADING', 'BUSY', 'MASTERDOWN', 'READONLY', 'TRYAGAIN', 'CLUSTERDOWN', 'MISCONF']

function replyCode (err: ErrorReply): string {
  return err.message.split(' ', 1)[0] ?? ''
}

export function isNoScript (err: unknown): boolean {
  return err instanceof ErrorReply && replyCode(err) === 'NOSCRIPT'
}

// Redis answered with an error about the command itself (a bug here, or a wrong key type):
// that is not an outage and is passed on as it is.
function toDirectoryError (op: string, err: unknown): Error {
  if (err instanceof DirectoryUnavailable) return err
  if (err instanceof ErrorReply && !TRANSIENT_REPLIES.includes(replyCode(err))) return err
  const why = err instanceof Error ? err.message : String(err)
  return new DirectoryUnavailable(`redis ${op} failed: ${why}`, { cause: err })
}

interface DirectoryClientOptions {
  url: string
  // Bound on each round trip to Redis; also the TCP connect bound.
  commandTimeoutMs: number
  // Ceiling of the reconnect backoff.
  reconnectMaxMs: number
  onError: (err: Error) => void
  onReady: () => void
  // The watchdog gave up on a connection and dialled a new one.
  onReplaced: () => void
}

// onLifecycle: any sign that node-redis is still working on the connection (dialling, failing,
// getting ready), which RedisLink's watchdog takes as "not wedged".
function createDirectoryClient (opts: DirectoryClientOptions, socketTimeoutMs: number, onLifecycle: () => void) {
  const client = createClient({
    url: opts.url,
    // Commands issued while disconnected fail at once instead of queueing until Redis is back.
    disableOfflineQueue: true,
    // Traffic on an idle connection, so the socket timeout only trips on a silent server.
    pingInterval: Math.floor(socketTimeoutMs / 3),
    socket: {
      connectTimeout: opts.commandTimeoutMs,
      // A socket without any traffic this long is destroyed and redialled.
      socketTimeout: socketTimeoutMs,
      // Capped exponential backoff with jitter, forever: a replica outlives any Redis outage.
      reconnectStrategy: (retries: number) => {
        const base = Math.min(50 * 2 ** Math.min(retries, 16), opts.reconnectMaxMs)
        return Math.floor(base / 2 + Math.random() * base / 2)
      }
    }
  })
  // An EventEmitter 'error' without a listener throws and would crash the process.
  client.on('error', (err: unknown) => {
    onLifecycle()
    opts.onError(err instanceof Error ? err : new Error(String(err)))
  })
  client.on('ready', () => {
    onLifecycle()
    opts.onReady()
  })
  client.on('connect', onLifecycle)
  client.on('reconnecting', onLifecycle)
  return client
}

type Client = ReturnType<typeof createDirectoryClient>

function binaryOf (client: Client) {
  return client.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer })
}

// The client, and the same connection answering blob strings as Buffers.
export type RedisCall<T> = (client: Client, binary: ReturnType<typeof binaryOf>) => Promise<T>

// The directory's connection to Redis. Each call is one bounded round trip (or a few, for a
// script's NOSCRIPT retry). It also watches the client: when calls fail and node-redis has shown
// no sign of life (no reply, no connect, error or retry) for longer than the socket timeout (plus
// the reconnect ceiling while not ready), the client is replaced by a fresh one. Defence in depth
// against node-redis losing track of its socket (a false ready before 5.11, redis/node-redis#3108;
// a reconnect loop that stops silently, fixed only in 6.2, #3346), and against a stalled server
// whose socket our own writes keep from ever reaching the socket timeout.
export class RedisLink {
  readonly #opts: DirectoryClientOptions
  readonly #staleMs: number
  #client: Client
  #binary: ReturnType<typeof binaryOf>
  #lastSignAt = Date.now()
  #closed = false

  constructor (opts: DirectoryClientOptions) {
    this.#opts = opts
    this.#staleMs = Math.max(3 * opts.commandTimeoutMs, 1000)
    this.#client = this.#create()
    this.#binary = binaryOf(this.#client)
  }

  get ready (): boolean {
    return this.#client.isReady
  }

  // Connects in the background; node-redis retries by itself until it succeeds.
  connect (): void {
    this.#connect(this.#client)
  }

  async run<T> (op: string, fn: RedisCall<T>): Promise<T> {
    if (this.#closed) throw new DirectoryUnavailable('the directory is closed')
    const client = this.#client
    const binary = this.#binary
    try {
      const value = await bounded(op, this.#opts.commandTimeoutMs, () => fn(client, binary))
      this.#lastSignAt = Date.now()
      return value
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) this.#lastSignAt = Date.now()
      else if (client === this.#client && !this.#closed && this.#wedged(client)) this.#replace()
      throw err
    }
  }

  // Drops the connection at once: not client.close(), which waits for every pending reply,
  // forever if Redis is stopped.
  destroy (): void {
    this.#closed = true
    destroyQuietly(this.#client)
  }

  #wedged (client: Client): boolean {
    const quietMs = Date.now() - this.#lastSignAt
    return quietMs > this.#staleMs + (client.isReady ? 0 : this.#opts.reconnectMaxMs)
  }

  #create (): Client {
    const client: Client = createDirectoryClient(this.#opts, this.#staleMs, () => {
      if (client === this.#client) this.#lastSignAt = Date.now()
    })
    return client
  }

  #replace (): void {
    destroyQuietly(this.#client)
    this.#client = this.#create()
    this.#binary = binaryOf(this.#client)
    this.#lastSignAt = Date.now()
    this.#connect(this.#client)
    this.#opts.onReplaced()
  }

  #connect (client: Client): void {
    client.connect().catch((err: unknown) => {
      if (!this.#closed && client === this.#client) this.#opts.onError(err instanceof Error ? err : new Error(String(err)))
    })
  }
}

function destroyQuietly (client: Client): void {
  try {
    client.destroy()
  } catch {
    // Never connected, or already closed.
  }
}

// One Redis round trip, raced against the bound. The losing promise keeps a no-op catch: the
// reply (or the flush error) of a command given up on arrives later and must not be unhandled.
async function bounded<T> (op: string, timeoutMs: number, run: () => Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  let pending: Promise<T>
  try {
    pending = run()
  } catch (err) {
    throw toDirectoryError(op, err)
  }
  pending.catch(() => {})
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => { reject(new DirectoryUnavailable(`redis ${op} did not answer within ${timeoutMs} ms`)) }, timeoutMs)
  })
  try {
    return await Promise.race([pending, timeout])
  } catch (err) {
    throw toDirectoryError(op, err)
  } finally {
    clearTimeout(timer)
  }
}
