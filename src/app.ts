import type { AddressInfo } from 'node:net'
import type { Server as HttpServer } from 'node:http'
import type { Http2SecureServer, Http2Server } from 'node:http2'
import { X509Certificate } from 'node:crypto'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Logger } from 'pino'
import { createLogger } from './logger.js'
import type { GatewayConfig } from './config.js'
import { loadDataDir, markGatewayRun, type GatewayIdentity } from './data-dir.js'
import { Credentials, readTls, type TlsMaterial } from './credentials.js'
import { GatewayEvents } from './diagnostics.js'
import type { Encoding, ExecEntry } from './execs/exec-entry.js'
import { ExecManager } from './execs/manager.js'
import { buildPublicApp } from './http/public-app.js'
import { Metrics } from './metrics.js'
import { Refusals } from './refusals.js'
import { SessionRegistry } from './relay/sessions.js'
import { SshPool } from './relay/ssh-pool.js'
import { createSupervisorServer } from './supervisor-plane/listener.js'
import { Supervisor } from './supervisor/agent.js'
import { signSupervisorToken } from './tokens.js'
import { SUPERVISOR_GOAWAY_MS } from './lifecycle/bounds.js'
import { Lifecycle } from './lifecycle/lifecycle.js'
import { ClusterNode } from './cluster/node.js'
import { deriveReplicaSecret, verifyReplicaAuth, type ReplicaSecret } from './cluster/replica-auth.js'
import { ClusterRouting } from './cluster/routing.js'
import { drainSessions } from './cluster/drain.js'
import { clusterRateStore } from './cluster/rate-store.js'

// buildGateway(config) assembles the gateway; it never listens by itself. listen() binds both
// listeners (and starts the embedded sandbox), close() runs the one shutdown sequence
// (lifecycle/lifecycle.ts), which ends within the grace plus its named bounds.

const LOCAL_SANDBOX_ID = 'local'
// Cluster drain: the load balancer's checks see /readyz 503 within this (docs/haproxy.cfg: under
// a second) before supervisors are told to move, so that their new sessions land elsewhere.
const DRAIN_BALANCER_WAIT_MS = 1500

export interface Gateway {
  app: FastifyInstance
  supervisorServer: Http2Server | Http2SecureServer
  credentials: Credentials
  registry: SessionRegistry
  pool: SshPool
  execs: ExecManager
  refusals: Refusals
  identity: GatewayIdentity
  logger: Logger
  listen: () => Promise<{ publicUrl: string, supervisorUrl: string }>
  // SIGHUP: re-read API token file, token secrets and TLS certificates; nothing is dropped.
  reload: () => void
  close: () => Promise<void>
}

export interface BuildOptions {
  logger?: Logger
  // Tests pass an identity to skip the data dir.
  identity?: GatewayIdentity
}

export async function buildGateway (config: GatewayConfig, opts: BuildOptions = {}): Promise<Gateway> {
  const logger = opts.logger ?? createLogger(config.logLevel)
  const identity = opts.identity ?? loadDataDir(config.dataDir)
  // Unknown exec ids wait for the supervisors to report only on a restart (see ExecManager.lookup).
  const restarted = opts.identity === undefined && markGatewayRun(config.dataDir)
  const credentials = new Credentials(config, identity, logger.child({ component: 'credentials' }))
  const publicTls = config.tls === undefined ? undefined : readTls(config.tls)
  const supervisorTls = config.supervisorTls === undefined ? undefined : readTls(config.supervisorTls)
  // What the gateway's parts publish (diagnostics.ts) and metrics observe: created first, so
  // that every part is handed it.
  const events = new GatewayEvents()
  const lifecycle = new Lifecycle()
  // One per gateway: the listener, the sessions and the SSH client count and log what a sandbox
  // sent that was refused, at a rate no sandbox can raise.
  const refusals = new Refusals({ logger: logger.child({ component: 'refusals' }), events, linesPerMinute: config.sandboxLogLinesPerMinute })
  const registry = new SessionRegistry({
    sessionWaitMs: config.sessionWaitMs,
    relayOpenTimeoutMs: config.relayOpenTimeoutMs,
    maxPendingRelaysPerSandbox: config.maxPendingRelaysPerSandbox,
    logger: logger.child({ component: 'sessions' })
  })
  const pool = new SshPool({
    registry,
    privateKey: identity.privateKey,
    keepaliveIntervalMs: config.sshKeepaliveIntervalMs,
    keepaliveCountMax: config.sshKeepaliveCountMax,
    readyTimeoutMs: config.sshReadyTimeoutMs,
    pooling: config.sshPool,
    channelsPerConnection: config.sshChannelsPerConnection,
    idleCloseMs: config.sshIdleCloseMs,
    logger: logger.child({ component: 'ssh' }),
    refusals,
    // The pool is what asks for relays: it never asks for more than the registry would take.
    maxOpensPerSandbox: config.maxPendingRelaysPerSandbox,
    maxRekeysPerMinute: config.sshMaxRekeysPerMinute,
    maxRefusedChannelOpens: config.sshMaxRefusedChannelOpens,
    events
  })
  // Cluster mode: replicas authenticate each other with a key from the token secrets as they are
  // now (SIGHUP may rotate them), so every replica of the data dir agrees.
  const replicaSecret = (): ReplicaSecret => {
    const secrets = credentials.tokenSecrets
    return deriveReplicaSecret({ tokenSecret: secrets[0]!, tokenSecrets: secrets })
  }
  const cluster: ClusterNode | undefined = config.redisUrl === undefined
    ? undefined
    : new ClusterNode({
      redisUrl: config.redisUrl,
      replicaId: config.replicaId,
      registry,
      events,
      entryOf: (execId): ExecEntry | undefined => execs.get(execId),
      execTtlMs: config.execTtlS * 1000,
      retentionBytes: config.retentionBytes,
      onMoved: (sandboxId, ids) => execs.handOver(sandboxId, ids),
      keptExecs: (sandboxId) => execs.keptIn(sandboxId),
      reattachTimeoutMs: config.reattachTimeoutMs,
      secret: replicaSecret,
      logger: logger.child({ component: 'cluster' })
    })
  const execs: ExecManager = new ExecManager({
    registry,
    pool,
    logger: logger.child({ component: 'execs' }),
    events,
    retentionBytes: config.retentionBytes,
    retentionBytesPerSandbox: config.retentionBytesPerSandbox,
    retentionBytesTotal: config.retentionBytesTotal,
    execTtlS: config.execTtlS,
    closeWaitMs: config.closeWaitMs,
    maxRunningExecsPerSandbox: config.maxRunningExecsPerSandbox,
    reattachTimeoutMs: config.reattachTimeoutMs,
    handOffKeptOnClose: config.redisUrl !== undefined,
    sessionWaitMs: restarted ? config.sessionWaitMs : 0,
    ...(cluster === undefined
      ? {}
      : {
          remoteLookup: async (id: string) => await cluster.records.lookupElsewhere(id),
          forgetRemote: (id: string) => { cluster.records.forgetExec(id) },
          beforeAdopt: async (sandboxId: string) => { await cluster.readyToAdopt(sandboxId) },
          afterAdopt: async (sandboxId: string, ids: string[]) => { await cluster.afterAdopt(sandboxId, ids) },
          settled: async (ids: string[]) => await cluster.records.settled(ids)
        })
  })
  const metrics = new Metrics({
    activeExecs: () => execs.running,
    sessions: () => registry.list().filter((s) => s.session !== undefined).length,
    sandboxes: () => {
      const all = registry.list()
      const connected = all.filter((s) => s.session !== undefined).length
      return { connected, disconnected: all.length - connected }
    },
    retainedBytes: () => execs.retainedBytes
  }, events)
  const routing = cluster === undefined
    ? undefined
    : new ClusterRouting({ cluster, registry, execs, secret: replicaSecret, apiTokens: () => credentials.apiTokens, tokenSecrets: () => credentials.tokenSecrets, scheme: publicTls === undefined ? 'http' : 'https', sessionWaitMs: config.sessionWaitMs, logger: logger.child({ component: 'cluster-routing' }) })
  const routeCtx = {
    execs,
    registry,
    metrics,
    heartbeatIntervalMs: config.heartbeatIntervalMs,
    tokenSecrets: () => credentials.tokenSecrets,
    execRateLimitPerMinute: config.execRateLimitPerMinute,
    recordExec: cluster === undefined ? undefined : async (execId: string, sandboxId: string) => { await cluster.records.ownExec(execId, sandboxId) },
    sandboxMoved: cluster === undefined ? undefined : async (sandboxId: string) => { await cluster.checkSandbox(sandboxId) },
    waitElsewhere: routing === undefined ? undefined : async (execId: string, encoding: Encoding, request: FastifyRequest, reply: FastifyReply) => await routing.waitElsewhere(execId, encoding, request, reply)
  }
  const { app } = await buildPublicApp({
    logger,
    apiTokens: () => credentials.apiTokens,
    tls: publicTls,
    lifecycle,
    ctx: routeCtx,
    beforeRoutes: routing === undefined ? undefined : (a) => { routing.install(a) },
    rateLimitStore: cluster === undefined ? undefined : clusterRateStore(() => cluster.directory)
  })
  const internal = cluster === undefined
    ? undefined
    : (await buildPublicApp({
        logger: logger.child({ component: 'internal' }),
        apiTokens: () => [],
        lifecycle,
        ctx: { ...routeCtx, execRateLimitPerMinute: 0, internal: true },
        beforeRoutes: (a) => { routing?.installInternal(a) },
        replicaAuth: (request) => verifyReplicaAuth(replicaSecret(), request.headers)
      })).app
  const { server: supervisorServer, closeAll: closeSupervisorConnections, closeRevoked } = createSupervisorServer({
    registry,
    tokenSecrets: () => credentials.tokenSecrets,
    tls: supervisorTls,
    gatewayPublicKey: identity.publicKey,
    heartbeatIntervalMs: config.heartbeatIntervalMs,
    pingIntervalMs: config.h2PingIntervalMs,
    pingTimeoutMs: config.h2PingTimeoutMs,
    logger: logger.child({ component: 'supervisor-listener' }),
    refusals,
    limits: config,
    events
  })
  supervisorServer.on('error', (err) => logger.error({ err }, 'supervisor listener error'))
  let localSupervisor: Supervisor | undefined

  const listen = async (): Promise<{ publicUrl: string, supervisorUrl: string }> => {
    await new Promise<void>((resolve, reject) => {
      supervisorServer.once('error', reject)
      supervisorServer.listen(config.supervisorListen.port, config.supervisorListen.host, () => {
        supervisorServer.off('error', reject)
        resolve()
      })
    })
    const sup = supervisorServer.address() as AddressInfo
    const supervisorUrl = `${supervisorTls === undefined ? 'http' : 'https'}://${urlHost(sup.address)}:${sup.port}`
    await app.listen({ host: config.listen.host, port: config.listen.port })
    routing?.interceptUpgrades(app.server as unknown as HttpServer)
    const pub = app.server.address() as AddressInfo
    const publicUrl = `${publicTls === undefined ? 'http' : 'https'}://${urlHost(pub.address)}:${pub.port}`
    if (internal !== undefined && cluster !== undefined) {
      await internal.listen({ host: config.internalListen.host, port: config.internalListen.port })
      const int = internal.server.address() as AddressInfo
      // Before the local sandbox registers: its session is claimed like any other.
      await cluster.start({ internalUrl: config.internalUrl ?? `http://${urlHost(int.address)}:${int.port}`, publicUrl })
    }
    if (config.localSandbox) {
      localSupervisor = new Supervisor({
        gatewayUrl: supervisorUrl,
        sandboxId: LOCAL_SANDBOX_ID,
        token: signSupervisorToken(identity.tokenSecret, LOCAL_SANDBOX_ID),
        // The in-process supervisor trusts exactly the certificate this gateway serves, whoever
        // issued it and whatever names it carries.
        ...(supervisorTls === undefined ? {} : { tls: { pinnedCertSha256: certFingerprint(supervisorTls) } }),
        logger: logger.child({ component: 'local-supervisor' })
      })
      await localSupervisor.start()
      // The local sandbox is usable as soon as listen() returns.
      await registry.waitForSession(LOCAL_SANDBOX_ID)
    }
    lifecycle.markReady()
    return { publicUrl, supervisorUrl }
  }

  // The phases and their order are lifecycle.ts's; here is what each does in this gateway.
  const close = async (): Promise<void> => await lifecycle.shutdown({
    // Cluster mode: the supervisors move to other replicas first (their kept execs with them).
    draining: async () => {
      if (cluster === undefined) return
      await drainSessions({
        registry,
        logger: logger.child({ component: 'drain' }),
        balancerWaitMs: DRAIN_BALANCER_WAIT_MS,
        boundMs: config.shutdownGraceMs,
        stays: (s) => config.localSandbox && s.sandboxId === LOCAL_SANDBOX_ID
      })
    },
    execs: async () => { await execs.close(config.shutdownGraceMs) },
    relays: () => { pool.close() },
    sessions: () => { registry.close() },
    'local-supervisor': async () => { await localSupervisor?.stop() },
    cluster: async () => { await cluster?.close() },
    // app.close() runs the WebSocket plugin's preClose: 1001 within its bound (public-app.ts).
    listeners: async () => { await Promise.allSettled([routing?.close(), app.close(), internal?.close(), closeSupervisorConnections(SUPERVISOR_GOAWAY_MS)]) },
    observers: () => { refusals.close(); metrics.close() }
  }, logger)

  const reload = (): void => {
    const counts = credentials.reload()
    for (const [server, files, name] of [[app.server, config.tls, 'public'], [supervisorServer, config.supervisorTls, 'supervisor']] as const) {
      if (files === undefined) continue
      try {
        (server as unknown as { setSecureContext: (o: TlsMaterial) => void }).setSecureContext(readTls(files))
      } catch (err) {
        logger.error({ listener: name, err: (err as Error).message }, 'cannot reload the TLS certificate; keeping the previous one')
      }
    }
    const revokedSessions = closeRevoked()
    logger.info({ ...counts, revokedSessions }, 'credentials reloaded')
  }

  return { app, supervisorServer, credentials, registry, pool, execs, refusals, identity, logger, listen, reload, close }
}

function certFingerprint (tls: TlsMaterial): string {
  return new X509Certificate(tls.cert).fingerprint256
}

function urlHost (address: string): string {
  return address.includes(':') ? `[${address}]` : address
}
