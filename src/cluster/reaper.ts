import type { Logger } from 'pino'
import type { Exec } from '../schemas/exec.js'
import { problem } from '../errors.js'
import type { Directory } from './directory.js'
import { incarnationOf } from './reads.js'

// The execs of a replica process that is gone (SIGKILL, a lost host). Their kept execs come back
// when their supervisors reconnect to another replica, which rebuilds them; what nobody rebuilds
// within the reattach bound (the sandbox did not come back, or it ran on an OpenSSH target) ends
// here with 503 relay_unavailable, written once for the whole cluster (the directory's finished
// write compares and sets, so a late true outcome never overwrites it, nor it a true one).
//
// A process counts as gone only while Redis answers and its heartbeat has been missing for the
// heartbeat TTL plus the reattach bound, as this replica measured it: a Redis outage alone never
// ends anyone's execs.

export interface ReaperOptions {
  directory: () => Directory
  reattachTimeoutMs: number
  replicaTtlMs: number
  execTtlMs: number
  logger: Logger
}

// Long enough for one pass over a dead process's execs; another replica takes over after it.
const REAP_LOCK_MS = 30_000

export class Reaper {
  readonly #o: ReaperOptions
  // Incarnations this replica has seen without a heartbeat, since when.
  readonly #missingSince = new Map<string, number>()

  constructor (o: ReaperOptions) {
    this.#o = o
  }

  async tick (): Promise<void> {
    const dir = this.#o.directory()
    const live = new Set((await dir.replicas()).map((r) => incarnationOf(r)))
    live.add(dir.incarnation)
    const now = Date.now()
    const sets = await dir.runningSets()
    for (const seen of [...this.#missingSince.keys()]) if (!sets.includes(seen)) this.#missingSince.delete(seen)
    for (const inc of sets) {
      if (live.has(inc)) { this.#missingSince.delete(inc); continue }
      const since = this.#missingSince.get(inc) ?? now
      this.#missingSince.set(inc, since)
      // A successor under the same replica id heartbeats: the old process is gone for sure, only
      // the reattach bound is left to wait.
      const succeeded = [...live].some((l) => l !== inc && l.slice(0, l.lastIndexOf('@')) === inc.slice(0, inc.lastIndexOf('@')))
      if (now - since < (succeeded ? 0 : this.#o.replicaTtlMs) + this.#o.reattachTimeoutMs) continue
      if (!await dir.claimReap(inc, REAP_LOCK_MS)) continue
      await this.#reap(dir, inc, [...live])
    }
  }

  async #reap (dir: Directory, inc: string, live: string[]): Promise<void> {
    const replicaId = inc.slice(0, inc.lastIndexOf('@'))
    const execs = await dir.runningOf(inc)
    let ended = 0
    for (const [execId, record] of execs) {
      // Rebuilt by a live replica (its supervisor came back there), or already ended.
      let elsewhere = false
      for (const other of live) if (await dir.isRunningIn(other, execId)) { elsewhere = true; break }
      if (!elsewhere && await dir.finished(execId) === undefined && isExec(record)) {
        const endedAt = new Date().toISOString()
        const err = problem('relay_unavailable', `the replica ${replicaId} that ran exec ${execId} is gone, and no replica got the exec back from its sandbox within ${this.#o.reattachTimeoutMs} ms (the sandbox is gone, or its daemon does not keep execs)`)
        const failed: Exec = { ...record, status: 'failed', exitCode: null, signal: null, timedOut: false, error: { code: err.code, status: err.status, detail: err.detail }, endedAt }
        const r = await dir.putFinished(execId, { record: failed, stdout: Buffer.alloc(0), stderr: Buffer.alloc(0), stdoutOffset: record.stdoutBytes, stderrOffset: record.stderrBytes }, this.#o.execTtlMs)
        if (r === 'written') ended++
      }
      await dir.removeRunning([execId], inc)
    }
    this.#missingSince.delete(inc)
    this.#o.logger.warn({ replicaId, incarnation: inc, execs: execs.size, ended }, 'a gone replica\'s execs that no replica got back ended with 503')
  }
}

function isExec (r: unknown): r is Exec {
  return typeof r === 'object' && r !== null && typeof (r as Exec).id === 'string' && typeof (r as Exec).sandboxId === 'string' && Array.isArray((r as Exec).command)
}
