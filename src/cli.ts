import { readFileSync } from 'node:fs'
import type pino from 'pino'
import { createLogger } from './logger.js'
import ssh2 from 'ssh2'
import {
  ConfigError, dataDirFlags, envName, loadServeConfig, parseFlags, parseHostPort, serveFlags,
  supervisorFlags, type FlagSpec
} from './config.js'
import { loadDataDir, rotateTokenSecret } from './data-dir.js'
import { buildGateway } from './app.js'
import { clusterFlags, runCluster } from './cluster/launcher.js'
import { SHUTDOWN_SLACK_MS, SUPERVISOR_STOP_MS } from './lifecycle/bounds.js'
import { closeWithin } from './lifecycle/close-within.js'
import { Supervisor } from './supervisor/agent.js'
import { sandboxIdOfToken, signSupervisorToken } from './tokens.js'

// argv → command. The only place that touches process.argv, stdout for results and exit codes.

const COMMANDS: Record<string, { summary: string, flags: readonly FlagSpec[], usage: string }> = {
  serve: { summary: 'run the gateway (public API + supervisor listener)', flags: serveFlags, usage: 'exec-gateway serve [flags]' },
  supervisor: { summary: 'run the in-sandbox agent that dials the gateway', flags: supervisorFlags, usage: 'exec-gateway supervisor --sandbox-id ID --token TOKEN [flags]' },
  token: { summary: 'print a supervisor token for a sandbox', flags: [...dataDirFlags, { name: 'ttl-s', key: 'ttlS', kind: 'int', default: 0, min: 0, max: 10 * 365 * 24 * 3600, help: 'token lifetime in seconds, 0 = no expiry' }], usage: 'exec-gateway token <sandboxId> [--data-dir DIR] [--ttl-s N]' },
  'rotate-token-secret': { summary: 'rotate the secret that signs supervisor tokens (old tokens stay valid until --retire)', flags: [...dataDirFlags, { name: 'retire', key: 'retire', kind: 'bool', default: false, help: 'stop accepting tokens signed with the previous secret' }], usage: 'exec-gateway rotate-token-secret [--data-dir DIR] [--retire]' },
  'public-key': { summary: "print the gateway's SSH client public key (for authorized_keys)", flags: dataDirFlags, usage: 'exec-gateway public-key [--data-dir DIR]' },
  cluster: { summary: 'run a local cluster: redis-server, haproxy, 3 replicas and a supervisor (npm run cluster)', flags: clusterFlags, usage: 'exec-gateway cluster [flags]' }
}

function help (command?: string): string {
  if (command !== undefined && COMMANDS[command] !== undefined) {
    const c = COMMANDS[command]
    const lines = [`usage: ${c.usage}`, '', c.summary, '', 'flags (each also read from its environment variable):']
    for (const f of c.flags) {
      const def = 'default' in f && f.default !== undefined ? ` (default ${String(f.default)})` : ''
      lines.push(`  --${f.name.padEnd(32)} ${f.help}${def}`, `    ${envName(f.name)}`)
    }
    return lines.join('\n') + '\n'
  }
  return [
    'usage: exec-gateway <command> [flags]', '',
    'commands:',
    ...Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(12)} ${c.summary}`),
    '', 'exec-gateway <command> --help shows its flags.', ''
  ].join('\n')
}

export async function main (argv: string[]): Promise<void> {
  const [command, ...rest] = argv
  try {
    if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
      process.stdout.write(help(rest[0]))
      return
    }
    if (COMMANDS[command] === undefined) throw new ConfigError(`unknown command ${JSON.stringify(command)}\n\n${help()}`)
    if (rest.includes('--help') || rest.includes('-h')) { process.stdout.write(help(command)); return }
    switch (command) {
      case 'serve': await serve(rest); return
      case 'supervisor': await supervisor(rest); return
      case 'token': token(rest); return
      case 'rotate-token-secret': rotate(rest); return
      case 'public-key': publicKey(rest); return
      case 'cluster': process.exitCode = await runCluster(rest)
    }
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`exec-gateway: ${err.message}\n`)
      process.exitCode = 2
      return
    }
    process.stderr.write(`exec-gateway: ${(err as Error).stack ?? String(err)}\n`)
    process.exitCode = 1
  }
}

async function serve (argv: string[]): Promise<void> {
  const config = loadServeConfig(argv)
  const gateway = await buildGateway(config)
  const { publicUrl, supervisorUrl } = await gateway.listen()
  gateway.logger.info({ publicUrl, supervisorUrl, localSandbox: config.localSandbox }, 'listening')
  onShutdownSignal(async () => { await gateway.close() }, config.shutdownGraceMs + SHUTDOWN_SLACK_MS, gateway.logger)
  // Re-read tokens, token secrets and certificates without dropping a connection.
  process.on('SIGHUP', () => gateway.reload())
}

// What useradd accepts (POSIX portable names, and Samba's trailing $), bounded.
const SSH_USER = /^[A-Za-z0-9._][A-Za-z0-9._-]{0,62}\$?$/

async function supervisor (argv: string[]): Promise<void> {
  const { flags, positionals } = parseFlags(supervisorFlags, argv)
  if (positionals.length > 0) throw new ConfigError(`supervisor takes no arguments, got ${positionals.join(' ')}`)
  if (flags.sandboxId === undefined) throw new ConfigError('--sandbox-id is required')
  if (flags.token === undefined) throw new ConfigError('--token is required (make one with `exec-gateway token <sandboxId>` on the gateway host)')
  let gatewayUrl: URL
  try { gatewayUrl = new URL(flags.gateway) } catch { throw new ConfigError(`--gateway must be a URL, got ${JSON.stringify(flags.gateway)}`) }
  if (gatewayUrl.protocol !== 'http:' && gatewayUrl.protocol !== 'https:') throw new ConfigError(`--gateway must be an http:// or https:// URL, got ${flags.gateway}`)
  if (flags.ca !== undefined && gatewayUrl.protocol !== 'https:') throw new ConfigError('--ca needs an https:// --gateway')
  // `--ssh-user "$USER"` with USER unset: every exec would later fail its SSH login with a 502
  // that names nothing of this.
  if (flags.sshUser !== undefined && !SSH_USER.test(flags.sshUser)) {
    throw new ConfigError(`--ssh-user must be an account name (letters, digits, . _ -, up to 64), got ${JSON.stringify(flags.sshUser)}${flags.sshUser === '' ? ' (was it "$USER" with USER unset?); leave it out for the user running the supervisor' : ''}`)
  }
  if (flags.sshHostKey !== undefined && flags.sshTarget === undefined) throw new ConfigError('--ssh-host-key goes with --ssh-target (the embedded daemon reports its own key)')
  const ca = flags.ca === undefined ? undefined : readFlagFile(flags.ca, '--ca')
  const sshHostKey = flags.sshHostKey === undefined ? undefined : readHostKey(flags.sshHostKey)
  const tokenSandbox = sandboxIdOfToken(flags.token)
  if (tokenSandbox !== undefined && tokenSandbox !== flags.sandboxId) {
    throw new ConfigError(`--token was issued for sandbox ${JSON.stringify(tokenSandbox)}, not ${JSON.stringify(flags.sandboxId)}: a supervisor can only serve the sandbox its token names`)
  }
  const logger = createLogger(flags.logLevel)
  if (flags.sshTarget !== undefined && sshHostKey === undefined) {
    logger.warn('no --ssh-host-key: the gateway will accept whatever host key answers at --ssh-target')
  }
  const agent = new Supervisor({
    gatewayUrl: gatewayUrl.toString(),
    sandboxId: flags.sandboxId,
    token: flags.token,
    sshTarget: flags.sshTarget === undefined ? undefined : parseHostPort(flags.sshTarget, '--ssh-target'),
    sshUser: flags.sshUser,
    sshHostKey,
    ...(ca === undefined ? {} : { tls: { ca } }),
    keep: { bytesPerExec: flags.keepBytesPerExec, totalBytes: flags.keepTotalBytes, finishedS: flags.keepFinishedS },
    logger
  })
  await agent.start()
  logger.info({ gateway: flags.gateway, sandboxId: flags.sandboxId, sshTarget: agent.sshTarget }, 'supervisor started')
  onShutdownSignal(async () => { await agent.stop() }, SUPERVISOR_STOP_MS, logger)
}

function token (argv: string[]): void {
  const { flags, positionals } = parseFlags(COMMANDS.token!.flags, argv) as unknown as { flags: { dataDir: string, ttlS: number }, positionals: string[] }
  if (positionals.length !== 1) throw new ConfigError('usage: exec-gateway token <sandboxId> [--data-dir DIR] [--ttl-s N]')
  const identity = loadDataDir(flags.dataDir)
  const expiresAt = flags.ttlS > 0 ? Math.floor(Date.now() / 1000) + flags.ttlS : 0
  let t: string
  try { t = signSupervisorToken(identity.tokenSecret, positionals[0]!, expiresAt) } catch (err) { throw new ConfigError((err as Error).message) }
  process.stdout.write(t + '\n')
}

function rotate (argv: string[]): void {
  const { flags, positionals } = parseFlags(COMMANDS['rotate-token-secret']!.flags, argv) as unknown as { flags: { dataDir: string, retire: boolean }, positionals: string[] }
  if (positionals.length > 0) throw new ConfigError('rotate-token-secret takes no arguments')
  rotateTokenSecret(flags.dataDir, flags.retire ? 'retire' : 'start')
  process.stdout.write(flags.retire
    ? 'tokens signed with the previous secret are no longer accepted once the gateway reloads (SIGHUP or restart)\n'
    : 'new secret in place; `exec-gateway token` now signs with it. Old tokens stay valid until `rotate-token-secret --retire`. Send the gateway SIGHUP (or restart it) to pick this up.\n')
}

function readFlagFile (path: string, flag: string): Buffer {
  try { return readFileSync(path) } catch (err) {
    throw new ConfigError(`${flag} ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`)
  }
}

// An OpenSSH public key file (ssh_host_*_key.pub); passed on as its one-line form.
function readHostKey (path: string): string {
  const text = readFlagFile(path, '--ssh-host-key').toString('utf8').trim()
  const parsed = ssh2.utils.parseKey(text)
  const key = Array.isArray(parsed) ? parsed[0] : parsed
  if (key === undefined || key instanceof Error) throw new ConfigError(`--ssh-host-key ${path} is not an SSH public key: ${key instanceof Error ? key.message : 'empty'}`)
  if (key.isPrivateKey()) throw new ConfigError(`--ssh-host-key ${path} is a private key; give the .pub file`)
  return `${key.type} ${key.getPublicSSH().toString('base64')}`
}

function publicKey (argv: string[]): void {
  const { flags, positionals } = parseFlags(dataDirFlags, argv)
  if (positionals.length > 0) throw new ConfigError('public-key takes no arguments')
  process.stdout.write(loadDataDir(flags.dataDir).publicKey + '\n')
}

// SIGTERM/SIGINT: shut down within the bound, then exit; a second signal exits at once.
function onShutdownSignal (shutdown: () => Promise<void>, boundMs: number, logger: pino.Logger): void {
  let stopping = false
  const handler = (signal: NodeJS.Signals): void => {
    if (stopping) { process.exit(1) }
    stopping = true
    logger.info({ signal }, 'shutting down')
    let code = 0
    const polite = async (): Promise<void> => {
      try { await shutdown() } catch (err) { logger.error({ err }, 'shutdown failed'); code = 1 }
    }
    void closeWithin(boundMs, polite, () => { logger.error('shutdown exceeded its bound; exiting'); code = 1 })
      .then(() => process.exit(code))
  }
  process.on('SIGTERM', handler)
  process.on('SIGINT', handler)
}
