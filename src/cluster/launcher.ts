import { spawnSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { ConfigError, parseFlags, type FlagSpec, type ParsedFlags } from '../config.js'
import { loadDataDir } from '../data-dir.js'
import { SHUTDOWN_SLACK_MS, SUPERVISOR_STOP_MS } from '../lifecycle/bounds.js'
import { signSupervisorToken } from '../tokens.js'
import { renderHaproxyConfig } from './haproxy-config.js'
import { ensureClusterBinaries, type ClusterBinaries } from './launcher-binaries.js'
import { describeExit, LaunchedChild } from './launcher-child.js'
import { checkPorts, claimRunDir } from './launcher-preflight.js'
import { freePort, getJson, haproxyServerStatus, redisPing, sleep } from './launcher-probes.js'

// `exec-gateway cluster` (npm run cluster): a whole local cluster for a newcomer, on loopback.
// redis-server, N `serve` replicas sharing one data dir, haproxy in front (renderHaproxyConfig)
// and one supervisor with the embedded daemon (sandbox "local") dialling haproxy. One JSON line
// on stdout once everything is ready; SIGINT/SIGTERM stops it all (exit 0); a child that dies on
// its own stops the rest (exit 1, naming it). Its own words go to stderr, children's to log files.

export const clusterFlags = [
  { name: 'data-dir', key: 'dataDir', kind: 'string', default: './.exec-gateway-cluster', help: 'data dir all replicas share (token secret, SSH key); logs/ and run/ go inside it' },
  { name: 'replicas', key: 'replicas', kind: 'int', default: 3, min: 1, max: 16, help: 'how many `serve` replicas' },
  { name: 'public-port', key: 'publicPort', kind: 'int', default: 8080, min: 0, max: 65535, help: "haproxy's public frontend (clients); 0 = a free port" },
  { name: 'supervisor-port', key: 'supervisorPort', kind: 'int', default: 8081, min: 0, max: 65535, help: "haproxy's supervisor frontend (supervisors' --gateway); 0 = a free port" },
  { name: 'replica-public-port', key: 'replicaPublicPort', kind: 'int', default: 18080, min: 0, max: 65535, help: "first replica's --listen port, the next ones count up; 0 = free ports" },
  { name: 'replica-supervisor-port', key: 'replicaSupervisorPort', kind: 'int', default: 18181, min: 0, max: 65535, help: "first replica's --supervisor-listen port, the next ones count up; 0 = free ports" },
  { name: 'replica-internal-port', key: 'replicaInternalPort', kind: 'int', default: 18281, min: 0, max: 65535, help: "first replica's --internal-listen port, the next ones count up; 0 = free ports" },
  { name: 'redis-port', key: 'redisPort', kind: 'int', default: 16379, min: 0, max: 65535, help: "redis-server's port (not 6379: a machine's own Redis is left alone); 0 = a free port" },
  { name: 'free-ports', key: 'freePorts', kind: 'bool', default: false, help: 'every port above is 0: all picked free (tests, a second cluster next to the first)' },
  { name: 'ready-timeout-ms', key: 'readyTimeoutMs', kind: 'int', default: 60_000, min: 1000, max: 10 * 60_000, help: 'bound on the whole start; what is not ready by then is named, everything stops, exit 1' },
  { name: 'shutdown-grace-ms', key: 'shutdownGraceMs', kind: 'int', default: 10_000, min: 0, max: 10 * 60_000, help: "replicas' --shutdown-grace-ms (running execs may finish within it on stop)" },
  { name: 'log-level', key: 'logLevel', kind: 'string', default: 'info', help: "children's pino level (their logs go to <data-dir>/logs/)" }
] as const satisfies readonly FlagSpec[]

const HOST = '127.0.0.1'
const SANDBOX_ID = 'local'
const CLI = fileURLToPath(new URL('../../../bin/exec-gateway.js', import.meta.url))
const PROBE_MS = 1000
const POLL_MS = 100
// A Ctrl-C in a terminal reaches every child of the process group as well as the launcher; a
// child that exits within this of a signal to the launcher was stopped, not lost.
const SIGNAL_RACE_MS = 250
const INFRA_STOP_MS = 5000
// Longest UNIX socket path (sun_path is 108 bytes on Linux, with its NUL).
const MAX_SOCKET_PATH = 100

interface ReplicaInfo { replicaId: string, publicUrl: string, supervisorUrl: string, child: LaunchedChild }

class Stopped extends Error {}

// Startup, watching and stopping of one cluster; every child it started is in `children`.
class Cluster {
  readonly children: LaunchedChild[] = []
  supervisor?: LaunchedChild
  readonly replicas: ReplicaInfo[] = []
  haproxy?: LaunchedChild
  redis?: LaunchedChild
  signalled = false
  forced = false
  failure?: string
  private wake!: () => void
  readonly woken = new Promise<void>((resolve) => { this.wake = resolve })
  private readonly raceTimers = new Set<NodeJS.Timeout>()
  private stopping?: Promise<void>

  private readonly say: (line: string) => void
  private readonly cleanup: () => void

  constructor (say: (line: string) => void, cleanup: () => void) {
    this.say = say
    this.cleanup = cleanup
  }

  get ended (): boolean { return this.signalled || this.failure !== undefined }

  spawn (name: string, command: string, args: string[], env: NodeJS.ProcessEnv, logDir: string): LaunchedChild {
    const child = new LaunchedChild({ name, command, args, env, logPath: join(logDir, `${name}.log`) })
    this.children.push(child)
    void child.exited.then((e) => {
      if (this.stopping !== undefined || this.ended) return
      const t = setTimeout(() => {
        this.raceTimers.delete(t)
        if (this.stopping !== undefined || this.ended) return
        // One killed by a signal has nothing to say; one that exited with a code may have said why.
        const tail = e.signal === null ? `\n${indent(child.tail())}` : ''
        this.fail(`${name} (pid ${child.pid}) exited unexpectedly (${describeExit(e)}); its log: ${child.logPath}${tail}`)
      }, SIGNAL_RACE_MS)
      this.raceTimers.add(t)
    })
    return child
  }

  fail (why: string): void {
    if (this.ended) return
    this.failure = why
    this.wake()
  }

  onSignal (): void {
    if (this.signalled) {
      // A second signal: nobody waits any longer.
      this.forced = true
      for (const c of this.children) c.signal('SIGKILL')
      return
    }
    this.signalled = true
    this.wake()
  }

  /** Throws when the cluster is ending (a signal, a dead child): startup waits call it each round. */
  check (): void {
    if (this.ended) throw new Stopped('stopping')
  }

  /** Polls probe() until it returns a value; throws naming `what` at the deadline. */
  async until<T> (deadline: number, what: string | (() => string), probe: () => Promise<T | undefined>): Promise<T> {
    let last = ''
    for (;;) {
      this.check()
      try {
        const v = await probe()
        if (v !== undefined) return v
      } catch (err) {
        last = (err as Error).message
      }
      this.check()
      if (Date.now() >= deadline) throw new Error(`not ready in time: ${typeof what === 'string' ? what : what()}${last === '' ? '' : ` (last: ${last})`}`)
      await sleep(POLL_MS)
    }
  }

  /** Supervisor, then replicas (draining within their grace), then haproxy and redis; then the run dir. Idempotent. */
  async stop (replicaBoundMs: number): Promise<void> {
    this.stopping ??= (async () => {
      for (const t of this.raceTimers) clearTimeout(t)
      this.raceTimers.clear()
      const forcedNames: string[] = []
      const stopOne = async (c: LaunchedChild | undefined, bound: number): Promise<void> => {
        if (c !== undefined && await c.stop('SIGTERM', bound) === 'forced') forcedNames.push(c.name)
      }
      await stopOne(this.supervisor, SUPERVISOR_STOP_MS + SHUTDOWN_SLACK_MS)
      await Promise.all(this.replicas.map(async (r) => { await stopOne(r.child, replicaBoundMs) }))
      await stopOne(this.haproxy, INFRA_STOP_MS)
      await stopOne(this.redis, INFRA_STOP_MS)
      // Anything started but not yet known by role (a replica that never printed its line).
      await Promise.all(this.children.map(async (c) => { await stopOne(c, INFRA_STOP_MS) }))
      if (forcedNames.length > 0) this.say(`killed (did not stop within its bound): ${forcedNames.join(', ')}`)
      this.cleanup()
    })()
    await this.stopping
  }
}

function indent (text: string): string {
  const lines = text.trimEnd().split('\n').slice(-15)
  return lines.map((l) => `    ${l}`).join('\n')
}

type ClusterFlags = ParsedFlags<typeof clusterFlags>

// Children get the launcher's environment minus EXEC_GATEWAY_* variables: those would set flags
// (an API token, other listeners) behind the launcher's back.
function childEnv (extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {}
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('EXEC_GATEWAY_')) env[k] = v
  return { ...env, ...extra }
}

function hostPortOf (url: string): string {
  const u = new URL(url)
  return `${u.hostname}:${u.port}`
}

function listeningLine (line: string): { publicUrl: string, supervisorUrl: string } | undefined {
  if (!line.startsWith('{')) return undefined
  try {
    const rec = JSON.parse(line) as Record<string, unknown>
    if (rec.msg === 'listening' && typeof rec.publicUrl === 'string' && typeof rec.supervisorUrl === 'string') {
      return { publicUrl: rec.publicUrl, supervisorUrl: rec.supervisorUrl }
    }
  } catch { /* someone's other line */ }
  return undefined
}

interface StartPlan {
  flags: ClusterFlags
  bins: ClusterBinaries
  dataDir: string
  runDir: string
  logDir: string
  socketPath: string
  token: string
  deadline: number
}

async function start (c: Cluster, p: StartPlan): Promise<{ publicUrl: string, supervisorUrl: string, redisUrl: string }> {
  const { flags } = p
  const taken = new Set<number>()
  const pick = async (port: number): Promise<number> => {
    const chosen = flags.freePorts || port === 0 ? await freePort(taken) : port
    taken.add(chosen)
    return chosen
  }
  const nth = (first: number, i: number): number => flags.freePorts || first === 0 ? 0 : first + i

  // redis-server: no persistence (a restart loses everything, as the replicas expect of a cache).
  const redisPort = await pick(flags.redisPort)
  const redisDir = join(p.runDir, 'redis')
  mkdirSync(redisDir, { recursive: true, mode: 0o700 })
  c.redis = c.spawn('redis-server', p.bins.redisServer, [
    '--port', String(redisPort), '--bind', HOST, '--save', '', '--appendonly', 'no',
    '--dir', redisDir, '--daemonize', 'no', '--protected-mode', 'yes', '--loglevel', 'notice'
  ], childEnv(), p.logDir)
  await c.until(p.deadline, `redis-server answering PING on ${HOST}:${redisPort}`, async () => await redisPing(redisPort, PROBE_MS) ? true : undefined)
  const redisUrl = `redis://${HOST}:${redisPort}`

  // The replicas, all at once, on one data dir; port 0 is bound by the replica itself.
  const pending = Array.from({ length: flags.replicas }, (_, i) => {
    const replicaId = `replica-${i + 1}`
    const child = c.spawn(replicaId, process.execPath, [
      CLI, 'serve',
      '--listen', `${HOST}:${nth(flags.replicaPublicPort, i)}`,
      '--supervisor-listen', `${HOST}:${nth(flags.replicaSupervisorPort, i)}`,
      '--internal-listen', `${HOST}:${nth(flags.replicaInternalPort, i)}`,
      '--redis-url', redisUrl,
      '--replica-id', replicaId,
      '--data-dir', p.dataDir,
      '--shutdown-grace-ms', String(flags.shutdownGraceMs),
      '--log-level', flags.logLevel
    ], childEnv(), p.logDir)
    return { replicaId, child, line: child.waitForLine(listeningLine, Math.max(1, p.deadline - Date.now())) }
  })
  // Every wait settles: none is left rejecting unobserved when another one fails first.
  const lines = await Promise.allSettled(pending.map(async (r) => await Promise.race([r.line, c.woken.then(() => { throw new Stopped('stopping') })])))
  c.check()
  for (const [i, res] of lines.entries()) {
    const r = pending[i]!
    if (res.status === 'rejected') throw new Error(`${r.replicaId} did not start: ${(res.reason as Error).message}; its log: ${r.child.logPath}\n${indent(r.child.tail())}`)
    c.replicas.push({ replicaId: r.replicaId, ...res.value, child: r.child })
  }

  // haproxy in front, checked before it runs.
  const publicPort = await pick(flags.publicPort)
  const supervisorPort = await pick(flags.supervisorPort)
  const cfgPath = join(p.runDir, 'haproxy.cfg')
  writeFileSync(cfgPath, renderHaproxyConfig({
    publicBind: `${HOST}:${publicPort}`,
    supervisorBind: `${HOST}:${supervisorPort}`,
    statsSocket: p.socketPath,
    replicas: c.replicas.map((r) => ({ name: r.replicaId, publicAddr: hostPortOf(r.publicUrl), supervisorAddr: hostPortOf(r.supervisorUrl) }))
  }), { mode: 0o600 })
  const check = spawnSync(p.bins.haproxy, ['-c', '-f', cfgPath], { encoding: 'utf8', timeout: 10_000 })
  if (check.status !== 0) throw new Error(`haproxy -c -f ${cfgPath} refused the config:\n${indent(`${check.stdout}${check.stderr}`)}`)
  // Master-worker in the foreground: the master is our child and its workers die with it.
  c.haproxy = c.spawn('haproxy', p.bins.haproxy, ['-W', '-db', '-f', cfgPath], childEnv(), p.logDir)
  const servers = c.replicas.flatMap((r) => [`public_replicas/${r.replicaId}`, `supervisor_replicas/${r.replicaId}`])
  let notUp: string[] = servers
  await c.until(p.deadline, () => `haproxy marking every replica UP (not yet: ${notUp.join(', ')})`, async () => {
    const status = await haproxyServerStatus(p.socketPath, PROBE_MS)
    notUp = servers.filter((s) => status.get(s) !== 'UP')
    return notUp.length === 0 ? true : undefined
  })

  // The supervisor dials the load balancer, as a real sandbox's would; its token rides in the
  // environment rather than argv, where `ps` would show it.
  const supervisorUrl = `http://${HOST}:${supervisorPort}`
  c.supervisor = c.spawn('supervisor', process.execPath, [
    CLI, 'supervisor', '--gateway', supervisorUrl, '--sandbox-id', SANDBOX_ID, '--log-level', flags.logLevel
  ], childEnv({ EXEC_GATEWAY_TOKEN: p.token }), p.logDir)
  // Asked of each replica directly: whichever one haproxy gave the session to knows it.
  await c.until(p.deadline, `sandbox "${SANDBOX_ID}" connected to a replica`, async () => {
    for (const r of c.replicas) {
      const res = await getJson(`${r.publicUrl}/v1/sandboxes/${SANDBOX_ID}`, PROBE_MS).catch(() => undefined)
      if (res?.status === 200 && (res.body as { status?: unknown } | undefined)?.status === 'connected') return true
    }
    return undefined
  })
  // And the front door itself answers, as a client will first try it.
  const publicUrl = `http://${HOST}:${publicPort}`
  await c.until(p.deadline, `GET ${publicUrl}/readyz through haproxy answering 200`, async () => (await getJson(`${publicUrl}/readyz`, PROBE_MS)).status === 200 ? true : undefined)
  return { publicUrl, supervisorUrl, redisUrl }
}

/** Runs the cluster until a signal (resolves 0) or a failure (resolves 1). Throws ConfigError on bad flags or missing binaries. */
export async function runCluster (argv: readonly string[]): Promise<number> {
  const { flags, positionals } = parseFlags(clusterFlags, argv)
  if (positionals.length > 0) throw new ConfigError(`cluster takes no arguments, got ${positionals.join(' ')}`)
  const say = (line: string): void => { process.stderr.write(`exec-gateway cluster: ${line}\n`) }
  await checkPorts(flags)
  const bins = ensureClusterBinaries(say)

  const dataDir = resolve(flags.dataDir)
  // Created here, once: replicas starting together on an empty dir would each write their own secret.
  const identity = loadDataDir(dataDir)
  const runDir = join(dataDir, 'run')
  const logDir = join(dataDir, 'logs')
  claimRunDir(runDir)
  mkdirSync(logDir, { recursive: true, mode: 0o700 })
  let socketDir: string | undefined
  let socketPath = join(runDir, 'haproxy.sock')
  if (socketPath.length > MAX_SOCKET_PATH) {
    socketDir = mkdtempSync(join(tmpdir(), 'exec-gateway-cluster-'))
    socketPath = join(socketDir, 'haproxy.sock')
  }
  const cleanup = (): void => {
    rmSync(runDir, { recursive: true, force: true })
    if (socketDir !== undefined) rmSync(socketDir, { recursive: true, force: true })
  }

  const cluster = new Cluster(say, cleanup)
  const onSignal = (): void => { cluster.onSignal() }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  const replicaBoundMs = flags.shutdownGraceMs + SHUTDOWN_SLACK_MS
  try {
    say(`starting redis-server, ${flags.replicas} replicas, haproxy and a supervisor; logs in ${logDir}`)
    let urls: Awaited<ReturnType<typeof start>>
    try {
      urls = await start(cluster, {
        flags,
        bins,
        dataDir,
        runDir,
        logDir,
        socketPath,
        token: signSupervisorToken(identity.tokenSecret, SANDBOX_ID),
        deadline: Date.now() + flags.readyTimeoutMs
      })
    } catch (err) {
      if (cluster.signalled) { await cluster.stop(replicaBoundMs); return cluster.forced ? 1 : 0 }
      say(`${cluster.failure ?? (err as Error).message}\nstopping everything`)
      await cluster.stop(replicaBoundMs)
      return 1
    }
    process.stdout.write(JSON.stringify({
      msg: 'cluster',
      publicUrl: urls.publicUrl,
      supervisorUrl: urls.supervisorUrl,
      dataDir,
      replicas: cluster.replicas.map((r) => ({ replicaId: r.replicaId, publicUrl: r.publicUrl, pid: r.child.pid })),
      sandboxId: SANDBOX_ID,
      redis: { url: urls.redisUrl, pid: cluster.redis!.pid },
      haproxy: { pid: cluster.haproxy!.pid },
      supervisor: { pid: cluster.supervisor!.pid },
      logDir,
      runDir
    }) + '\n')
    say(`ready. Try: curl -s -X POST '${urls.publicUrl}/v1/sandboxes/${SANDBOX_ID}/execs?wait=true' -H 'content-type: application/json' -d '{"command":["echo","hello"]}'`)
    say('Ctrl-C stops everything.')
    await cluster.woken
    if (cluster.failure !== undefined) {
      say(`${cluster.failure}\nstopping the rest`)
      await cluster.stop(replicaBoundMs)
      return 1
    }
    say('stopping')
    await cluster.stop(replicaBoundMs)
    return cluster.forced ? 1 : 0
  } finally {
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
  }
}
