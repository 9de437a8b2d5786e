import type { Logger } from 'pino'
import type { ClientChannel } from 'ssh2'
import { GatewayError } from '../errors.js'
import { ExecOpenError, type SshConnection } from './ssh-connection.js'
import { SshExec, type SshExecEnd } from './ssh-exec.js'
import type { Lease, SshPool } from './ssh-pool.js'
import { controlLine, encodeKeepMeta, KEEP_ENV, type KeepMeta } from '../schemas/keeper.js'
import { signalKept } from './keeper-client.js'
import type { TreeSignals } from './tree-signals.js'

// The relay's one seam for running a command in a sandbox. openCommand owns the way there
// (a connection from the pool, a long line staged as a file, the exec channel, one more
// connection when a channel was refused before anything ran); what it returns is the running
// command, with nothing of SSH in its surface. The exec layer drives it and decides the outcome.

// Longer command lines are staged as a file first (see SshConnection.stage): ssh2's server
// refuses packets over 35,000 bytes, and the exec request carries the whole line.
export const INLINE_COMMAND_MAX_BYTES = 32_000

// More connections a command may try after its channel was refused with nothing run: one.
// A refusal is about the connection it was asked on (a pooled one at the daemon's session limit,
// or one going away), so a fresh connection is worth a try; refused there too, it is the sandbox
// that refuses, and every further try would only add a relay and a handshake to the wait.
const OPEN_RETRY_BUDGET = 1

// A side channel (staging a long line, a batch's process scan) is one short script on an open
// connection: a round trip and a fork. Far beyond that on a loaded sandbox, and short enough
// that a kill whose answer never comes still leaves the exec's own bounds in charge.
export const SIDE_CHANNEL_BOUND_MS = 5000

// How a command's whole process tree is signalled: the batches of scans, its sandbox, and the
// name its processes carry there.
export interface TreeSignal {
  signals: TreeSignals
  sandboxId: string
  member: string
}

interface RemoteCommandSpec {
  // The shell line the sandbox runs.
  line: string
  pty: { cols: number, rows: number } | undefined
  // Signals every process of the command (a scan shared with its sandbox's other signals);
  // when it found none, the signal goes to the command's direct process only (an SSH signal
  // request).
  signalTree: TreeSignal
  // After the exit report, how long the channel's close is awaited while output is read.
  closeWaitMs: number
  logger: Logger
  onOutput: (stream: 'stdout' | 'stderr', chunk: Buffer) => void
  // Asked once a connection is there (the sandbox's session says what its daemon is): a meta
  // means the command is started as a kept exec (KEEP_ENV before the exec request) and is
  // signalled through the keeper, not a /proc scan.
  keep?: (() => KeepMeta | undefined) | undefined
}

// What attachCommand needs: the channel's bounds and where its output goes.
export type AttachSpec = Pick<RemoteCommandSpec, 'closeWaitMs' | 'logger' | 'onOutput'>

// How the command ended as far as the relay knows: its exit report, or why none will come.
type RemoteCommandEnd = SshExecEnd

// A command that has started in the sandbox. Its stdin side is what StdinFlow writes to.
export class RemoteCommand<Signal extends string = string> {
  readonly #exec: SshExec
  readonly #conn: SshConnection
  readonly #lease: Lease
  readonly #tree: TreeSignal | undefined
  // A kept exec's id: its signals go through the keeper.
  readonly #keptId: string | undefined
  // Resolves once, and never rejects.
  readonly done: Promise<RemoteCommandEnd>

  constructor (exec: SshExec, lease: Lease, signalling: { tree: TreeSignal } | { keptId: string }) {
    this.#exec = exec
    this.#conn = lease.conn
    this.#lease = lease
    this.#tree = 'tree' in signalling ? signalling.tree : undefined
    this.#keptId = 'keptId' in signalling ? signalling.keptId : undefined
    this.done = exec.done
  }

  get kept (): boolean { return this.#keptId !== undefined }

  // False while the command's stdin is backed up; onStdinDrain then says when it is not.
  writeStdin (data: Buffer): boolean { return this.#exec.writeStdin(data) }
  endStdin (): void { this.#exec.endStdin() }
  get stdinBuffered (): number { return this.#exec.stdinBuffered }
  get stdinHighWater (): number { return this.#exec.stdinHighWater }
  onStdinDrain (cb: () => void): () => void { return this.#exec.onStdinDrain(cb) }

  resize (cols: number, rows: number): void { this.#exec.resize(cols, rows) }

  // Stops (or restarts) reading the command's output, so that the command blocks on its writes.
  setPaused (paused: boolean): void { this.#exec.setPaused(paused) }

  // True when the sandbox confirmed it signalled the command's processes.
  async signal (signal: Signal): Promise<boolean> {
    if (this.#keptId !== undefined) {
      if (await signalKept(this.#conn, this.#keptId, signal, SIDE_CHANNEL_BOUND_MS)) return true
      this.#exec.signalChannel(signal)
      return false
    }
    const tree = this.#tree!
    if (await tree.signals.signal(tree.sandboxId, this.#conn, tree.member, signal)) return true
    // Nothing carried the tag (no /proc, or the process is already gone): ask sshd itself.
    this.#exec.signalChannel(signal)
    return false
  }

  // Ends the command from outside: done resolves with this failure unless an exit report is in.
  abort (error: GatewayError): void { this.#exec.abort(error) }

  // Gives the connection back to the pool, once the caller has all it needs from it (a kill's
  // answer may still be on its way when done resolves). Idempotent.
  release (): void { this.#lease.release() }
}

// Resolves once the command has started; rejects with a GatewayError when it could not, or
// with the signal's reason when the signal aborts first (a started command is then aborted).
export async function openCommand<Signal extends string> (pool: SshPool, sandboxId: string, spec: RemoteCommandSpec, signal: AbortSignal): Promise<RemoteCommand<Signal>> {
  for (let attempt = 0; ; attempt++) {
    const lease = await pool.acquire(sandboxId, signal, attempt > 0)
    let exec: SshExec
    const keep = spec.keep?.()
    try {
      exec = await startExec(lease.conn, spec, keep)
    } catch (err) {
      lease.release()
      if (!(err instanceof ExecOpenError)) throw err
      // Only a command that certainly never started may run on another connection.
      if (err.neverStarted && attempt < OPEN_RETRY_BUDGET) {
        spec.logger.debug({ detail: err.error.detail, attempt }, 'channel refused; retrying on a fresh connection')
        continue
      }
      throw err.error
    }
    const command = new RemoteCommand(exec, lease, keep === undefined ? { tree: spec.signalTree } : { keptId: keep.execId })
    if (signal.aborted) {
      const reason = abortReason(signal)
      command.abort(reason)
      command.release()
      throw reason
    }
    return command
  }
}

async function startExec (conn: SshConnection, spec: RemoteCommandSpec, keep: KeepMeta | undefined): Promise<SshExec> {
  const line = Buffer.byteLength(spec.line) <= INLINE_COMMAND_MAX_BYTES ? spec.line : await stageLine(conn, spec.line)
  const env = keep === undefined ? undefined : { [KEEP_ENV]: encodeKeepMeta(keep) }
  return await conn.openExec(line, spec.pty, (channel) => execOn(conn, channel, spec), env)
}

function execOn (conn: SshConnection, channel: ClientChannel, spec: AttachSpec): SshExec {
  return new SshExec({
    conn,
    channel,
    closeWaitMs: spec.closeWaitMs,
    logger: spec.logger,
    onStdout: (b) => spec.onOutput('stdout', b),
    onStderr: (b) => spec.onOutput('stderr', b)
  })
}

// Attaches to a kept exec on the lease's connection: the daemon replays its output from the
// offsets, then goes on live, and reports the exit on this channel. The lease becomes the
// command's (released with it); on failure it is the caller's still.
export async function attachCommand<Signal extends string> (lease: Lease, execId: string, offsets: { stdout: number, stderr: number }, spec: AttachSpec): Promise<RemoteCommand<Signal>> {
  const conn = lease.conn
  const line = controlLine({ op: 'attach', execId, stdoutOffset: offsets.stdout, stderrOffset: offsets.stderr })
  let exec: SshExec
  try {
    exec = await conn.openExec(line, undefined, (channel) => execOn(conn, channel, spec))
  } catch (err) {
    if (err instanceof ExecOpenError) throw err.error
    throw err
  }
  return new RemoteCommand<Signal>(exec, lease, { keptId: execId })
}

// The staged script deletes itself, then runs the line; its `exec` replaces the shell as usual,
// so signals and exit statuses are the same as for a line sent inline.
async function stageLine (conn: SshConnection, line: string): Promise<string> {
  let path: string
  try {
    path = await conn.stage(Buffer.from(`rm -f -- "$0"\n${line}\n`), SIDE_CHANNEL_BOUND_MS)
  } catch (err) {
    // Nothing ran: the command may try again on another connection.
    throw new ExecOpenError(GatewayError.is(err) ? err : new GatewayError('ssh_failed', String(err), { cause: err }), true)
  }
  return `exec /bin/sh ${shellQuotePath(path)}`
}

// The path comes from mktemp in the sandbox: quoted whole, whatever it holds.
function shellQuotePath (path: string): string {
  return "'" + path.replaceAll("'", "'\\''") + "'"
}

function abortReason (signal: AbortSignal): GatewayError {
  const reason: unknown = signal.reason
  return GatewayError.is(reason) ? reason : new GatewayError('shutting_down', 'the exec was cancelled')
}
