import { randomUUID } from 'node:crypto'
import type { Duplex } from 'node:stream'
import type { Logger } from 'pino'
import { GatewayError } from '../errors.js'
import { REASON_MAX_CHARS, type GatewayMessage } from '../supervisor-plane/messages.js'

// Registry of supervisor sessions, one per sandbox, and of relays waiting for a supervisor to
// open them. It knows nothing of HTTP: the supervisor listener hands it sessions and relay
// streams, and exec runners ask it for relays.

export interface SupervisorSession {
  readonly id: string
  readonly sandboxId: string
  // The supervisor process behind the session (it may reconnect under new sessions).
  readonly instanceId?: string | undefined
  readonly connectedAt: Date
  send: (msg: GatewayMessage) => boolean
  close: (reason: string) => void
}

export interface SandboxEntry {
  id: string
  session: SupervisorSession | undefined
  connectedAt: Date | undefined
  lastSeenAt: Date | undefined
  sshHostKey: string | undefined
  sshUser: string | undefined
  // The current session's hello said its daemon keeps execs (the keeper protocol).
  keepsExecs: boolean
}

export interface RegisterInfo {
  sshHostKey?: string | undefined
  sshUser?: string | undefined
  keepsExecs?: boolean | undefined
}

type RegisteredListener = (sandboxId: string, info: { keepsExecs: boolean }) => void
type UnregisteredListener = (session: SupervisorSession) => void

interface PendingRelay {
  relayId: string
  sandboxId: string
  timer: NodeJS.Timeout
  resolve: (stream: Duplex) => void
  reject: (err: GatewayError) => void
}

export interface SessionRegistryOptions {
  sessionWaitMs: number
  relayOpenTimeoutMs: number
  maxPendingRelaysPerSandbox: number
  logger: Logger
}

type Waiter = () => void

export class SessionRegistry {
  readonly #opts: SessionRegistryOptions
  readonly #sandboxes = new Map<string, SandboxEntry>()
  readonly #pending = new Map<string, PendingRelay>()
  readonly #waiters = new Map<string, Set<Waiter>>()
  // Per sandbox, supervisor processes that a newer one replaced.
  readonly #superseded = new Map<string, Set<string>>()
  readonly #registeredListeners = new Set<RegisteredListener>()
  readonly #unregisteredListeners = new Set<UnregisteredListener>()
  #closed = false
  #accepting = true

  constructor (opts: SessionRegistryOptions) {
    this.#opts = opts
  }

  list (): SandboxEntry[] {
    return [...this.#sandboxes.values()].sort((a, b) => a.id.localeCompare(b.id))
  }

  get (sandboxId: string): SandboxEntry | undefined {
    return this.#sandboxes.get(sandboxId)
  }

  pendingCount (sandboxId?: string): number {
    if (sandboxId === undefined) return this.#pending.size
    let n = 0
    for (const p of this.#pending.values()) if (p.sandboxId === sandboxId) n++
    return n
  }

  // A process that was superseded may not take its sandbox back while the process that replaced
  // it is connected: two live supervisors would otherwise hand the sandbox back and forth, and
  // every handover kills the loser's execs.
  mayRegister (sandboxId: string, instanceId: string | undefined): boolean {
    if (instanceId === undefined) return true
    const current = this.#sandboxes.get(sandboxId)?.session
    if (current === undefined || current.instanceId === instanceId) return true
    return this.#superseded.get(sandboxId)?.has(instanceId) !== true
  }

  // A newer session for the same sandbox wins: the old one is told and closed, and relays that
  // were waiting are offered again on the new one.
  register (session: SupervisorSession, info: RegisterInfo = {}): void {
    const entry = this.#entry(session.sandboxId)
    const old = entry.session
    entry.session = session
    entry.connectedAt = session.connectedAt
    entry.lastSeenAt = new Date()
    entry.sshHostKey = info.sshHostKey
    entry.sshUser = info.sshUser
    entry.keepsExecs = info.keepsExecs === true
    const replaced = this.#superseded.get(session.sandboxId) ?? new Set<string>()
    if (session.instanceId !== undefined) replaced.delete(session.instanceId)
    if (old !== undefined && old.instanceId !== undefined && old.instanceId !== session.instanceId) {
      replaced.add(old.instanceId)
      // Remember a few: enough for restarts, never a growing set.
      if (replaced.size > 16) replaced.delete(replaced.values().next().value!)
    }
    this.#superseded.set(session.sandboxId, replaced)
    if (old !== undefined && old !== session) {
      // Debug: the old session logs its own close, at a rate the sandbox cannot raise.
      this.#opts.logger.debug({ sandboxId: session.sandboxId, old: old.id, new: session.id }, 'supervisor session superseded')
      old.send({ type: 'superseded' })
      old.close('superseded by a newer session')
    }
    for (const p of this.#pending.values()) {
      if (p.sandboxId === session.sandboxId) session.send({ type: 'relay', relayId: p.relayId })
    }
    const waiters = this.#waiters.get(session.sandboxId)
    if (waiters !== undefined) for (const w of [...waiters]) w()
    const keepsExecs = entry.keepsExecs
    for (const cb of [...this.#registeredListeners]) {
      try {
        cb(session.sandboxId, { keepsExecs })
      } catch (err) {
        this.#opts.logger.error({ err, sandboxId: session.sandboxId }, 'a registration listener threw')
      }
    }
  }

  // Whether the sandbox's current session said its daemon keeps execs; false without a session
  // (nothing can be asked of it then anyway).
  keepsExecs (sandboxId: string): boolean {
    const entry = this.#sandboxes.get(sandboxId)
    return entry?.session !== undefined && entry.keepsExecs
  }

  // Called after each registration (a restarted gateway learns the kept execs from it); returns
  // the function that removes the listener.
  onRegistered (cb: RegisteredListener): () => void {
    this.#registeredListeners.add(cb)
    return () => { this.#registeredListeners.delete(cb) }
  }

  // Draining (cluster mode): new sessions are refused, so that supervisors told to move land on
  // another replica; the sessions already here go on.
  stopAccepting (): void { this.#accepting = false }
  acceptingSessions (): boolean { return this.#accepting }

  // The current sessions (to tell each to move).
  sessions (): SupervisorSession[] {
    const out: SupervisorSession[] = []
    for (const e of this.#sandboxes.values()) if (e.session !== undefined) out.push(e.session)
    return out
  }

  // Called when a sandbox's current session goes and none replaces it (the cluster gives up
  // the sandbox's owner record then); returns the function that removes the listener.
  onUnregistered (cb: UnregisteredListener): () => void {
    this.#unregisteredListeners.add(cb)
    return () => { this.#unregisteredListeners.delete(cb) }
  }

  // Only the current session may remove itself; a superseded one leaves the new one alone.
  unregister (session: SupervisorSession): void {
    const entry = this.#sandboxes.get(session.sandboxId)
    if (entry?.session !== session) return
    entry.session = undefined
    entry.lastSeenAt = new Date()
    for (const cb of [...this.#unregisteredListeners]) {
      try {
        cb(session)
      } catch (err) {
        this.#opts.logger.error({ err, sandboxId: session.sandboxId }, 'an unregistration listener threw')
      }
    }
  }

  touch (sandboxId: string): void {
    const entry = this.#sandboxes.get(sandboxId)
    if (entry !== undefined) entry.lastSeenAt = new Date()
  }

  // The one check of --max-pending-relays-per-sandbox. It guards the supervisor, which opens a
  // stream for every relay asked of it. The pool, the only asker, never opens more connections
  // of a sandbox at once than the cap (its callers queue instead), so this refuses only a bug or
  // a relay asked for outside the pool.
  #assertRelayRoom (sandboxId: string): void {
    const max = this.#opts.maxPendingRelaysPerSandbox
    if (this.pendingCount(sandboxId) >= max) {
      throw new GatewayError('too_many_requests', `sandbox ${sandboxId} already has ${max} relays waiting to be opened`)
    }
  }

  async waitForSession (sandboxId: string, signal?: AbortSignal): Promise<SupervisorSession> {
    const current = this.#sandboxes.get(sandboxId)?.session
    if (current !== undefined) return current
    const waitMs = this.#opts.sessionWaitMs
    return await new Promise<SupervisorSession>((resolve, reject) => {
      let set = this.#waiters.get(sandboxId)
      if (set === undefined) { set = new Set(); this.#waiters.set(sandboxId, set) }
      const waiters = set
      const cleanup = (): void => {
        clearTimeout(timer)
        waiters.delete(onSession)
        if (waiters.size === 0) this.#waiters.delete(sandboxId)
        signal?.removeEventListener('abort', onAbort)
      }
      const onSession = (): void => {
        const s = this.#sandboxes.get(sandboxId)?.session
        if (s === undefined) return
        cleanup()
        resolve(s)
      }
      const onAbort = (): void => { cleanup(); reject(abortError(signal)) }
      const timer = setTimeout(() => {
        cleanup()
        reject(new GatewayError('sandbox_unavailable', `no supervisor session for sandbox ${sandboxId} within ${waitMs} ms`))
      }, waitMs)
      waiters.add(onSession)
      signal?.addEventListener('abort', onAbort, { once: true })
    })
  }

  // Waits for a session (bounded), then asks the supervisor for a relay stream (bounded).
  async openRelay (sandboxId: string, signal?: AbortSignal): Promise<Duplex> {
    if (this.#closed) throw new GatewayError('shutting_down', 'the gateway is shutting down')
    const session = await this.waitForSession(sandboxId, signal)
    this.#assertRelayRoom(sandboxId)
    const relayId = randomUUID()
    const timeoutMs = this.#opts.relayOpenTimeoutMs
    return await new Promise<Duplex>((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer)
        this.#pending.delete(relayId)
        signal?.removeEventListener('abort', onAbort)
      }
      const onAbort = (): void => { done(); reject(abortError(signal)) }
      const timer = setTimeout(() => {
        done()
        // The supervisor that was asked went away and none came back: the sandbox is what is
        // unavailable, not a supervisor that is slow to open its stream.
        if (this.#sandboxes.get(sandboxId)?.session === undefined) {
          reject(new GatewayError('sandbox_unavailable', `the supervisor of sandbox ${sandboxId} went away before it opened relay ${relayId}, and none was back within ${timeoutMs} ms`))
          return
        }
        reject(new GatewayError('relay_open_timeout', `the supervisor of sandbox ${sandboxId} did not open relay ${relayId} within ${timeoutMs} ms`))
      }, timeoutMs)
      this.#pending.set(relayId, {
        relayId,
        sandboxId,
        timer,
        resolve: (stream) => { done(); resolve(stream) },
        reject: (err) => { done(); reject(err) }
      })
      signal?.addEventListener('abort', onAbort, { once: true })
      // If the session is gone the relay stays pending: a reconnecting supervisor gets it again.
      session.send({ type: 'relay', relayId })
    })
  }

  // A relay stream arrived. False when nobody waits for it (expired, unknown, or another
  // sandbox's): the caller refuses the stream.
  claimRelay (relayId: string, sandboxId: string, stream: Duplex): boolean {
    const p = this.#pending.get(relayId)
    if (p === undefined || p.sandboxId !== sandboxId) return false
    p.resolve(stream)
    return true
  }

  // The reason is the sandbox's text: it becomes the exec's error detail, so it is bounded here
  // whatever the caller checked.
  failRelay (relayId: string, sandboxId: string, reason: string): void {
    const p = this.#pending.get(relayId)
    if (p === undefined || p.sandboxId !== sandboxId) return
    const said = reason.length > REASON_MAX_CHARS ? `${reason.slice(0, REASON_MAX_CHARS)}…` : reason
    p.reject(new GatewayError('relay_unavailable', `the supervisor of sandbox ${sandboxId} could not open the relay: ${said}`))
  }

  close (): void {
    this.#closed = true
    for (const p of [...this.#pending.values()]) p.reject(new GatewayError('shutting_down', 'the gateway is shutting down'))
    for (const entry of this.#sandboxes.values()) entry.session?.close('gateway shutting down')
  }

  #entry (sandboxId: string): SandboxEntry {
    let entry = this.#sandboxes.get(sandboxId)
    if (entry === undefined) {
      entry = { id: sandboxId, session: undefined, connectedAt: undefined, lastSeenAt: undefined, sshHostKey: undefined, sshUser: undefined, keepsExecs: false }
      this.#sandboxes.set(sandboxId, entry)
    }
    return entry
  }
}

function abortError (signal: AbortSignal | undefined): GatewayError {
  const reason: unknown = signal?.reason
  return GatewayError.is(reason) ? reason : new GatewayError('shutting_down', 'the exec was cancelled')
}
