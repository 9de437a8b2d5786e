// The benchmark behind `npm run bench` (vitest.bench.config.ts). Everything is measured in one
// run, side by side with a peer on the same machine and the same OpenSSH sshd:
//
//   1. exec round trip (`true`, ?wait=true) through gateway + supervisor processes to OpenSSH,
//      interleaved with a fresh OpenSSH client running `true`; also the embedded daemon, the
//      in-process `local` sandbox, and --ssh-pool false;
//   2. the same as whole processes: `curl` through the gateway against `ssh -S` on a
//      ControlMaster (controlmaster);
//   3. execs per second with 50 concurrent clients (embedded, OpenSSH, and fresh ssh clients);
//   4. stdout throughput of a 256 MiB random file to a WebSocket client (binary subprotocol and
//      base64 JSON), sha256-checked, against `ssh … cat file > /dev/null` with OpenSSH's default
//      cipher and with aes128-gcm, and CPU per GiB against the ssh client's;
//   5. a burst of 500 concurrent execs to one sandbox (burst);
//   6. gateway RSS per held silent exec and its CPU while 500 / 1,000 of them idle, then the
//      DELETE of all of them at once until their processes are gone;
//   7. the same at fleet scale: 10,000 held across 100 sandboxes (fleet);
//   8. sandbox-side memory per kept exec: the embedded daemon's supervisor process against the
//      sshd processes serving the same execs, silent and after unread output;
//   9. cluster mode: a forwarded exec (replica r1 → r0) against a direct one on r0.
//
// It prints a markdown table and writes bench/RESULTS.md (machine, date, exact commands). Goals
// missed are reported, not failed: the run fails only when something is wrong (a bad exit code,
// a checksum mismatch, an exec that did not start). Knobs and how to read it: bench/README.md.
//
// This file only runs the phases; the parts:
//   knobs.ts         the environment knobs, goals and fixed names
//   world.ts         the processes measured (setup) and the teardown
//   clients.ts       the gateway API, the hashing WebSocket reader, curl, the ssh peer
//   ssh-master.ts    the OpenSSH ControlMaster peer
//   gateway-memory.ts  a gateway's RSS, V8 heap and idle CPU with execs held
//   mass-delete.ts   DELETE of many execs at once, until their processes are gone
//   proc.ts          what is read from /proc: CPU ticks, RSS, process trees, command lines
//   interference.ts  CPU used by processes outside the bench during each phase
//   profile.ts       the inspector: CPU profiles, heap snapshots, forced GCs
//   report.ts        progress lines, the table, RESULTS.md
//   phases/          one file per phase
import { afterAll, afterEach, beforeAll, beforeEach, describe, it } from 'vitest'
import { ForeignMeter } from './interference.js'
import { BURST_N, FILE_MIB, FLEET_PER_SANDBOX, FLEET_SANDBOXES, HOLD_STEPS, ONLY, RATE_CLIENTS, RATE_S, RESULTS_PATH, RTT_N } from './knobs.js'
import { burst } from './phases/burst.js'
import { CLUSTER_CLIENTS, CLUSTER_MIB, CLUSTER_RTT_N, clusterForwarding } from './phases/cluster.js'
import { controlMasterRoundTrip } from './phases/controlmaster.js'
import { fleet } from './phases/fleet.js'
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

  it.runIf(ONLY.has('controlmaster'))(`exec round trip, whole processes: curl through the gateway vs ssh -S on a ControlMaster, ${RTT_N} each interleaved`, async () => {
    await controlMasterRoundTrip(world)
  })

  it.runIf(ONLY.has('rate'))(`execs per second, \`true\`, ${RATE_CLIENTS} concurrent clients for ${RATE_S} s`, async () => {
    await execRate(world)
  })

  it.runIf(ONLY.has('throughput'))(`stdout throughput: ${FILE_MIB} MiB of random bytes, WebSocket vs ssh cat`, async () => {
    await throughput(world)
  })

  it.runIf(ONLY.has('burst'))(`a burst of ${BURST_N} concurrent execs to one sandbox`, async () => {
    await burst(world)
  })

  it.runIf(ONLY.has('hold') && HOLD_STEPS.length > 0)(`held silent execs: ${HOLD_STEPS.join(' and ')} through one gateway, then DELETE of all`, async () => {
    await heldExecs(world)
  })

  it.runIf(ONLY.has('fleet'))(`held silent execs at fleet scale: ${FLEET_SANDBOXES} sandboxes × ${FLEET_PER_SANDBOX}`, async () => {
    await fleet(world)
  })

  it.runIf(ONLY.has('keep'))(`sandbox-side memory per kept exec: ${KEEP_N} at once, embedded daemon vs OpenSSH's sshd`, async () => {
    await keptExecs(world)
  })

  it.runIf(ONLY.has('cluster'))(`cluster mode, forwarded vs direct: ${CLUSTER_RTT_N} round trips, ${CLUSTER_CLIENTS} clients, ${CLUSTER_MIB} MiB streams, SSE first byte`, async () => {
    await clusterForwarding(world)
  })
})
