import { GatewayError } from '../errors.js'
import {
  CONTROL_UNKNOWN_EXIT, controlLine, decodeKeptList, decodeKeptStatus,
  type ControlRequest, type KeptStatus
} from '../schemas/keeper.js'
import { boundedText } from './bounded-text.js'
import type { SshConnection } from './ssh-connection.js'
import type { SshPool } from './ssh-pool.js'

// The gateway's side of the keeper protocol's control requests (src/schemas/keeper.ts): each is
// one short exec channel on a pooled connection, bounded in time and in what the daemon may
// print. The daemon is in the sandbox and may be hostile or wedged: every answer is checked
// against the schema, and no answer within the bound is an error, never a guess.

// A control request is a round trip and a lookup in the daemon's memory; a daemon that cannot
// answer within this is treated as not answering.
export const CONTROL_BOUND_MS = 5000
// A status is a few hundred bytes plus the command line (≤ 256 KiB assembled); a list holds at
// most what the daemon keeps, whose metas are bounded the same way.
const STATUS_MAX_BYTES = 512 * 1024
const LIST_MAX_BYTES = 64 * 1024 * 1024

export type KeptLookup = KeptStatus | 'unknown'

interface ControlAnswer { code: number | undefined, stdout: string }

async function control (conn: SshConnection, req: ControlRequest, maxBytes: number, boundMs: number): Promise<ControlAnswer> {
  const r = await conn.control(controlLine(req), boundMs, maxBytes)
  if (r === undefined) {
    throw conn.failure ?? new GatewayError('relay_unavailable', `the sandbox did not answer the keeper's ${req.op} request within ${boundMs} ms`)
  }
  if (r.truncated) throw new GatewayError('ssh_failed', `the sandbox's answer to the keeper's ${req.op} request exceeds ${maxBytes} bytes`)
  return r
}

// `status <id> [detach]`. With detach the daemon cuts the attached channel off first, so the
// stdinReceived it reports stays final until the next attach.
export async function statusKept (conn: SshConnection, execId: string, detach: boolean, boundMs = CONTROL_BOUND_MS): Promise<KeptLookup> {
  const r = await control(conn, { op: 'status', execId, detach }, STATUS_MAX_BYTES, boundMs)
  if (r.code === CONTROL_UNKNOWN_EXIT) return 'unknown'
  if (r.code !== 0) throw new GatewayError('ssh_failed', `the sandbox answered the keeper's status request with exit ${String(r.code)}: ${boundedText(r.stdout, 200)}`)
  const status = decodeKeptStatus(r.stdout)
  if (status === undefined || status.meta.execId !== execId) throw new GatewayError('ssh_failed', 'the sandbox answered the keeper\'s status request with something that is not a status of that exec')
  return status
}

// `signal <id> <SIG>`: true when the daemon signalled the exec's process group (it was running).
export async function signalKept (conn: SshConnection, execId: string, signal: string, boundMs = CONTROL_BOUND_MS): Promise<boolean> {
  try {
    return (await control(conn, { op: 'signal', execId, signal }, 4096, boundMs)).code === 0
  } catch {
    return false
  }
}

// The execs a sandbox's daemon keeps (a restarted gateway rebuilds its records from them).
export async function listKept (pool: SshPool, sandboxId: string, signal: AbortSignal): Promise<KeptStatus[]> {
  return await withConnection(pool, sandboxId, signal, async (conn) => {
    const r = await control(conn, { op: 'list' }, LIST_MAX_BYTES, CONTROL_BOUND_MS)
    if (r.code !== 0) throw new GatewayError('ssh_failed', `the sandbox answered the keeper's list request with exit ${String(r.code)}`)
    const list = decodeKeptList(r.stdout)
    if (list === undefined) throw new GatewayError('ssh_failed', 'the sandbox answered the keeper\'s list request with something that is not a list')
    return list.execs
  })
}

// `forget <id>` (DELETE): the daemon kills the exec if it runs and drops it. False when it did
// not know the exec.
export async function forgetKept (pool: SshPool, sandboxId: string, execId: string, signal: AbortSignal): Promise<boolean> {
  return await withConnection(pool, sandboxId, signal, async (conn) => {
    const r = await control(conn, { op: 'forget', execId }, 4096, CONTROL_BOUND_MS)
    if (r.code === 0) return true
    if (r.code === CONTROL_UNKNOWN_EXIT) return false
    throw new GatewayError('ssh_failed', `the sandbox answered the keeper's forget request with exit ${String(r.code)}`)
  })
}

async function withConnection<T> (pool: SshPool, sandboxId: string, signal: AbortSignal, use: (conn: SshConnection) => Promise<T>): Promise<T> {
  const lease = await pool.acquire(sandboxId, signal)
  try {
    return await use(lease.conn)
  } finally {
    lease.release()
  }
}
