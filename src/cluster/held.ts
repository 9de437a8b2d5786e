import type { DirectoryKeys } from './keys.js'
import { restoreArgs, type HeldRegistration, type RestoreOutcome } from './owners.js'
import type { RedisCall } from './redis-client.js'
import { RELEASE, RESTORE, runScript } from './scripts.js'

// What one replica holds in the directory and has to put back after Redis lost it: its owner
// registrations, and the releases it could not deliver (which must never come back as records).

type Call = <T>(op: string, run: RedisCall<T>) => Promise<T>

export const SUPERSEDED_CAP = 16

export class HeldOwners {
  readonly #keys: DirectoryKeys
  // By sandbox. issuedFence is the fence the caller was given; h.fence can be higher when a
  // registration of the same session that timed out ran late (found at the next restore).
  readonly #held = new Map<string, { h: HeldRegistration, issuedFence: number }>()
  readonly #unreleased = new Map<string, { replicaId: string, fence: number }>()

  constructor (keys: DirectoryKeys) {
    this.#keys = keys
  }

  registered (h: HeldRegistration): void {
    this.#unreleased.delete(h.sandboxId)
    this.#held.set(h.sandboxId, { h, issuedFence: h.fence })
  }

  // Forgotten before the release is sent: a record we meant to clear is never put back. Returns
  // the fence the record holds for that registration, as far as this replica knows.
  releasing (sandboxId: string, fence: number): number {
    const held = this.#held.get(sandboxId)
    if (held?.issuedFence !== fence) return fence
    this.#held.delete(sandboxId)
    return held.h.fence
  }

  releaseFailed (sandboxId: string, replicaId: string, fence: number): void {
    if (!this.#held.has(sandboxId)) this.#unreleased.set(sandboxId, { replicaId, fence })
  }

  // Delivers the pending releases, then runs every held registration through RESTORE. A failure
  // part way leaves the rest for the next call; restoring twice is harmless.
  async republish (call: Call, sandboxKeys: (sandboxId: string) => string[]): Promise<{ restored: string[], lost: string[] }> {
    for (const [sandboxId, u] of [...this.#unreleased]) {
      await call('release', (c) => runScript(c, RELEASE, [this.#keys.owner(sandboxId)], [u.replicaId, String(u.fence)]))
      if (this.#unreleased.get(sandboxId) === u) this.#unreleased.delete(sandboxId)
    }
    const restored: string[] = []
    const lost: string[] = []
    for (const held of [...this.#held.values()]) {
      const sandboxId = held.h.sandboxId
      const [outcome, fence] = await call('restore', (c) => runScript(c, RESTORE, sandboxKeys(sandboxId), restoreArgs(held.h, SUPERSEDED_CAP))) as [RestoreOutcome, string]
      // Only if no newer registration or release of ours replaced it while the script ran.
      if (this.#held.get(sandboxId) !== held) continue
      if (outcome === 'restored') restored.push(sandboxId)
      if (outcome === 'kept') held.h = { ...held.h, fence: Number(fence) }
      if (outcome === 'lost' || outcome === 'stale') {
        lost.push(sandboxId)
        this.#held.delete(sandboxId)
      }
    }
    return { restored, lost }
  }
}
