import { readFileSync } from 'node:fs'
import { hostname } from 'node:os'

// The only reader of process.env. Flags and their EXEC_GATEWAY_* variables are parsed once,
// validated, and handed on as a frozen, typed object with units in the names.

export interface FlagSpec {
  name: string
  key: string
  kind: 'string' | 'int' | 'bool'
  default?: string | number | boolean
  min?: number
  max?: number
  help: string
}

export class ConfigError extends Error {
  constructor (message: string) {
    super(message)
    this.name = 'ConfigError'
  }
}

export function envName (flag: string): string {
  return 'EXEC_GATEWAY_' + flag.replaceAll('-', '_').toUpperCase()
}

const MAX_MS = 24 * 3600 * 1000

export const serveFlags = [
  { name: 'listen', key: 'listen', kind: 'string', default: '127.0.0.1:8080', help: 'public API address (host:port, port 0 = any free port)' },
  { name: 'supervisor-listen', key: 'supervisorListen', kind: 'string', default: '127.0.0.1:8081', help: 'supervisor HTTP/2 listener address' },
  { name: 'data-dir', key: 'dataDir', kind: 'string', default: './.exec-gateway', help: 'SSH client key and token secret, created 0600 on first run' },
  { name: 'api-token', key: 'apiToken', kind: 'string', help: 'bearer token(s), comma-separated; required for a non-loopback --listen' },
  { name: 'api-token-file', key: 'apiTokenFile', kind: 'string', help: 'file of bearer tokens, one per line (# comments); added to --api-token, re-read on SIGHUP' },
  { name: 'tls-cert', key: 'tlsCert', kind: 'string', help: 'PEM certificate (chain) for the public listener; with --tls-key it serves HTTPS and wss' },
  { name: 'tls-key', key: 'tlsKey', kind: 'string', help: 'PEM private key for --tls-cert' },
  { name: 'supervisor-tls-cert', key: 'supervisorTlsCert', kind: 'string', help: 'PEM certificate (chain) for the supervisor listener; with --supervisor-tls-key it speaks HTTP/2 over TLS' },
  { name: 'supervisor-tls-key', key: 'supervisorTlsKey', kind: 'string', help: 'PEM private key for --supervisor-tls-cert' },
  { name: 'exec-rate-limit-per-minute', key: 'execRateLimitPerMinute', kind: 'int', default: 1200, min: 0, max: 10_000_000, help: 'exec creations per API token (per client address without tokens) per minute, 0 = unlimited; beyond it 429 with Retry-After' },
  { name: 'max-running-execs-per-sandbox', key: 'maxRunningExecsPerSandbox', kind: 'int', default: 1024, min: 1, max: 1_000_000, help: 'execs a sandbox may have pending or running at once (429 beyond)' },
  { name: 'local-sandbox', key: 'localSandbox', kind: 'bool', default: false, help: 'also run the embedded sandbox "local"' },
  { name: 'session-wait-ms', key: 'sessionWaitMs', kind: 'int', default: 15000, min: 0, max: MAX_MS, help: 'how long an exec waits for a disconnected sandbox' },
  { name: 'relay-open-timeout-ms', key: 'relayOpenTimeoutMs', kind: 'int', default: 10000, min: 1, max: MAX_MS, help: 'bound on the supervisor opening a relay stream' },
  { name: 'ssh-ready-timeout-ms', key: 'sshReadyTimeoutMs', kind: 'int', default: 10000, min: 1, max: MAX_MS, help: 'bound on SSH handshake and auth' },
  { name: 'ssh-keepalive-interval-ms', key: 'sshKeepaliveIntervalMs', kind: 'int', default: 15000, min: 1, max: MAX_MS, help: 'SSH keepalive interval on every exec connection' },
  { name: 'ssh-keepalive-count-max', key: 'sshKeepaliveCountMax', kind: 'int', default: 4, min: 1, max: 1000, help: 'unanswered keepalives before the relay is declared dead' },
  { name: 'h2-ping-interval-ms', key: 'h2PingIntervalMs', kind: 'int', default: 20000, min: 1, max: MAX_MS, help: 'PING a supervisor connection after this long without inbound frames' },
  { name: 'h2-ping-timeout-ms', key: 'h2PingTimeoutMs', kind: 'int', default: 10000, min: 1, max: MAX_MS, help: 'destroy a supervisor connection whose PING is not acknowledged within this' },
  { name: 'ssh-pool', key: 'sshPool', kind: 'bool', default: true, help: 'keep SSH connections to each sandbox warm and run execs as channels on them (false: one connection per exec)' },
  { name: 'ssh-channels-per-connection', key: 'sshChannelsPerConnection', kind: 'int', default: 8, min: 1, max: 256, help: "execs per pooled SSH connection; keep it below the sandbox sshd's MaxSessions (OpenSSH: 10), which also counts signal deliveries" },
  { name: 'ssh-idle-close-ms', key: 'sshIdleCloseMs', kind: 'int', default: 30000, min: 0, max: MAX_MS, help: 'close a pooled SSH connection after this long without execs' },
  { name: 'close-wait-ms', key: 'closeWaitMs', kind: 'int', default: 500, min: 0, max: MAX_MS, help: 'total wait for the channel close after the exit status' },
  { name: 'retention-bytes', key: 'retentionBytes', kind: 'int', default: 8388608, min: 1024, max: 1024 * 1024 * 1024, help: 'output kept per exec per stream for replay' },
  { name: 'reattach-timeout-ms', key: 'reattachTimeoutMs', kind: 'int', default: 30000, min: 1, max: MAX_MS, help: 'how long a kept exec whose relay was lost waits to be reattached before it fails with 503' },
  { name: 'exec-ttl-s', key: 'execTtlS', kind: 'int', default: 3600, min: 1, max: 30 * 24 * 3600, help: 'finished execs stay queryable this long' },
  { name: 'max-pending-relays-per-sandbox', key: 'maxPendingRelaysPerSandbox', kind: 'int', default: 32, min: 1, max: 100000, help: 'relays a sandbox may have waiting to be opened: SSH connections of a sandbox being opened at once (execs beyond it queue for a connection, not 429)' },
  { name: 'heartbeat-interval-ms', key: 'heartbeatIntervalMs', kind: 'int', default: 15000, min: 10, max: MAX_MS, help: 'heartbeat event after this long without other events, and supervisor session heartbeats' },
  { name: 'shutdown-grace-ms', key: 'shutdownGraceMs', kind: 'int', default: 10000, min: 0, max: MAX_MS, help: 'on SIGTERM, how long running execs may finish before they are cut off' },
  // Budgets that keep one hostile sandbox from hurting the gateway or the other sandboxes.
  { name: 'retention-bytes-per-sandbox', key: 'retentionBytesPerSandbox', kind: 'int', default: 268435456, min: 1024, max: 64 * 1024 * 1024 * 1024, help: "output retained across all of one sandbox's execs; beyond it the oldest finished execs' output is dropped first" },
  { name: 'retention-bytes-total', key: 'retentionBytesTotal', kind: 'int', default: 1073741824, min: 1024, max: 1024 * 1024 * 1024 * 1024, help: 'output retained across all sandboxes; beyond it the sandbox holding the most gives up its oldest first' },
  { name: 'max-session-streams-per-sandbox', key: 'maxSessionStreamsPerSandbox', kind: 'int', default: 4, min: 1, max: 1000, help: 'supervisor session streams one sandbox may hold open at once (a restart overlaps its old session briefly)' },
  { name: 'supervisor-max-streams-per-connection', key: 'supervisorMaxStreamsPerConnection', kind: 'int', default: 4096, min: 2, max: 1_000_000, help: 'concurrent HTTP/2 streams one supervisor connection may open (session + relays)' },
  { name: 'supervisor-refused-streams-per-minute', key: 'supervisorRefusedStreamsPerMinute', kind: 'int', default: 256, min: 1, max: 1_000_000, help: 'refused streams (bad token, unknown route, unclaimed relay) one connection may cause per minute before it is closed' },
  { name: 'supervisor-auth-timeout-ms', key: 'supervisorAuthTimeoutMs', kind: 'int', default: 10000, min: 1, max: MAX_MS, help: 'a supervisor connection that has not presented a valid token within this is closed' },
  { name: 'max-unauthenticated-connections', key: 'maxUnauthenticatedConnections', kind: 'int', default: 256, min: 1, max: 1_000_000, help: 'supervisor connections without a valid token yet, at once; newer ones are closed at once' },
  { name: 'session-line-max-bytes', key: 'sessionLineMaxBytes', kind: 'int', default: 65536, min: 1024, max: 16 * 1024 * 1024, help: 'bytes of one unfinished supervisor session message; a longer line ends the session' },
  { name: 'session-messages-per-second', key: 'sessionMessagesPerSecond', kind: 'int', default: 50, min: 1, max: 1_000_000, help: 'supervisor session messages per second (bursts of twice that); beyond it the session is ended' },
  { name: 'ssh-max-rekeys-per-minute', key: 'sshMaxRekeysPerMinute', kind: 'int', default: 10, min: 1, max: 100_000, help: 'key exchanges a sandbox SSH daemon may start per connection per minute; beyond it the connection fails' },
  { name: 'ssh-max-refused-channel-opens', key: 'sshMaxRefusedChannelOpens', kind: 'int', default: 16, min: 0, max: 100_000, help: 'channels a sandbox SSH daemon may try to open towards the gateway (all refused) before its connection fails' },
  { name: 'sandbox-log-lines-per-minute', key: 'sandboxLogLinesPerMinute', kind: 'int', default: 60, min: 1, max: 1_000_000, help: 'log lines one sandbox can cause per minute; the rest are counted and summarised' },
  { name: 'redis-url', key: 'redisUrl', kind: 'string', help: 'turns on cluster mode: replicas share their directory of sandboxes and execs in this Redis (redis://host:port)' },
  { name: 'replica-id', key: 'replicaId', kind: 'string', help: "this replica's name in the cluster (default: host name + pid)" },
  { name: 'internal-listen', key: 'internalListen', kind: 'string', default: '127.0.0.1:8082', help: 'cluster mode: where other replicas forward requests to this one (put it on a network only the replicas reach)' },
  { name: 'internal-url', key: 'internalUrl', kind: 'string', help: 'cluster mode: the address other replicas use to reach --internal-listen (default: derived from it)' },
  { name: 'log-level', key: 'logLevel', kind: 'string', default: 'info', help: 'pino level: fatal, error, warn, info, debug, trace, silent' }
] as const satisfies readonly FlagSpec[]

export const supervisorFlags = [
  { name: 'gateway', key: 'gateway', kind: 'string', default: 'http://127.0.0.1:8081', help: 'the gateway supervisor URL' },
  { name: 'sandbox-id', key: 'sandboxId', kind: 'string', help: 'this sandbox id (required)' },
  { name: 'token', key: 'token', kind: 'string', help: 'supervisor token from `exec-gateway token <sandboxId>` (required)' },
  { name: 'ssh-target', key: 'sshTarget', kind: 'string', help: 'bridge relays to this SSH daemon (host:port); default: the embedded daemon' },
  { name: 'ssh-user', key: 'sshUser', kind: 'string', help: 'account the gateway logs in as (default: the user running the supervisor)' },
  { name: 'ssh-host-key', key: 'sshHostKey', kind: 'string', help: "file with the --ssh-target daemon's public host key (e.g. /etc/ssh/ssh_host_ed25519_key.pub); the gateway then refuses any other key" },
  { name: 'keep-bytes-per-exec', key: 'keepBytesPerExec', kind: 'int', default: 8388608, min: 65536, max: 1024 * 1024 * 1024, help: 'embedded daemon: output kept per exec and stream for reattach (unsent output and sent history); a command whose unsent output reaches a quarter of it blocks until a gateway reads it' },
  { name: 'keep-total-bytes', key: 'keepTotalBytes', kind: 'int', default: 268435456, min: 65536, max: 1024 * 1024 * 1024 * 1024, help: 'embedded daemon: output kept across all execs; finished execs are evicted oldest first beyond it' },
  { name: 'keep-finished-s', key: 'keepFinishedS', kind: 'int', default: 900, min: 0, max: 30 * 24 * 3600, help: 'embedded daemon: how long a finished exec keeps its exit status and output tail' },
  { name: 'ca', key: 'ca', kind: 'string', help: 'PEM CA certificate(s) to verify an https:// --gateway against (default: the system CAs)' },
  { name: 'log-level', key: 'logLevel', kind: 'string', default: 'info', help: 'pino level' }
] as const satisfies readonly FlagSpec[]

export const dataDirFlags = [
  { name: 'data-dir', key: 'dataDir', kind: 'string', default: './.exec-gateway', help: 'gateway data directory' }
] as const satisfies readonly FlagSpec[]

type ValueOf<K extends FlagSpec['kind']> = K extends 'int' ? number : K extends 'bool' ? boolean : string
export type ParsedFlags<T extends readonly FlagSpec[]> = {
  readonly [F in T[number] as F['key']]: F extends { default: unknown } ? ValueOf<F['kind']> : ValueOf<F['kind']> | undefined
}

// Flags win over the environment; the environment wins over defaults.
export function parseFlags<const T extends readonly FlagSpec[]> (
  specs: T,
  argv: readonly string[],
  env: NodeJS.ProcessEnv = process.env
): { flags: ParsedFlags<T>, positionals: string[] } {
  const raw = new Map<string, string | true>()
  const positionals: string[] = []
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!
    if (!arg.startsWith('--')) { positionals.push(arg); continue }
    const eq = arg.indexOf('=')
    const name = eq === -1 ? arg.slice(2) : arg.slice(2, eq)
    const spec = specs.find((s) => s.name === name)
    if (spec === undefined) throw new ConfigError(`unknown flag --${name}`)
    if (eq !== -1) raw.set(name, arg.slice(eq + 1))
    else if (spec.kind === 'bool') raw.set(name, true)
    else {
      const next = argv[i + 1]
      if (next === undefined) throw new ConfigError(`--${name} needs a value`)
      raw.set(name, next)
      i++
    }
  }
  const out: Record<string, unknown> = {}
  for (const spec of specs) {
    const fromArgs = raw.get(spec.name)
    const fromEnv = env[envName(spec.name)]
    const source = fromArgs !== undefined ? `--${spec.name}` : envName(spec.name)
    const value = fromArgs ?? (fromEnv === undefined || fromEnv === '' ? undefined : fromEnv)
    if (value === undefined) { out[spec.key] = spec.default; continue }
    out[spec.key] = convert(spec, value, source)
  }
  return { flags: Object.freeze(out) as ParsedFlags<T>, positionals }
}

function convert (spec: FlagSpec, value: string | true, source: string): string | number | boolean {
  if (spec.kind === 'bool') {
    if (value === true || value === 'true' || value === '1') return true
    if (value === 'false' || value === '0') return false
    throw new ConfigError(`${source} must be true or false, got ${JSON.stringify(value)}`)
  }
  if (value === true) throw new ConfigError(`${source} needs a value`)
  if (spec.kind === 'string') return value
  if (!/^-?\d+$/.test(value)) throw new ConfigError(`${source} must be an integer, got ${JSON.stringify(value)}`)
  const n = Number(value)
  if (spec.min !== undefined && n < spec.min) throw new ConfigError(`${source} must be at least ${spec.min}, got ${n}`)
  if (spec.max !== undefined && n > spec.max) throw new ConfigError(`${source} must be at most ${spec.max}, got ${n}`)
  return n
}

export interface HostPort { host: string, port: number }

export function parseHostPort (value: string, what: string): HostPort {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(value)
  if (m === null) throw new ConfigError(`${what} must be host:port, got ${JSON.stringify(value)}`)
  const port = Number(m[3])
  if (port > 65535) throw new ConfigError(`${what} port must be 0..65535, got ${port}`)
  return { host: (m[1] ?? m[2])!, port }
}

export function isLoopbackHost (host: string): boolean {
  const h = host.toLowerCase().replace(/^\[|\]$/g, '')
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h) || h === '::ffff:127.0.0.1'
}

type ServeFlags = ParsedFlags<typeof serveFlags>

export interface TlsFiles { certFile: string, keyFile: string }

export interface GatewayConfig extends Omit<ServeFlags, 'listen' | 'supervisorListen' | 'tlsCert' | 'tlsKey' | 'supervisorTlsCert' | 'supervisorTlsKey' | 'replicaId' | 'internalListen'> {
  replicaId: string
  internalListen: HostPort
  listen: HostPort
  supervisorListen: HostPort
  // From --api-token and --api-token-file together, as read at start.
  apiTokens: readonly string[]
  tls: TlsFiles | undefined
  supervisorTls: TlsFiles | undefined
}

export function loadServeConfig (argv: readonly string[], env: NodeJS.ProcessEnv = process.env): GatewayConfig {
  const { flags, positionals } = parseFlags(serveFlags, argv, env)
  if (positionals.length > 0) throw new ConfigError(`serve takes no arguments, got ${positionals.join(' ')}`)
  return resolveServeConfig(flags)
}

function resolveServeConfig (flags: ServeFlags): GatewayConfig {
  const listen = parseHostPort(flags.listen, '--listen')
  const supervisorListen = parseHostPort(flags.supervisorListen, '--supervisor-listen')
  const apiTokens = [...splitTokens(flags.apiToken ?? ''), ...(flags.apiTokenFile === undefined ? [] : readTokenFile(flags.apiTokenFile))]
  if (apiTokens.length === 0 && !isLoopbackHost(listen.host)) {
    throw new ConfigError(`--listen ${flags.listen} is not a loopback address and no --api-token is set: anyone who can reach it could run commands. Set --api-token (or EXEC_GATEWAY_API_TOKEN, or --api-token-file), or listen on 127.0.0.1`)
  }
  const tls = tlsPair(flags.tlsCert, flags.tlsKey, '--tls-cert', '--tls-key')
  const supervisorTls = tlsPair(flags.supervisorTlsCert, flags.supervisorTlsKey, '--supervisor-tls-cert', '--supervisor-tls-key')
  if (flags.redisUrl !== undefined && !/^rediss?:\/\/[^\s]+$/.test(flags.redisUrl)) {
    throw new ConfigError(`--redis-url must be a redis:// or rediss:// URL, got ${JSON.stringify(flags.redisUrl)}`)
  }
  const replicaId = flags.replicaId ?? `${hostname()}-${process.pid}`
  if (!/^[A-Za-z0-9._-]{1,128}$/.test(replicaId)) throw new ConfigError(`--replica-id must be 1-128 of A-Z a-z 0-9 . _ -, got ${JSON.stringify(replicaId)}`)
  const internalListen = parseHostPort(flags.internalListen, '--internal-listen')
  if (flags.internalUrl !== undefined && !/^https?:\/\/[^\s/]+\/?$/.test(flags.internalUrl)) {
    throw new ConfigError(`--internal-url must be http(s)://host:port, got ${JSON.stringify(flags.internalUrl)}`)
  }
  const { listen: _l, supervisorListen: _s, tlsCert: _c, tlsKey: _k, supervisorTlsCert: _sc, supervisorTlsKey: _sk, replicaId: _r, internalListen: _i, ...rest } = flags
  return Object.freeze({ ...rest, listen, supervisorListen, apiTokens, tls, supervisorTls, replicaId, internalListen })
}

export function splitTokens (value: string): string[] {
  return value.split(',').map((t) => t.trim()).filter((t) => t !== '')
}

// One token per line; blank lines and # comments are skipped, so a file can say whose each is.
export function readTokenFile (path: string): string[] {
  let text: string
  try { text = readFileSync(path, 'utf8') } catch (err) {
    throw new ConfigError(`--api-token-file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`)
  }
  return text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'))
}

function tlsPair (cert: string | undefined, key: string | undefined, certFlag: string, keyFlag: string): TlsFiles | undefined {
  if (cert === undefined && key === undefined) return undefined
  if (cert === undefined || key === undefined) throw new ConfigError(`${certFlag} and ${keyFlag} go together: give both or neither`)
  for (const [file, flag] of [[cert, certFlag], [key, keyFlag]] as const) {
    try { readFileSync(file) } catch (err) {
      throw new ConfigError(`${flag} ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`)
    }
  }
  return { certFile: cert, keyFile: key }
}

// Defaults for tests and embedding: every flag's default, loopback listeners on free ports.
export function defaultGatewayConfig (overrides: Partial<GatewayConfig> = {}): GatewayConfig {
  const { flags } = parseFlags(serveFlags, [], {})
  return Object.freeze({
    ...resolveServeConfig({ ...flags, listen: '127.0.0.1:0', supervisorListen: '127.0.0.1:0', internalListen: '127.0.0.1:0' }),
    ...overrides
  })
}
