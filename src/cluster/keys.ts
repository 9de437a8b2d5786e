// Where the directory keeps what in Redis, under one prefix so several clusters (and tests) can
// share a Redis. A sandbox's keys share the hash tag {sandboxId}, an exec's keys {execId}.

export class DirectoryKeys {
  readonly #prefix: string

  constructor (prefix: string) {
    this.#prefix = prefix
  }

  replica (replicaId: string): string { return `${this.#prefix}replica:${replicaId}` }
  owner (sandboxId: string): string { return `${this.#prefix}sandbox:{${sandboxId}}:owner` }
  fence (sandboxId: string): string { return `${this.#prefix}sandbox:{${sandboxId}}:fence` }
  superseded (sandboxId: string): string { return `${this.#prefix}sandbox:{${sandboxId}}:superseded` }
  execOwner (execId: string): string { return `${this.#prefix}exec:{${execId}}:owner` }
  finished (execId: string): string { return `${this.#prefix}exec:{${execId}}:finished` }
  rate (key: string): string { return `${this.#prefix}rate:{${key}}` }
  // The execs one replica process (an incarnation: replica id @ start time) runs, and the lock
  // of the replica that ends them once that process is gone.
  running (incarnation: string): string { return `${this.#prefix}running:{${incarnation}}` }
  reap (incarnation: string): string { return `${this.#prefix}reap:{${incarnation}}` }
  get runningPattern (): string { return `${escapeGlob(this.#prefix)}running:{*}` }
  incarnationOf (runningKey: string): string { return runningKey.slice(`${this.#prefix}running:{`.length, -1) }

  // SCAN patterns: the prefix is matched literally, whatever glob characters it holds.
  get replicaPattern (): string { return `${escapeGlob(this.#prefix)}replica:*` }
  get ownerPattern (): string { return `${escapeGlob(this.#prefix)}sandbox:{*}:owner` }
  replicaIdOf (key: string): string { return key.slice(`${this.#prefix}replica:`.length) }
}

function escapeGlob (s: string): string {
  return s.replace(/[*?[\]\\]/g, (c) => `\\${c}`)
}
