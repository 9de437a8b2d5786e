// The bench's knobs (from the environment, see bench/README.md), its goals, and the fixed names
// every phase shares. Read once when the bench loads: vitest needs them to pick the phases.
import { fileURLToPath } from 'node:url'
import { intEnv } from '../test/helpers/env.js'

const PHASES = ['roundtrip', 'controlmaster', 'rate', 'throughput', 'burst', 'hold', 'fleet', 'keep', 'cluster'] as const
export type Phase = typeof PHASES[number]

export const ONLY: ReadonlySet<Phase> = (() => {
  const raw = process.env.BENCH_ONLY
  if (raw === undefined || raw === '') return new Set(PHASES)
  const picked = raw.split(',').map((s) => s.trim()).filter((s) => s !== '')
  for (const p of picked) if (!(PHASES as readonly string[]).includes(p)) throw new Error(`BENCH_ONLY: unknown phase ${p} (use ${PHASES.join(',')})`)
  return new Set(picked as Phase[])
})()
const FULL_RUN = ONLY.size === PHASES.length

export const RTT_N = intEnv('BENCH_RTT_N', 100, 5, 10_000)
export const RTT_WARMUP = intEnv('BENCH_RTT_WARMUP', 10, 0, 1000)
export const FILE_MIB = intEnv('BENCH_FILE_MIB', 256, 1, 4096)
export const TPUT_REPS = intEnv('BENCH_TPUT_REPS', 3, 1, 20)
export const HOLD_STEPS: readonly number[] = (process.env.BENCH_HOLD ?? '500,1000').split(',').map((s) => Number(s.trim())).filter((n) => Number.isInteger(n) && n > 0).sort((a, b) => a - b)
export const CPU_WINDOW_S = intEnv('BENCH_CPU_WINDOW_S', 10, 1, 600)
export const RATE_S = intEnv('BENCH_RATE_S', 10, 1, 600)
export const RATE_CLIENTS = intEnv('BENCH_RATE_CLIENTS', 50, 1, 1000)
export const BURST_N = intEnv('BENCH_BURST_N', 500, 1, 1000)
// The fleet phase: this many sandboxes (one supervisor process each, ~70 MiB RSS apiece), each
// holding this many silent execs through one gateway.
export const FLEET_SANDBOXES = intEnv('BENCH_HOLD_SANDBOXES', 100, 1, 200)
export const FLEET_PER_SANDBOX = intEnv('BENCH_HOLD_PER_SANDBOX', 100, 1, 1000)
// Passed to every gateway process (not supervisors) as NODE_OPTIONS. Node 20 refuses --cpu-prof
// there; use BENCH_PROFILE_DIR for profiles.
export const GATEWAY_NODE_OPTIONS = process.env.BENCH_GATEWAY_NODE_OPTIONS ?? ''
// When set, gateways run with the inspector on a loopback port and each phase writes a CPU
// profile of the gateway under test (<phase>.cpuprofile, open it in Chrome DevTools) plus a
// summary (<phase>.top.txt); the held-execs phase also writes heap snapshots at 0, 500 and 1,000.
export const PROFILE_DIR = process.env.BENCH_PROFILE_DIR ?? ''
// More `serve` flags for every gateway, e.g. "--log-level warn".
export const GATEWAY_EXTRA_ARGS: readonly string[] = (process.env.BENCH_GATEWAY_ARGS ?? '').split(' ').filter((s) => s !== '')
// A partial run must not overwrite the results of a full one.
export const RESULTS_PATH = process.env.BENCH_RESULTS ?? (FULL_RUN ? fileURLToPath(new URL('./RESULTS.md', import.meta.url)) : '')

// Issue 16's goals are stated at a scale: a row whose run was smaller (knobs) shows its figure
// without a verdict.
export const GOALS = {
  rttRatio: 0.10,
  embeddedMedianMs: 15,
  // Binary WebSocket ÷ `ssh -c GCM_CIPHER … cat`.
  gcmThroughputRatio: 0.80,
  // CPU-seconds per GiB relayed ÷ the OpenSSH client's over the same transfer.
  gatewayCpuPerGiBRatio: 1.0,
  supervisorCpuPerGiBRatio: 0.5,
  // Whole `curl` process through the gateway ÷ whole `ssh -S` process on a ControlMaster.
  controlMasterRttRatio: 1.0,
  // BURST_N concurrent ?wait=true execs: all run with their true exit, none 429.
  burstAt: 500,
  // DELETE of this many running execs, until none of their processes is left.
  massDeleteS: 2,
  massDeleteAt: 1000,
  embeddedRateRatio: 1.0,
  heldKiBPerExec: 64,
  fleetKiBPerExec: 32,
  fleetAt: { sandboxes: 100, execs: 10_000 }
} as const

export const SSH = '/usr/bin/ssh'
export const CURL = '/usr/bin/curl'
export const CURVE_KEX = 'curve25519-sha256'
// What the gateway's ssh2 client negotiates with OpenSSH's sshd (ssh2 offers it first when the
// CPU has AES-NI; checked with ssh2's 'handshake' event against this sshd): the fair peer cipher.
export const GCM_CIPHER = 'aes128-gcm@openssh.com'
export const HOLD_COMMAND: readonly string[] = ['sleep', '600']
// The gateway tags every exec's environment with its id: how leftovers are found by pid.
export const EXEC_ID_ENV = 'EXEC_GATEWAY_EXEC_ID'
