// The soak: many agents run long, mostly silent execs with bursts of output against a real
// gateway process and real supervisor processes, while a chaos loop kills, stops, blackholes and
// resets the supervisors and SIGKILLs and restarts the gateway. A few percent of the execs take
// large shapes: megabyte bursts on both streams with nobody attached, readers that attach late or
// stop reading, stdin floods. Every exec must end within
// its bound with its true exit status (exact output, exact code) or an honest error (503
// relay_unavailable / sandbox_unavailable, or the other bounded errors of docs/api.md §5: 502
// ssh_failed, 504 relay_open_timeout, 429), never a hang, never a made-up exit; and where the
// embedded daemon keeps its execs, the faults it bridges must end with the true exit.
// How to run it and read it: soak/README.md. The parts: run.ts (set up, load under chaos, drain),
// summary.ts (the verdict), knobs.ts (settings, seeded randomness),
// plans.ts (what each exec runs and must print), expected.ts (the byte-exact check), clients.ts
// (HTTP, NDJSON, SSE, WebSocket), world.ts (sandboxes, cleanup, chaos), execs.ts (one exec, start to
// verdict; the agents), resume.ts (clients through a gateway restart), gateway.ts (the gateway
// process), cluster.ts (SOAK_REPLICAS > 1: replicas, haproxy, redis; replica kill and drain),
// outcomes.ts (what each fault may cause, per daemon), report.ts (verdicts and tables).
import { describe, expect, it, afterAll } from 'vitest'
import { AGENTS, DURATION_S, SANDBOXES } from './knobs.js'
import { awaitDrain, runUnderChaos, setUpWorld } from './run.js'
import { summarize } from './summary.js'
import { cleanupAll, log } from './world.js'

declare module 'vitest' {
  interface TaskMeta { soakLine?: string }
}

describe('soak', () => {
  afterAll(async () => { await cleanupAll() }, 120_000)

  it(`${AGENTS} agents × ${SANDBOXES} sandboxes for ${DURATION_S} s under chaos: true exit or honest error, never a hang`, async ({ task }) => {
    try {
      const g = await setUpWorld()
      const load = await runUnderChaos(g)
      const left = await awaitDrain(g)
      const { out, failures, line } = summarize(g, load, left)
      log(out.join('\n'))
      task.meta.soakLine = line
      expect(failures).toEqual([])
    } finally {
      await cleanupAll()
    }
  }, (DURATION_S + 300) * 1000)
})
