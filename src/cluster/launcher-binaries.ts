import { spawnSync } from 'node:child_process'
import { accessSync, constants as fsConstants, readdirSync } from 'node:fs'
import { delimiter, join } from 'node:path'
import { ConfigError } from '../config.js'

// redis-server and haproxy come from Debian. Root (a container, CI) gets them installed; anyone
// else is told the one command to type, since the launcher will not ask for a password.

export interface ClusterBinaries { redisServer: string, haproxy: string }

const INSTALL_COMMAND = 'apt-get install -y redis-server haproxy'
const APT_TIMEOUT_MS = 10 * 60_000
const APT_GET = 'apt-get'

// The first executable of that name in /usr/bin, /usr/sbin or PATH (the test setup and the
// helpers that run Debian's daemons look them up the same way).
export function findBinary (name: string, path: string | undefined = process.env.PATH): string | undefined {
  const candidates = [`/usr/bin/${name}`, `/usr/sbin/${name}`, ...(path ?? '').split(delimiter).filter(Boolean).map((d) => join(d, name))]
  for (const candidate of candidates) {
    try {
      accessSync(candidate, fsConstants.X_OK)
      return candidate
    } catch {
      // try the next one
    }
  }
  return undefined
}

// A slim image has no package lists until `apt-get update`; one that has them skips the round trip.
function aptListsPresent (): boolean {
  try {
    return readdirSync('/var/lib/apt/lists').some((f) => f.endsWith('_Packages') || f.endsWith('_Packages.lz4'))
  } catch {
    return false
  }
}

// apt's output goes to our stderr: stdout carries only the launcher's one JSON line.
function apt (args: string[], log: (line: string) => void): boolean {
  log(`$ apt-get ${args.join(' ')}`)
  const res = spawnSync(APT_GET, args, {
    stdio: ['ignore', 2, 2],
    timeout: APT_TIMEOUT_MS,
    env: { PATH: process.env.PATH, DEBIAN_FRONTEND: 'noninteractive' }
  })
  return res.error === undefined && res.status === 0
}

/** Paths of redis-server and haproxy, installed first when missing and running as root; throws ConfigError with the command to type otherwise. */
export function ensureClusterBinaries (log: (line: string) => void): ClusterBinaries {
  const path = process.env.PATH
  const find = (): Partial<ClusterBinaries> => ({ redisServer: findBinary('redis-server', path), haproxy: findBinary('haproxy', path) })
  let found = find()
  if (found.redisServer !== undefined && found.haproxy !== undefined) return found as ClusterBinaries
  const missing = [found.redisServer === undefined ? 'redis-server' : undefined, found.haproxy === undefined ? 'haproxy' : undefined].filter(Boolean).join(' and ')
  if (process.getuid?.() !== 0) {
    throw new ConfigError(`${missing} not found (looked in /usr/bin, /usr/sbin and PATH). Install them with:\n\n    sudo ${INSTALL_COMMAND}\n\nthen run \`npm run cluster\` again.`)
  }
  log(`${missing} not found; installing them from Debian`)
  const install = ['install', '-y', 'redis-server', 'haproxy']
  const ok = (aptListsPresent() || apt(['update'], log)) && (apt(install, log) || (apt(['update'], log) && apt(install, log)))
  found = find()
  if (!ok || found.redisServer === undefined || found.haproxy === undefined) {
    throw new ConfigError(`\`${INSTALL_COMMAND}\` did not install ${missing} (see its output above); install them by hand and run \`npm run cluster\` again.`)
  }
  return found as ClusterBinaries
}
