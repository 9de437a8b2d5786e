import type { Logger } from 'pino'
import { setTimeout as sleep } from 'node:timers/promises'
import { GatewayError } from '../errors.js'
import { CONTROL_BOUND_MS, statusKept } from '../relay/keeper-client.js'
import { attachCommand, type AttachSpec, type RemoteCommand } from '../relay/remote-command.js'
import type { SshPool } from '../relay/ssh-pool.js'
import type { KeptStatus } from '../schemas/keeper.js'
import type { SignalName } from './command.js'
import type { ExecEntry } from './exec-entry.js'
import type { OutputJournal } from './journal.js'

// A kept exec's way back to its command after its relay was lost (or after a gateway restart):
// within one deadline, a relay, the daemon's word on the exec, and an attach from the offsets
// the entry has. Its run decides what the new channel gets first (stdin, signals): attached().

export const DEFAULT_REATTACH_TIMEOUT_MS = 30000
// Between tries: a supervisor reconnects within its own backoff (at most 5 s), and each try
// costs the sandbox a relay and perhaps a handshake.
const REATTACH_BACKOFF_MIN_MS = 200
const REATTACH_BACKOFF_MAX_MS = 2000

// A reattach that must not be tried again: the daemon answered, and its answer ends the exec.
export class ReattachFatal extends Error {
  readonly error: GatewayError
  constructor (error: GatewayError) {
    super(error.detail)
    this.error = error
  }
}

export interface ReattachOptions {
  entry: ExecEntry
  pool: SshPool
  log: Logger
  // The run's own: an abort ends the reattach with its reason.
  abort: AbortSignal
  timeoutMs: number
  output: () => AttachSpec
  // The new channel is the command's; throws ReattachFatal when it cannot be.
  attached: (command: RemoteCommand<SignalName>, status: KeptStatus) => RemoteCommand<SignalName>
}

// Each try is bounded by what is left of the deadline; between tries the run backs off. The
// status request also cuts off the old channel if it is still there.
export async function reattach (o: ReattachOptions, cause: GatewayError | undefined): Promise<RemoteCommand<SignalName>> {
  const deadline = performance.now() + o.timeoutMs
  let backoff = REATTACH_BACKOFF_MIN_MS
  let last = cause === undefined ? 'no try finished' : `the relay was lost (${cause.detail})`
  for (;;) {
    const left = deadline - performance.now()
    if (left <= 0) throw reattachFailed(o, last)
    const bound = AbortSignal.any([o.abort, AbortSignal.timeout(Math.ceil(left))])
    try {
      const { command, status } = await withinBound(attachOnce(o, bound, left), bound)
      return o.attached(command, status)
    } catch (err) {
      if (o.abort.aborted) throw toGatewayError(o.abort.reason, o.log)
      if (err instanceof ReattachFatal) throw err.error
      last = bound.aborted
        ? 'the last try had no answer before the deadline'
        : GatewayError.is(err) ? `the last try: ${err.code}: ${err.detail}` : `the last try: ${String(err)}`
      o.log.debug({ detail: last }, 'reattach try failed')
    }
    const wait = Math.min(backoff, deadline - performance.now())
    if (wait > 0) {
      try {
        await sleep(wait, undefined, { signal: o.abort })
      } catch {
        throw toGatewayError(o.abort.reason, o.log)
      }
    }
    backoff = Math.min(backoff * 2, REATTACH_BACKOFF_MAX_MS)
  }
}

// A wedged daemon may never answer a channel open: the try ends with its bound all the same,
// and an attach that succeeds after that is given up at once.
async function withinBound<T extends { command: RemoteCommand<SignalName> }> (attempt: Promise<T>, bound: AbortSignal): Promise<T> {
  return await new Promise((resolve, reject) => {
    const onAbort = (): void => {
      reject(bound.reason)
      attempt.then(({ command: late }) => {
        late.abort(new GatewayError('relay_unavailable', 'the attach was answered after its bound'))
        late.release()
      }, () => {})
    }
    if (bound.aborted) { onAbort(); return }
    bound.addEventListener('abort', onAbort, { once: true })
    attempt.then((c) => { bound.removeEventListener('abort', onAbort); resolve(c) }, (err: unknown) => { bound.removeEventListener('abort', onAbort); reject(err) })
  })
}

function reattachFailed (o: ReattachOptions, last: string): GatewayError {
  const sandboxId = o.entry.sandboxId
  const why = o.pool.registry.get(sandboxId)?.session === undefined
    ? `no supervisor of sandbox ${sandboxId} is connected (the sandbox is gone or its supervisor is not back); ${last}`
    : `the sandbox's supervisor is connected but the reattach did not succeed (wedged?); ${last}`
  return new GatewayError('relay_unavailable', `exec ${o.entry.id} could not be reattached within ${o.timeoutMs} ms: ${why}`)
}

async function attachOnce (o: ReattachOptions, signal: AbortSignal, leftMs: number): Promise<{ command: RemoteCommand<SignalName>, status: KeptStatus }> {
  const entry = o.entry
  const lease = await o.pool.acquire(entry.sandboxId, signal)
  let handedOver = false
  try {
    const status = await statusKept(lease.conn, entry.id, true, Math.max(1, Math.ceil(Math.min(CONTROL_BOUND_MS, leftMs))))
    if (status === 'unknown') throw new ReattachFatal(new GatewayError('relay_unavailable', `the sandbox no longer knows exec ${entry.id} (its supervisor restarted?)`))
    if (signal.aborted) throw signal.reason
    const offsets = {
      stdout: offsetFrom(o.log, entry.stdout, status.stdout.base),
      stderr: offsetFrom(o.log, entry.stderr, status.stderr.base)
    }
    const command = await attachCommand<SignalName>(lease, entry.id, offsets, o.output())
    handedOver = true
    return { command, status }
  } finally {
    if (!handedOver) lease.release()
  }
}

// Where the attach starts on one stream: our offset, unless the daemon no longer keeps it;
// then the journal records the bytes in between as gone.
function offsetFrom (log: Logger, journal: OutputJournal, base: number): number {
  if (base <= journal.total) return journal.total
  log.warn({ from: journal.total, to: base }, 'the sandbox no longer keeps output the gateway has not seen')
  journal.skipTo(base)
  return base
}

export function toGatewayError (err: unknown, log: Logger): GatewayError {
  if (GatewayError.is(err)) return err
  log.error({ err }, 'unexpected error in exec run')
  return new GatewayError('internal', 'unexpected error while running the exec', { cause: err })
}
