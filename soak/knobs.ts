// The soak's knobs (from the environment, see soak/README.md), the gateway's short liveness
// settings and the bounds derived from them, and the seeded randomness every plan draws from.
import type { GatewayConfig } from '../src/config.js'
import { intEnv } from '../test/helpers/env.js'

export const DURATION_S = intEnv('SOAK_DURATION_S', 120, 1, 7 * 24 * 3600)
// SOAK_REPLICAS > 1: cluster mode, that many `serve` replicas behind haproxy with one redis
// (soak/cluster.ts). Three replicas, haproxy and redis cost CPU the single gateway does not, so
// the default load is lighter there.
export const REPLICAS = intEnv('SOAK_REPLICAS', 1, 1, 9)
export const CLUSTER = REPLICAS > 1
export const AGENTS = intEnv('SOAK_AGENTS', CLUSTER ? 56 : 80, 1, 2000)
export const SANDBOXES = intEnv('SOAK_SANDBOXES', 8, 1, 64)
export const OPENSSH_SANDBOXES = Math.min(SANDBOXES, intEnv('SOAK_OPENSSH', 1, 0, 64))
export const SLACK_MS = intEnv('SOAK_SLACK_MS', 10_000, 0, 600_000)
export const MIN_TRUE_EXITS = intEnv('SOAK_MIN_EXECS', 50, 0, 1_000_000_000)
export const CHAOS_MIN_MS = intEnv('SOAK_CHAOS_MIN_MS', 2000, 100, 600_000)
export const CHAOS_MAX_MS = intEnv('SOAK_CHAOS_MAX_MS', 5000, CHAOS_MIN_MS, 600_000)
// Percent of execs that take one of the large shapes (bursts, late and paused readers, stdin
// floods) instead of the classic script; the first exec of the first agents takes each of them
// once, so that every run has at least one of each.
export const SHAPES_PCT = intEnv('SOAK_SHAPES_PCT', 8, 0, 100)
export const DUMP_PATH = process.env.SOAK_DUMP ?? ''
// Cluster mode: a directory for every replica's whole log, haproxy's and redis-server's.
export const LOG_DIR = process.env.SOAK_LOG_DIR ?? ''
export const HEAP_SNAPSHOT_PATH = process.env.SOAK_HEAP_SNAPSHOT ?? ''
export const SEED = process.env.SOAK_SEED !== undefined && process.env.SOAK_SEED !== '' ? process.env.SOAK_SEED : String(Date.now() % 1_000_000_000)
export const MAX_EXECS_PER_AGENT = 100_000
export const RUN_ID = `${process.pid}-${Date.now()}`

// gateway-restart: SIGKILL of the gateway process and a successor on the same ports and data dir;
// it hits every sandbox at once. replica-kill / replica-restart (cluster mode only): SIGKILL or
// SIGTERM (a drain) of one replica, then a new one on its ports. The others hit one sandbox.
export const ALL_FAULT_KINDS = ['kill', 'stop', 'blackhole', 'reset', 'wedge', 'gateway-restart', 'replica-kill', 'replica-restart'] as const
export type FaultKind = typeof ALL_FAULT_KINDS[number]
const REPLICA_FAULTS: readonly FaultKind[] = ['replica-kill', 'replica-restart']
// The faults that hit every sandbox at once and run alone.
export const isWholeFault = (k: FaultKind): boolean => k === 'gateway-restart' || REPLICA_FAULTS.includes(k)
const MODE_KINDS: readonly FaultKind[] = ALL_FAULT_KINDS.filter((k) => CLUSTER ? k !== 'gateway-restart' : !REPLICA_FAULTS.includes(k))
export const FAULT_KINDS: FaultKind[] = (() => {
  const raw = process.env.SOAK_FAULTS
  if (raw === undefined || raw === '') return [...MODE_KINDS]
  if (raw === 'none') return []
  const kinds = raw.split(',').map((s) => s.trim()).filter((s) => s !== '')
  for (const k of kinds) if (!(MODE_KINDS as readonly string[]).includes(k)) throw new Error(`SOAK_FAULTS: unknown fault kind ${k} ${CLUSTER ? 'in cluster mode' : 'without SOAK_REPLICAS'} (use ${MODE_KINDS.join(',')} or none)`)
  return kinds as FaultKind[]
})()

const MIB = 1024 * 1024

// Short liveness knobs so that faults resolve in seconds; the gateway process gets them as flags.
export const KNOBS = {
  sshKeepaliveIntervalMs: 1000,
  sshKeepaliveCountMax: 3,
  h2PingIntervalMs: 1000,
  h2PingTimeoutMs: 1000,
  closeWaitMs: 500,
  // Covers the supervisors' reconnect backoff (at most 5 s between tries) after a gateway
  // restart, plus the successor's start: execs of a sandbox still reconnecting wait, and
  // unknown exec ids wait for the daemons to report what they kept.
  sessionWaitMs: 10000,
  // A kept exec (embedded daemon) whose relay was lost waits this long for its reattach.
  reattachTimeoutMs: 6000,
  relayOpenTimeoutMs: 5000,
  sshReadyTimeoutMs: 5000,
  // Short, so that the sweeper runs during the soak and RSS shows retention, not accumulation.
  execTtlS: 30,
  // The default, spelled out: readers that attach after the end expect a gap past it.
  retentionBytes: 8 * MIB
} satisfies Partial<GatewayConfig>

export const KEEPALIVE_BOUND_MS = KNOBS.sshKeepaliveIntervalMs * (KNOBS.sshKeepaliveCountMax + 1)
export const PING_BOUND_MS = KNOBS.h2PingIntervalMs + KNOBS.h2PingTimeoutMs
// A kept exec's lost relay is seen within the ping bound, then waits for its reattach.
export const DETECTION_BOUND_MS = Math.max(KEEPALIVE_BOUND_MS, PING_BOUND_MS + KNOBS.reattachTimeoutMs, KNOBS.sessionWaitMs, KNOBS.relayOpenTimeoutMs, KNOBS.sshReadyTimeoutMs)
// A fault that lasts longer than this must have been detected by the gateway (ping / keepalive
// bound plus margin); a running exec that still reports an exit through it "survived" it.
export const MUST_DETECT_MS: Record<FaultKind, number> = { kill: 0, reset: 0, stop: PING_BOUND_MS + 1500, blackhole: PING_BOUND_MS + 1500, wedge: KEEPALIVE_BOUND_MS + 1500, 'gateway-restart': 0, 'replica-kill': 0, 'replica-restart': 0 }
// A stop or blackhole of an embedded sandbox up to this long must be bridged by the reattach:
// the loss is seen within the ping bound, and the supervisor is back (reconnect included)
// with time to spare before --reattach-timeout-ms runs out. Longer ones may end in 503.
export const SHORT_FAULT_MS = KNOBS.reattachTimeoutMs - 2000
// An exec that started on the embedded daemon at least this long before a fault was kept by it
// and must survive the fault; one that had not (relay open, SSH handshake, exec request still in
// flight) may honestly end in 503, or be lost to a gateway restart.
export const KEPT_AFTER_MS = 500
// Time a gateway restart adds to the bound of every exec it hits: its down time (measured) plus
// the session wait for its supervisors to come back and report, plus a reattach.
export const RESTART_ALLOWANCE_MS = KNOBS.sessionWaitMs + KNOBS.reattachTimeoutMs
// Fewest seconds between two gateway restarts (cluster mode: replica faults): each one hits every exec in flight.
export const RESTART_EVERY_S = intEnv('SOAK_RESTART_EVERY_S', CLUSTER ? 16 : 25, 1, 86_400)
// Cluster mode: a drained replica's --shutdown-grace-ms (OpenSSH execs that end within it end true).
export const SHUTDOWN_GRACE_MS = 2000

// ---------------------------------------------------------------- seeded randomness

export type Rand = () => number
function hash32 (s: string): number {
  let h = 0x811c9dc5
  for (let i = 0; i < s.length; i++) { h ^= s.charCodeAt(i); h = Math.imul(h, 0x01000193) }
  return h >>> 0
}
// mulberry32; next32 gives the raw 32 bits, for filling byte buffers.
function mulberry (seed: string): { next32: () => number } {
  let a = hash32(seed)
  return {
    next32: () => {
      a = (a + 0x6D2B79F5) | 0
      let t = Math.imul(a ^ (a >>> 15), 1 | a)
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
      return (t ^ (t >>> 14)) >>> 0
    }
  }
}
export function rng (seed: string): Rand {
  const m = mulberry(seed)
  return () => m.next32() / 4294967296
}
export const pick = <T>(r: Rand, xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!
// An integer in [lo, hi].
export const between = (r: Rand, lo: number, hi: number): number => lo + Math.floor(r() * (hi - lo + 1))
// n seeded bytes (any value 0..255).
export function seededBytes (seed: string, n: number): Buffer {
  const m = mulberry(seed)
  const buf = Buffer.allocUnsafe(Math.ceil(n / 4) * 4)
  for (let i = 0; i < buf.length; i += 4) buf.writeUInt32LE(m.next32(), i)
  return buf.subarray(0, n)
}
