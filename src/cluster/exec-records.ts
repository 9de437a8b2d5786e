import type { Logger } from 'pino'
import { GatewayError } from '../errors.js'
import type { ExecEntry } from '../execs/exec-entry.js'
import type { Directory, ExecOwner } from './directory.js'
import { finishedEntry, finishedInput } from './finished-view.js'
import { limboRecords, limboReplica } from './limbo.js'
import type { ReplicaInfo } from './reads.js'
import { DirectoryUnavailable } from './redis-client.js'

// A replica's execs in the cluster directory (their owner, their running record, their end, each
// written once and written again when Redis missed it), and what the cluster knows of an exec
// this replica does not hold: where it runs, its end, or that it is in transit.

export interface ExecRecordsOptions {
  directory: () => Directory
  replicaId: string
  // This replica's exec records.
  entryOf: (execId: string) => ExecEntry | undefined
  execTtlMs: number
  retentionBytes: number
  replicaTtlMs: number
  reattachTimeoutMs: number
  // The replica is past its directory phase of shutting down.
  closed: () => boolean
  logger: Logger
}

export class ExecRecords {
  readonly #o: ExecRecordsOptions
  readonly #log: Logger
  // Execs whose record Redis did not take (it was away), by id with their sandbox: written again
  // after it is back.
  readonly #unwritten = new Map<string, string>()

  constructor (o: ExecRecordsOptions) {
    this.#o = o
    this.#log = o.logger
  }

  get #dir (): Directory { return this.#o.directory() }

  async execOwner (execId: string): Promise<(ExecOwner & { replica: ReplicaInfo }) | undefined> {
    const owner = await this.#dir.execOwner(execId)
    if (owner === undefined || owner.replicaId === this.#o.replicaId) return undefined
    const replica = await this.#dir.replica(owner.replicaId)
    return replica === undefined ? undefined : { ...owner, replica }
  }

  // The exec runs here: requests for it anywhere in the cluster come here.
  async ownExec (execId: string, sandboxId: string): Promise<void> {
    try {
      await this.#dir.putExecOwner(execId, { replicaId: this.#o.replicaId, sandboxId })
      const entry = this.#o.entryOf(execId)
      if (entry !== undefined && !entry.finished) await this.#dir.addRunning(execId, entry.toJSON())
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) throw err
      this.#unwritten.set(execId, sandboxId)
      this.#log.warn({ execId, err: err.message }, 'could not record the exec in the directory; other replicas cannot forward to it until it is (written once redis is back)')
    }
  }

  // What Redis missed while it was away: the records of execs that started or ended meanwhile
  // (from the claim check, which runs every second). A record that fails again stays listed.
  async rewriteUnwritten (): Promise<void> {
    for (const [execId, sandboxId] of [...this.#unwritten]) {
      if (this.#o.closed()) return
      this.#unwritten.delete(execId)
      const entry = this.#o.entryOf(execId)
      if (entry === undefined) continue
      await this.ownExec(execId, sandboxId)
      await this.publishFinished(execId)
      // Redis is away again: the rest wait for the next check rather than each for its bound.
      if (this.#unwritten.has(execId)) return
    }
  }

  // Of these execs, those whose end the directory holds. None when it cannot be asked: Redis
  // trouble never stops a rebuild.
  async settled (execIds: string[]): Promise<ReadonlySet<string>> {
    const out = new Set<string>()
    try {
      for (const id of execIds) if (await this.#dir.finished(id) !== undefined) out.add(id)
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) throw err
      this.#log.warn({ err: err.message }, 'could not ask the directory which kept execs have ended; rebuilding them all')
      out.clear()
    }
    return out
  }

  // A finished exec another replica ran, as that replica last wrote it: readable after the
  // replica is gone. Undefined when the directory has none (or cannot be asked).
  async finishedExec (execId: string): Promise<ExecEntry | undefined> {
    try {
      const f = await this.#dir.finished(execId)
      return f === undefined ? undefined : finishedEntry(f, this.#o.retentionBytes)
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) throw err
      this.#log.warn({ execId, err: err.message }, 'could not look up a finished exec in the directory')
      return undefined
    }
  }

  // An exec this replica does not hold, as the cluster knows it: finished (the directory's
  // record), in limbo (src/cluster/limbo.ts: a 503 to retry), or unknown (undefined, a 404). A
  // directory that cannot be asked, or a replica past its directory, cannot tell an unknown exec
  // from one in transit: that is a 503 too, never a 404 that would say the exec was lost.
  async lookupElsewhere (execId: string): Promise<ExecEntry | undefined> {
    if (this.#o.closed()) throw new GatewayError('replica_unavailable', `this replica is shutting down and can no longer look up exec ${execId} in the cluster: retry (another replica answers)`)
    try {
      const f = await this.#dir.finished(execId)
      if (f !== undefined) return finishedEntry(f, this.#o.retentionBytes)
      await this.#limbo(execId)
      return undefined
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) throw err
      throw new GatewayError('directory_unavailable', `this replica does not hold exec ${execId}, and the cluster directory does not answer to say where it is: ${err.message}`)
    }
  }

  async #limbo (execId: string): Promise<void> {
    const gone = await limboReplica(this.#dir, execId)
    if (gone === undefined) return
    if (gone.state === 'leaving') throw new GatewayError('replica_unavailable', `exec ${execId} is moving with its sandbox from this replica, which is shutting down, to another one: retry`)
    if (gone.state === 'elsewhere') throw new GatewayError('replica_unavailable', `exec ${execId} moved on to replica ${gone.replicaId} with its sandbox: retry`)
    throw new GatewayError('replica_unavailable', `exec ${execId} ran on replica ${gone.replicaId}, which is gone; it goes on once its sandbox reconnects to a replica, or ends with 503 relay_unavailable within ${this.#o.replicaTtlMs} + ${this.#o.reattachTimeoutMs} ms (--reattach-timeout-ms) of the replica's end: retry`)
  }

  // For the cluster's list: such an exec is not lost, its state is just not known anywhere yet.
  async limboRecords (filter: { sandboxId?: string | undefined, status?: string | undefined }): Promise<Array<Record<string, unknown>>> {
    return await limboRecords(this.#dir, filter)
  }

  // Best effort: a deleted exec that the directory still has is found until its TTL.
  forgetExec (execId: string): void {
    this.#dir.forgetExec(execId).catch((err: Error) => {
      this.#log.warn({ execId, err: err.message }, 'could not forget the deleted exec in the directory')
    })
  }

  // The first terminal write wins (the directory compares and sets): a replica that got a stale
  // outcome can never overwrite the true one.
  async publishFinished (execId: string): Promise<void> {
    const entry = this.#o.entryOf(execId)
    if (entry === undefined || !entry.finished) return
    // A kept exec cut off by this replica's shutdown goes on in its sandbox: whichever replica
    // its supervisor reaches next rebuilds it and reports its end (or, if none does, the reaper
    // ends it). This replica's shutting_down is no outcome of the exec's.
    if (entry.kept && entry.error?.code === 'shutting_down') return
    try {
      const r = await this.#dir.putFinished(execId, finishedInput(entry), this.#o.execTtlMs)
      if (r === 'conflict') this.#log.warn({ execId }, 'the directory already holds another outcome for this exec; it stays')
      await this.#dir.removeRunning([execId])
    } catch (err) {
      if (!(err instanceof DirectoryUnavailable)) throw err
      this.#unwritten.set(execId, entry.sandboxId)
      this.#log.warn({ execId, err: err.message }, 'could not write the finished exec to the directory; only this replica can answer for it until redis is back')
    }
  }
}
