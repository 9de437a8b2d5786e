// Runs once in the vitest main process before any test file. DESIGN.md: a test that cannot find
// what it needs fails with a message that says how to get it; it never skips. So this installs
// OpenSSH where it can (root, e.g. CI) and otherwise stops the run with the exact command to type.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readdirSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { findSshd } from './helpers/openssh.js'
import { findBinary } from '../src/cluster/launcher-binaries.js'
import { findRedisServer } from './helpers/redis-server.js'

const CLI = fileURLToPath(new URL('../dist/src/cli.js', import.meta.url))

function run (cmd: string, args: string[]): boolean {
  console.log(`[global-setup] $ ${cmd} ${args.join(' ')}`)
  const res = spawnSync(cmd, args, {
    stdio: ['ignore', 'inherit', 'inherit'],
    env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' }
  })
  if (res.error !== undefined) {
    console.log(`[global-setup] ${cmd} failed to start: ${res.error.message}`)
    return false
  }
  return res.status === 0
}

// An image whose package lists were cleaned (as slim images are) cannot install anything until
// `apt-get update`; one that has them can skip the network round trip.
function aptListsPresent (): boolean {
  try {
    return readdirSync('/var/lib/apt/lists').some((f) => f.endsWith('_Packages') || f.endsWith('_Packages.lz4'))
  } catch {
    return false
  }
}

function installOpenSsh (): void {
  const install = ['install', '-y', 'openssh-server']
  if (!aptListsPresent() && !run('apt-get', ['update'])) {
    throw new Error('[global-setup] `apt-get update` failed; install OpenSSH by hand: apt-get install -y openssh-server')
  }
  if (run('apt-get', install)) return
  // Stale lists can name package versions the mirror no longer has: refresh once and retry.
  if (run('apt-get', ['update']) && run('apt-get', install)) return
  throw new Error('[global-setup] `apt-get install -y openssh-server` failed (see output above)')
}

// The dashboard's end-to-end tests drive Debian's Chromium (playwright-core brings no browser).
const CHROMIUM = '/usr/bin/chromium'

function installChromium (): void {
  const install = ['install', '-y', 'chromium']
  if (!aptListsPresent() && !run('apt-get', ['update'])) {
    throw new Error('[global-setup] `apt-get update` failed; install Chromium by hand: apt-get install -y chromium')
  }
  if (run('apt-get', install)) return
  if (run('apt-get', ['update']) && run('apt-get', install)) return
  throw new Error('[global-setup] `apt-get install -y chromium` failed (see output above)')
}

// The cluster tests run their own redis-server and haproxy on free ports (never the machine's
// default ones); only the binaries come from Debian.
const findHaproxy = (): string | undefined => findBinary('haproxy')

function installPackage (pkg: string): void {
  const install = ['install', '-y', pkg]
  if (!aptListsPresent() && !run('apt-get', ['update'])) {
    throw new Error(`[global-setup] \`apt-get update\` failed; install ${pkg} by hand: apt-get install -y ${pkg}`)
  }
  if (run('apt-get', install)) return
  if (run('apt-get', ['update']) && run('apt-get', install)) return
  throw new Error(`[global-setup] \`apt-get install -y ${pkg}\` failed (see output above)`)
}

function ensurePackage (pkg: string, what: string, find: () => string | undefined, isRoot: boolean): void {
  if (find() !== undefined) return
  if (!isRoot) {
    throw new Error(`${what} was not found. Install it with \`sudo apt-get install -y ${pkg}\` (Debian/Ubuntu), then run the tests again.`)
  }
  console.log(`[global-setup] ${pkg} not found: installing it with apt-get`)
  installPackage(pkg)
  const found = find()
  if (found === undefined) throw new Error(`[global-setup] ${pkg} was installed but its binary is still missing; install it with \`apt-get install -y ${pkg}\``)
  console.log(`[global-setup] installed ${found}`)
}

export function setup (): void {
  if (!existsSync(CLI)) {
    throw new Error(`${CLI} is missing: run \`npm run build\` first (npm test does it for you)`)
  }

  const isRoot = process.getuid?.() === 0
  if (findSshd() === undefined) {
    if (!isRoot) {
      throw new Error(
        'OpenSSH sshd is required by the interop tests and was not found at /usr/sbin/sshd or on PATH. ' +
          'Install it with `sudo apt-get install -y openssh-server` (Debian/Ubuntu), ' +
          '`sudo dnf install -y openssh-server` (Fedora/RHEL), `sudo apk add openssh-server` (Alpine) ' +
          'or `sudo pacman -S openssh` (Arch), then run the tests again.'
      )
    }
    console.log('[global-setup] OpenSSH sshd not found: installing openssh-server with apt-get')
    installOpenSsh()
    const found = findSshd()
    if (found === undefined) throw new Error('[global-setup] openssh-server was installed but sshd is still not at /usr/sbin/sshd')
    console.log(`[global-setup] installed ${found}`)
  }

  if (!existsSync(CHROMIUM)) {
    if (!isRoot) {
      throw new Error(
        `Chromium is required by the dashboard tests (test/e2e) and was not found at ${CHROMIUM}. ` +
          'Install it with `sudo apt-get install -y chromium` (Debian/Ubuntu), then run the tests again.'
      )
    }
    console.log('[global-setup] Chromium not found: installing chromium with apt-get')
    installChromium()
    if (!existsSync(CHROMIUM)) throw new Error(`[global-setup] chromium was installed but ${CHROMIUM} is still missing; install it with \`apt-get install -y chromium\``)
    console.log(`[global-setup] installed ${CHROMIUM}`)
  }

  ensurePackage('redis-server', 'redis-server, required by the cluster tests (test/integration/cluster-*)', findRedisServer, isRoot)
  ensurePackage('haproxy', 'haproxy, required by the cluster tests (test/integration/cluster-*)', findHaproxy, isRoot)

  // sshd running as root insists on its privilege-separation directory; the package creates it
  // only at service start, which never happens in a container or CI without systemd.
  if (isRoot) mkdirSync('/run/sshd', { recursive: true, mode: 0o755 })
}
