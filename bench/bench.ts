// The benchmark behind `npm run bench` (vitest.bench.config.ts). Everything is measured in one
// run, side by side with a peer on the same machine and the same OpenSSH sshd:
//
//   1. exec round trip (`true`, ?wait=true) through gateway + supervisor processes to OpenSSH,
//      interleaved with a fresh OpenSSH client running `true`; also the embedded daemon, the
//      in-process `local` sandbox, and --ssh-pool false;
//   2. execs per second with 50 concurrent clients (embedded, OpenSSH, and fresh ssh clients);
//   3. stdout throughput of a 256 MiB random file to a WebSocket client (binary subprotocol and
//      base64 JSON), sha256-checked, against `ssh … cat file > /dev/null`;
//   4. gateway RSS per held silent exec and its CPU while 500 / 1,000 of them idle;
//   5. sandbox-side memory per kept exec: the embedded daemon's supervisor process against the
//      sshd processes serving the same execs, silent and after unread output;
//   6. cluster mode: a forwarded exec (replica r1 → r0) against a direct one on r0.
//
// It prints a markdown table and writes bench/RESULTS.md (machine, date, exact commands). Goals
// missed are reported, not failed: the run fails only when something is wrong (a bad exit code,
// a checksum mismatch, an exec that did not start). Knobs and how to read it: bench/README.md.
//
// This file only runs the phases; the parts:
//   knobs.ts         the environment knobs, goals and fixed names
//   world.ts         the processes measured (setup) and the teardown
//   clients.ts       the gateway API, the hashing WebSocket reader, the ssh peer
//   proc.ts          what is read from /proc: CPU ticks, RSS, process trees, command lines
//   interference.ts  CPU used by processes outside the bench during each phase
//   profile.ts       the inspector: CPU profiles, heap snapshots, forced GCs
//   report.ts        progress lines, the table, RESULTS.md
//   phases/          one file per phase
import { afterAll, afterEach, beforeAll, beforeEach, describe, it } from 'vitest'
import { ForeignMeter } from './interference.js'
import { FILE_MIB, HOLD_STEPS, ONLY, RATE_CLIENTS, RATE_S, RESULTS_PATH } from './knobs.js'
import { CLUSTER_CLIENTS, CLUSTER_MIB, CLUSTER_RTT_N, clusterForwarding } from './phases/cluster.js'
import { heldExecs } from './phases/hold.js'
import { KEEP_N, keptExecs } from './phases/keep.js'
import { execRate } from './phases/rate.js'
import { roundTrip } from './phases/roundtrip.js'
import { throughput } from './phases/throughput.js'
import { loadAverage } from './proc.js'
import { World } from './world.js'

describe('exec-gateway benchmark', () => {
  const loadavgAtStart = loadAverage()
  const world = new World()

  beforeAll(async () => {
    try {
      await world.start()
    } catch (err) {
      world.results.failures.push(`setup: ${String(err).slice(0, 2000)}`)
      throw err
    }
  })

  // Per phase: CPU used outside the bench while it ran.
  let meter: ForeignMeter | undefined
  beforeEach(() => { meter = new ForeignMeter() })
  afterEach((ctx) => {
    if (meter === undefined) return
    const f = meter.stop()
    meter = undefined
    world.results.addInterference(ctx.task.name, f)
  })

  afterAll(async () => {
    await world.teardown()
    world.results.finish(RESULTS_PATH, loadavgAtStart)
  })

  it.runIf(ONLY.has('roundtrip'))('exec round trip: gateway vs a fresh OpenSSH client, interleaved', async () => {
    await roundTrip(world)
  })

  it.runIf(ONLY.has('rate'))(`execs per second, \`true\`, ${RATE_CLIENTS} concurrent clients for ${RATE_S} s`, async () => {
    await execRate(world)
  })

  it.runIf(ONLY.has('throughput'))(`stdout throughput: ${FILE_MIB} MiB of random bytes, WebSocket vs ssh cat`, async () => {
    await throughput(world)
  })

  it.runIf(ONLY.has('hold') && HOLD_STEPS.length > 0)(`held silent execs: ${HOLD_STEPS.join(' and ')} through one gateway`, async () => {
    await heldExecs(world)
  })

  it.runIf(ONLY.has('keep'))(`sandbox-side memory per kept exec: ${KEEP_N} at once, embedded daemon vs OpenSSH's sshd`, async () => {
    await keptExecs(world)
  })

  it.runIf(ONLY.has('cluster'))(`cluster mode, forwarded vs direct: ${CLUSTER_RTT_N} round trips, ${CLUSTER_CLIENTS} clients, ${CLUSTER_MIB} MiB streams, SSE first byte`, async () => {
    await clusterForwarding(world)
  })
})
