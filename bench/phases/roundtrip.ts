// Phase 1: exec round trip of `true` through the gateway, interleaved with a fresh OpenSSH client.
import { expect } from 'vitest'
import { median, percentile } from '../../test/helpers/stats.js'
import { CURVE_KEX, GOALS, RTT_N, RTT_WARMUP } from '../knobs.js'
import { fixed, log, ms } from '../report.js'
import type { World } from '../world.js'

type Kind = 'gwOssh' | 'ssh' | 'gwOsshNoPool' | 'sshCurve' | 'gwEmb' | 'gwEmbNoPool' | 'gwLocal'

export async function roundTrip (world: World): Promise<void> {
  const { api, profiler, results } = world
  const e = world.setup
  const sshTrue = async (what: string, options: string[] = []): Promise<number> => {
    const r = await e.ssh.run(['true'], { options, timeoutMs: 30_000 })
    if (r.code !== 0) throw new Error(`${what} true exited ${r.code}: ${r.stderr}`)
    return r.ms
  }
  const runners: Record<Kind, () => Promise<number>> = {
    gwOssh: async () => await api.execTrue(e.gwA.publicUrl, 'ossh'),
    ssh: async () => await sshTrue('ssh'),
    gwOsshNoPool: async () => await api.execTrue(e.gwB.publicUrl, 'ossh'),
    // The same client with the key exchange the gateway's ssh2 uses: OpenSSH 9's default
    // sntrup761x25519 alone costs the client and sshd ~90 ms of CPU here.
    sshCurve: async () => await sshTrue('ssh (curve25519)', ['-o', `KexAlgorithms=${CURVE_KEX}`]),
    gwEmb: async () => await api.execTrue(e.gwA.publicUrl, 'emb'),
    gwEmbNoPool: async () => await api.execTrue(e.gwB.publicUrl, 'emb'),
    gwLocal: async () => await api.execTrue(e.gwA.publicUrl, 'local')
  }
  const kinds = Object.keys(runners) as Kind[]
  const samples = Object.fromEntries(kinds.map((k) => [k, [] as number[]])) as Record<Kind, number[]>
  // A failed exec is counted and reported, not timed; the run goes on so the table is whole.
  const failed = Object.fromEntries(kinds.map((k) => [k, [] as string[]])) as Record<Kind, string[]>
  const attempt = async (k: Kind, into?: number[]): Promise<void> => {
    try {
      const t = await runners[k]()
      into?.push(t)
    } catch (err) {
      failed[k].push(String(err).slice(0, 300))
    }
  }
  for (let i = 0; i < RTT_WARMUP; i++) for (const k of kinds) await attempt(k)
  const t0 = Date.now()
  await profiler.profiled(e.gwA, 'roundtrip', async () => {
    for (let i = 0; i < RTT_N; i++) {
      // One of each per round, gateway and ssh alternating, so drift hits all of them alike.
      for (const k of kinds) await attempt(k, samples[k])
    }
  })
  log(`round trips: ${RTT_N} × ${kinds.length} in ${((Date.now() - t0) / 1000).toFixed(1)} s`)
  const med = (k: Kind): number => median(samples[k])
  const p90 = (k: Kind): number => percentile(samples[k], 0.9)
  const desc = (k: Kind): string => `median ${ms(med(k))} ms, p90 ${ms(p90(k))} ms${failed[k].length > 0 ? `, **${failed[k].length} of ${RTT_N + RTT_WARMUP} failed**` : ''}`
  const sshDesc = `fresh \`ssh … true\`: ${desc('ssh')}`
  const ratio = med('gwOssh') / med('ssh')
  const { rows } = results
  rows.push({
    what: `exec round trip \`true\` (?wait=true, n=${RTT_N}), gateway → supervisor → OpenSSH, pooled (default)`,
    gateway: desc('gwOssh'),
    peer: sshDesc,
    ratio: `${fixed(ratio, 3)} (p90 ${fixed(p90('gwOssh') / p90('ssh'), 3)})`,
    goal: `≤ ${GOALS.rttRatio.toFixed(2)}`,
    met: ratio <= GOALS.rttRatio
  })
  const curveDesc = `fresh \`ssh -o KexAlgorithms=${CURVE_KEX} … true\`: ${desc('sshCurve')}`
  rows.push({
    what: `the same, against an OpenSSH client with the gateway's key exchange (${CURVE_KEX})`,
    gateway: desc('gwOssh'),
    peer: curveDesc,
    ratio: `${fixed(med('gwOssh') / med('sshCurve'), 3)} (p90 ${fixed(p90('gwOssh') / p90('sshCurve'), 3)})`,
    goal: '—'
  })
  rows.push({
    what: 'the same with `--ssh-pool false` (one SSH connection per exec)',
    gateway: desc('gwOsshNoPool'),
    peer: `${sshDesc}; ${curveDesc}`,
    ratio: `${fixed(med('gwOsshNoPool') / med('ssh'), 3)}; ${fixed(med('gwOsshNoPool') / med('sshCurve'), 3)}`,
    goal: '—'
  })
  rows.push({
    what: 'exec round trip, embedded daemon via a supervisor process, pooled',
    gateway: desc('gwEmb'),
    peer: '—',
    ratio: `${ms(med('gwEmb'))} ms`,
    goal: `≤ ${GOALS.embeddedMedianMs} ms`,
    met: med('gwEmb') <= GOALS.embeddedMedianMs
  })
  rows.push({ what: 'exec round trip, embedded `local` sandbox (in the gateway process), pooled', gateway: desc('gwLocal'), peer: '—', ratio: `${ms(med('gwLocal'))} ms`, goal: '—' })
  rows.push({ what: 'exec round trip, embedded daemon via a supervisor process, `--ssh-pool false`', gateway: desc('gwEmbNoPool'), peer: '—', ratio: `${ms(med('gwEmbNoPool'))} ms`, goal: '—' })
  for (const k of kinds) {
    if (failed[k].length > 0) results.failures.push(`round trip ${k}: ${failed[k].length} of ${RTT_N + RTT_WARMUP} failed, e.g. ${failed[k][0]}`)
  }
  expect(kinds.filter((k) => failed[k].length > 0), 'kinds of round trip with failed execs').toEqual([])
}
