import { once } from 'node:events'
import type { Server as HttpServer } from 'node:http'
import { setTimeout as sleep } from 'node:timers/promises'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Logger } from 'pino'
import { problem } from '../errors.js'
import type { ExecManager } from '../execs/manager.js'
import { sendProblem } from '../http/errors-plugin.js'
import { sendWaitResult } from '../http/wait-result.js'
import { upgradeAllowed } from '../http/guard.js'
import type { SessionRegistry } from '../relay/sessions.js'
import { EXEC_MOVED_HEADER, isForwarded, NOT_OWNER_HEADER } from './forward-headers.js'
import { forwardHttp } from './forward-http.js'
import { interceptUpgrades, type UpgradeInterception } from './forward-ws.js'
import type { ClusterNode } from './node.js'
import { DirectoryUnavailable } from './redis-client.js'
import { replicaAuthHeader, type ReplicaSecret } from './replica-auth.js'

// Cluster mode's public routing: a request for a sandbox or an exec that another replica holds
// goes to that replica's internal listener and its answer streams back (WebSocket attaches are
// bridged frame for frame); lists ask every live replica. Everything this replica holds, and
// everything nobody holds (a sandbox never seen, a finished exec kept in the directory), is
// answered here by the routes as in a single gateway.

export interface ClusterRoutingOptions {
  cluster: ClusterNode
  registry: SessionRegistry
  execs: ExecManager
  secret: () => ReplicaSecret
  apiTokens: () => readonly string[]
  // Exec read tokens are keyed from them (src/http/read-token.ts).
  tokenSecrets: () => readonly Buffer[]
  scheme: 'http' | 'https'
  // --session-wait-ms: how long a new exec waits for a known sandbox that nobody holds.
  sessionWaitMs: number
  logger: Logger
}

const SANDBOX_ROUTES = new Set(['/v1/sandboxes/:sandboxId', '/v1/sandboxes/:sandboxId/execs', '/v1/sandboxes/:sandboxId/execs/run'])
// The POSTs that start an exec: createExec, and runExec, which is createExec with ?wait=true.
const START_ROUTES = new Set(['/v1/sandboxes/:sandboxId/execs', '/v1/sandboxes/:sandboxId/execs/run'])
const startsExec = (request: FastifyRequest): boolean => request.method === 'POST' && START_ROUTES.has(request.routeOptions.url ?? '')
const EXEC_ROUTES = new Set(['/v1/execs/:execId', '/v1/execs/:execId/signal', '/v1/execs/:execId/events', '/v1/execs/:execId/read-token'])
const STREAM_PATH = /^\/v1\/execs\/([^/?#]+)\/stream(?:[?#]|$)/
// A replica that does not answer a list in this long is left out of it (and the answer says so).
const GATHER_TIMEOUT_MS = 3000
// How long a ?wait=true whose exec moved looks for the replica that has it now (that replica
// rebuilds it once the supervisor's new session is in: its backoff plus a list).
const MOVED_LOOKUP_MS = 30_000
const MOVED_RETRY_MS = 200
const OWNER_POLL_MS = 100
// A new exec forwarded to an owner that had just lost the sandbox is sent to the next owner;
// more moves than this during one request mean the sandbox is flapping.
const MOVED_FORWARDS = 3

class SandboxUnavailable extends Error {}

export class ClusterRouting {
  readonly #o: ClusterRoutingOptions
  #upgrades: UpgradeInterception | undefined
  // The ?wait=true answers this replica is fetching from another one (waitElsewhere).
  readonly #waits = new Set<() => void>()

  constructor (o: ClusterRoutingOptions) {
    this.#o = o
  }

  // On the public app, before its routes are ready: the forwarding hook.
  install (app: FastifyInstance): void {
    // preHandler: the guard and the route's own rate limit have run, the body is parsed and
    // valid, so a forwarded request was admitted exactly as a local one is.
    app.addHook('preHandler', async (request, reply) => {
      if (request.method === 'GET' && (request.routeOptions.url === '/v1/sandboxes' || request.routeOptions.url === '/v1/execs')) {
        return await this.#gather(request, reply)
      }
      for (let attempt = 1; ; attempt++) {
        let target: string | undefined
        try {
          target = await this.#targetFor(request)
        } catch (err) {
          if (err instanceof SandboxUnavailable) return sendProblem(reply, problem('sandbox_unavailable', err.message))
          if (!(err instanceof DirectoryUnavailable)) throw err
          return sendProblem(reply, problem('directory_unavailable', `this replica does not hold it, and the cluster directory does not answer to say who does: ${err.message}`))
        }
        if (target === undefined) return
        let movedExec: string | undefined
        const outcome = await forwardHttp(request, reply, { ...this.#forward(target), onExecMoved: (id) => { movedExec = id } })
        if (outcome === 'exec-moved' && movedExec !== undefined) {
          const encoding = (request.query as { encoding?: string }).encoding === 'base64' ? 'base64' : 'utf8'
          return await this.waitElsewhere(movedExec, encoding, request, reply)
        }
        if (outcome !== 'moved') return reply
        // The owner it went to had lost the sandbox on the way and created nothing: ask again.
        if (attempt >= MOVED_FORWARDS) {
          return sendProblem(reply, problem('replica_unavailable', `the sandbox changed replicas ${attempt} times while this request was forwarded; nothing was created: retry`))
        }
      }
    })
  }

  // On the internal app: a new exec forwarded here for a sandbox that has moved on since (a
  // session here that lingers after its supervisor went elsewhere, or none at all while the
  // directory names a live owner) is refused with NOT_OWNER_HEADER, so the forwarding replica
  // asks again instead of this one starting it on a dead session.
  installInternal (app: FastifyInstance): void {
    app.addHook('preHandler', async (request, reply) => {
      if (!startsExec(request)) return
      const id = (request.params as Record<string, string | undefined>).sandboxId
      if (id === undefined) return
      let elsewhere: string
      if (this.#o.registry.get(id)?.session !== undefined) {
        const taken = await this.#o.cluster.takenElsewhere(id)
        if (taken === undefined) return
        elsewhere = taken.owner?.replicaId ?? 'another replica'
      } else {
        const owner = await this.#o.cluster.sandboxOwner(id).catch(() => undefined)
        if (owner === undefined) return
        elsewhere = owner.replicaId
      }
      reply.header(NOT_OWNER_HEADER, elsewhere)
      return sendProblem(reply, problem('replica_unavailable', `sandbox ${id} is held by ${elsewhere} now; this replica created nothing`))
    })
  }

  // Once the public app listens (its WebSocket plugin has taken the upgrade event by then).
  interceptUpgrades (server: HttpServer): void {
    this.#upgrades = interceptUpgrades(server, async (req) => {
      const m = STREAM_PATH.exec(req.url ?? '')
      if (m === null) return undefined
      let execId: string
      try { execId = decodeURIComponent(m[1]!) } catch { return undefined }
      // Only what this replica's guard would admit is forwarded; the rest is refused by it.
      if (!upgradeAllowed(req, execId, { apiTokens: this.#o.apiTokens, tokenSecrets: this.#o.tokenSecrets, scheme: this.#o.scheme })) return undefined
      const target = await this.#execTarget(execId).catch(() => undefined)
      return target === undefined ? undefined : this.#forward(target)
    }, { unavailable: (detail) => problem('replica_unavailable', detail) })
  }

  // A ?wait=true on this replica whose exec moved with its sandbox: the answer comes from the
  // replica that holds the exec now (and again from the next, should it move on).
  async waitElsewhere (execId: string, encoding: string, request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
    // Forwarded here: the replica in front of the client waits instead (this one may be
    // draining, and its exit would cut the answer off).
    if (isForwarded(request.headers)) {
      reply.header(EXEC_MOVED_HEADER, execId)
      return await sendProblem(reply, { ...problem('replica_unavailable', `exec ${execId} moved on to another replica with its sandbox; the replica that forwarded this request waits for it there`), execId })
    }
    const gone = new AbortController()
    const onClose = (): void => { if (!reply.raw.writableFinished) gone.abort() }
    reply.raw.on('close', onClose)
    // This replica shutting down ends the wait with the exec's id (close()), not a cut.
    const shutdown = new AbortController()
    const stopWaiting = (): void => { shutdown.abort(); gone.abort() }
    this.#waits.add(stopWaiting)
    try {
      const deadline = performance.now() + MOVED_LOOKUP_MS
      let last = 'no replica has taken it yet'
      while (performance.now() < deadline && !gone.signal.aborted) {
        // It moved here (this replica forwarded the wait to the one it left).
        const local = this.#o.execs.held(execId)
        if (local !== undefined && !local.movedAway) {
          await Promise.race([this.#o.execs.waitForEnd(local), once(gone.signal, 'abort')])
          if (local.finished) return await sendWaitResult(local, encoding === 'base64' ? 'base64' : 'utf8', reply)
          continue
        }
        const owner = await this.#o.cluster.records.execOwner(execId).catch((err: Error) => { last = err.message; return undefined })
        if (owner !== undefined) {
          let res: Response
          try {
            res = await fetch(new URL(`/internal/v1/execs/${encodeURIComponent(execId)}/result?encoding=${encoding}`, owner.replica.internalUrl), {
              headers: replicaAuthHeader(this.#o.secret()),
              signal: gone.signal
            })
          } catch (err) {
            last = `replica ${owner.replicaId} did not answer: ${(err as Error).message}`
            await sleep(MOVED_RETRY_MS)
            continue
          }
          const body = await res.json().catch(() => undefined) as Record<string, unknown> | undefined
          // Cut off on the way (that replica went, or this wait was stopped): look again.
          if (body === undefined) {
            last = `replica ${owner.replicaId} broke off its answer`
            await sleep(MOVED_RETRY_MS, undefined, { signal: gone.signal }).catch(() => {})
            continue
          }
          // It moved on again, or is moving: follow it once the directory says where.
          if (res.status === 503 && body.code === 'replica_unavailable') {
            last = String(body.detail)
            if (await this.#finishedAnswer(execId, encoding, reply)) return reply
            await sleep(MOVED_RETRY_MS, undefined, { signal: gone.signal }).catch(() => {})
            continue
          }
          reply.header('location', `/v1/execs/${execId}`)
          if (res.status !== 200) reply.type('application/problem+json')
          return await reply.code(res.status).send(body)
        }
        if (await this.#finishedAnswer(execId, encoding, reply)) return reply
        await sleep(MOVED_RETRY_MS, undefined, { signal: gone.signal }).catch(() => {})
      }
      if (shutdown.signal.aborted && !reply.raw.destroyed) {
        return await sendProblem(reply, { ...problem('replica_unavailable', `exec ${execId} moved to another replica with its sandbox, and this replica is shutting down; the exec goes on there: GET /v1/execs/${execId} for its outcome`), execId })
      }
      return await sendProblem(reply, { ...problem('replica_unavailable', `exec ${execId} moved to another replica with its sandbox, and no replica reported it within ${MOVED_LOOKUP_MS} ms (${last}); GET /v1/execs/${execId} for its outcome`), execId })
    } finally {
      this.#waits.delete(stopWaiting)
      reply.raw.off('close', onClose)
    }
  }

  // Attaches bridged through this replica are let go with 1012: the exec goes on elsewhere, and
  // the client reconnects through any other replica.
  async close (): Promise<void> {
    for (const stop of [...this.#waits]) stop()
    await this.#upgrades?.closeAll(1012)
    this.#upgrades?.uninstall()
  }

  // An exec that ended after its last replica let go of it (or whose replica wrote its outcome
  // and went): the directory's record answers. Only when no replica holds it, since a holder's
  // answer has all it retains, the record only a capped tail.
  async #finishedAnswer (execId: string, encoding: string, reply: FastifyReply): Promise<boolean> {
    const finished = await this.#o.cluster.records.finishedExec(execId)
    if (finished === undefined) return false
    await sendWaitResult(finished, encoding === 'base64' ? 'base64' : 'utf8', reply)
    return true
  }

  #forward (targetBaseUrl: string): { replicaId: string, secret: ReplicaSecret, targetBaseUrl: string, unavailable: (detail: string) => ReturnType<typeof problem> } {
    return { replicaId: this.#o.cluster.replicaId, secret: this.#o.secret(), targetBaseUrl, unavailable: (detail) => problem('replica_unavailable', detail) }
  }

  async #targetFor (request: FastifyRequest): Promise<string | undefined> {
    const route = request.routeOptions.url ?? ''
    const params = request.params as Record<string, string | undefined>
    if (SANDBOX_ROUTES.has(route) && params.sandboxId !== undefined) {
      const id = params.sandboxId
      if (this.#o.registry.get(id)?.session !== undefined) {
        if (!startsExec(request)) return undefined
        const taken = await this.#o.cluster.takenElsewhere(id)
        if (taken === undefined) return undefined
        if (taken.owner !== undefined) return taken.owner.internalUrl
        return await this.#awaitOwner(id)
      }
      const owner = (await this.#o.cluster.sandboxOwner(id))?.internalUrl
      if (owner !== undefined || request.method !== 'POST') return owner
      return await this.#awaitOwner(id)
    }
    if (EXEC_ROUTES.has(route) && params.execId !== undefined) return await this.#execTarget(params.execId)
    return undefined
  }

  // A sandbox the cluster knows but nobody holds right now (its supervisor is between sessions,
  // perhaps moving): as a single gateway does for a disconnected sandbox, a new exec waits up to
  // --session-wait-ms for it, wherever its session comes back. Undefined: it is (or stays) here.
  async #awaitOwner (sandboxId: string): Promise<string | undefined> {
    const cluster = this.#o.cluster
    if (!await cluster.directory.knowsSandbox(sandboxId)) return undefined
    const deadline = performance.now() + this.#o.sessionWaitMs
    while (performance.now() < deadline) {
      await sleep(OWNER_POLL_MS)
      if (this.#o.registry.get(sandboxId)?.session !== undefined) return undefined
      const owner = await cluster.sandboxOwner(sandboxId)
      if (owner !== undefined) return owner.internalUrl
    }
    throw new SandboxUnavailable(`no supervisor of sandbox ${sandboxId} connected to any replica within ${this.#o.sessionWaitMs} ms`)
  }

  async #execTarget (execId: string): Promise<string | undefined> {
    if (this.#o.execs.held(execId) !== undefined) return undefined
    return (await this.#o.cluster.records.execOwner(execId))?.replica.internalUrl
  }

  // Every live replica's own list (its internal listener answers with what it holds), merged.
  async #gather (request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
    const route = request.routeOptions.url
    const key = route === '/v1/sandboxes' ? 'sandboxes' : 'execs'
    let replicas
    try {
      replicas = await this.#o.cluster.directory.replicas()
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) throw err
      return await sendProblem(reply, problem('directory_unavailable', `the cluster directory does not answer, so the cluster's ${key} cannot be listed: ${err.message}`))
    }
    const query = request.url.includes('?') ? request.url.slice(request.url.indexOf('?')) : ''
    const headers = replicaAuthHeader(this.#o.secret())
    const missing: string[] = []
    const lists = await Promise.all(replicas.map(async (r) => {
      try {
        const res = await fetch(new URL(`${route}${query}`, r.internalUrl), { headers, signal: AbortSignal.timeout(GATHER_TIMEOUT_MS) })
        if (res.status !== 200) throw new Error(`HTTP ${res.status}`)
        const body = await res.json() as Record<string, unknown>
        return Array.isArray(body[key]) ? body[key] as Array<Record<string, unknown>> : []
      } catch (err) {
        this.#o.logger.warn({ replicaId: r.replicaId, err: (err as Error).message }, `replica left out of the cluster's ${key}`)
        missing.push(r.replicaId)
        return []
      }
    }))
    if (missing.length > 0) reply.header('x-exec-gateway-partial', missing.join(','))
    // After the live lists, so that a rebuilt exec shows as its new replica has it.
    const orphans = key === 'execs' ? await this.#o.cluster.records.limboRecords(request.query as { sandboxId?: string, status?: string }).catch(() => []) : []
    const merged = key === 'sandboxes' ? mergeSandboxes(lists.flat()) : mergeExecs([...lists.flat(), ...orphans])
    return await reply.send({ [key]: merged })
  }
}

// A sandbox that moved shows on its old replica too (disconnected): the connected one wins,
// else the one seen last.
function mergeSandboxes (all: Array<Record<string, unknown>>): Array<Record<string, unknown>> {
  const byId = new Map<string, Record<string, unknown>>()
  for (const s of all) {
    const id = String(s.id)
    const had = byId.get(id)
    if (had === undefined || better(s, had)) byId.set(id, s)
  }
  return [...byId.values()].sort((a, b) => String(a.id).localeCompare(String(b.id)))
}

function better (s: Record<string, unknown>, than: Record<string, unknown>): boolean {
  if ((s.status === 'connected') !== (than.status === 'connected')) return s.status === 'connected'
  return String(s.lastSeenAt ?? '') > String(than.lastSeenAt ?? '')
}

// An exec shows once: where it is finished, if one replica has its end already.
function mergeExecs (all: Array<Record<string, unknown>>): Array<Record<string, unknown>> {
  const byId = new Map<string, Record<string, unknown>>()
  for (const e of all) {
    const id = String(e.id)
    const had = byId.get(id)
    if (had === undefined || (had.endedAt === null && e.endedAt !== null)) byId.set(id, e)
  }
  return [...byId.values()].sort((a, b) => String(a.createdAt).localeCompare(String(b.createdAt)) || String(a.id).localeCompare(String(b.id)))
}
