// DELETE of many running execs at once, timed until no process of theirs is left in /proc (the
// sandboxes are local): what "kill everything" costs, not only what the gateway says.
import { sleep } from '../test/helpers/wait.js'
import type { GatewayApi } from './clients.js'
import { taggedProcesses } from './proc.js'

// allGoneS: until no tagged process is left; gatewayZeroS: until the gateway reported 0 active
// execs (undefined if it had not by then).
export interface MassDelete { processesBefore: number, allGoneS: number, answeredS: number, gatewayZeroS: number | undefined, concurrency: number }

// The bench's agent holds up to 1,024 sockets: beyond that, requests queue on it.
const CONCURRENCY = 1024
const BOUND_MS = 180_000

export async function deleteAll (api: GatewayApi, base: string, ids: readonly string[]): Promise<MassDelete> {
  const wanted = new Set(ids)
  // Every exec is running, so every one has a process: fewer means the scan is blind, and "all
  // gone" would be measured before anything happened.
  const processesBefore = taggedProcesses(wanted).length
  if (processesBefore < ids.length) throw new Error(`the /proc scan found ${processesBefore} processes for ${ids.length} running execs`)
  const t0 = performance.now()
  let next = 0
  let answeredS = 0
  const answered = Promise.all(Array.from({ length: Math.min(CONCURRENCY, ids.length) }, async () => {
    while (next < ids.length) {
      const id = ids[next++]!
      const r = await api.json(base, 'DELETE', `/v1/execs/${id}`)
      if (r.status !== 204) throw new Error(`DELETE ${id}: ${r.status} ${JSON.stringify(r.body).slice(0, 300)}`)
    }
  })).then(() => { answeredS = (performance.now() - t0) / 1000 })
  // Polled while the DELETEs are in flight: the processes may be gone before the last answer.
  let gatewayZeroS: number | undefined
  let allGoneS: number | undefined
  let failure: unknown
  answered.catch((err: unknown) => { failure = err })
  while (allGoneS === undefined) {
    if (failure !== undefined) throw failure
    if (performance.now() - t0 > BOUND_MS) throw new Error(`${taggedProcesses(wanted).length} exec processes still there ${BOUND_MS / 1000} s after the DELETE of ${ids.length}`)
    if (taggedProcesses(wanted).length === 0) allGoneS = (performance.now() - t0) / 1000
    if (gatewayZeroS === undefined && await api.activeExecs(base).catch(() => -1) === 0) gatewayZeroS = (performance.now() - t0) / 1000
    if (allGoneS === undefined) await sleep(100)
  }
  await answered
  if (gatewayZeroS === undefined && await api.activeExecs(base) === 0) gatewayZeroS = (performance.now() - t0) / 1000
  return { processesBefore, allGoneS, answeredS, gatewayZeroS, concurrency: Math.min(CONCURRENCY, ids.length) }
}
