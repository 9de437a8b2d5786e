// Phase: a burst of BURST_N concurrent `?wait=true` execs to one sandbox (OpenSSH via a supervisor,
// gateway A, default flags): each must run and answer with its own exit status, none be refused.
// A 429 (or any other refusal) is the goal missed; a wrong exit status is something wrong.
import { expect } from 'vitest'
import { median, percentile } from '../../test/helpers/stats.js'
import { BURST_N, GOALS } from '../knobs.js'
import { log, ms } from '../report.js'
import type { World } from '../world.js'

interface Answer { status: number, exitCode?: unknown, code?: unknown, detail?: unknown }

export async function burst (world: World): Promise<void> {
  const { api, results } = world
  const e = world.setup
  // Exit codes 0..255 (i mod 256): an answer carrying another exec's status is caught.
  const expected = (i: number): number => i % 256
  const answers: Array<{ status: number, body: Answer | undefined, error?: string }> = new Array(BURST_N)
  const lat: number[] = []
  const t0 = performance.now()
  // All at once: every request is sent before the first answer can come back.
  await Promise.all(Array.from({ length: BURST_N }, async (_, i) => {
    const s = performance.now()
    try {
      const r = await api.json<Answer | undefined>(e.gwA.publicUrl, 'POST', '/v1/sandboxes/ossh/execs?wait=true', { command: ['sh', '-c', `exit ${expected(i)}`] })
      answers[i] = { status: r.status, body: r.body }
      if (r.status === 200) lat.push(performance.now() - s)
    } catch (err) {
      answers[i] = { status: 0, body: undefined, error: String(err).slice(0, 300) }
    }
  }))
  const wallS = (performance.now() - t0) / 1000
  const ran = answers.filter((a, i) => a.status === 200 && a.body?.exitCode === expected(i)).length
  const wrongExit = answers.map((a, i) => ({ a, i })).filter(({ a, i }) => a.status === 200 && a.body?.exitCode !== expected(i))
  const refused429 = answers.filter((a) => a.status === 429)
  const other = answers.filter((a) => a.status !== 200 && a.status !== 429)
  const byKind = new Map<string, number>()
  for (const a of [...refused429, ...other]) {
    const k = a.error ?? `${a.status} ${String(a.body?.code ?? '')}`
    byKind.set(k, (byKind.get(k) ?? 0) + 1)
  }
  const kinds = [...byKind.entries()].map(([k, n]) => `${n} × ${k}`).join('; ')
  log(`burst of ${BURST_N}: ${ran} ran with their exit status, ${refused429.length} got 429, ${other.length} other, ${wrongExit.length} wrong exit status, in ${wallS.toFixed(1)} s${kinds === '' ? '' : ` (${kinds})`}`)
  const met = ran === BURST_N && refused429.length === 0
  results.rows.push({
    what: `${BURST_N} concurrent execs to one sandbox (\`sh -c 'exit <i mod 256>'\`, ?wait=true, all sent at once; gateway A, default flags, OpenSSH via supervisor)`,
    gateway: `${ran} ran with their true exit status, ${refused429.length} × 429, ${other.length + wrongExit.length} other; all answered in ${wallS.toFixed(1)} s${lat.length > 0 ? ` (answered 200: p50 ${ms(median(lat))} ms, max ${ms(percentile(lat, 1))} ms)` : ''}`,
    peer: '—',
    ratio: `${ran} of ${BURST_N}`,
    goal: BURST_N >= GOALS.burstAt ? `all ${BURST_N} run with their true exit, none 429` : '—',
    met: BURST_N >= GOALS.burstAt ? met : undefined
  })
  const example = refused429[0] ?? other[0]
  results.notes.push(`burst: ${BURST_N} POST …/execs?wait=true at once on the bench's keep-alive agent (up to 1,024 sockets); each checked for HTTP 200 and its own exit status${kinds === '' ? '' : `; refused or failed: ${kinds}${example === undefined ? '' : `, e.g. ${JSON.stringify(example.body ?? example.error).slice(0, 300)}`}`}`)
  if (wrongExit.length > 0) {
    results.failures.push(`burst: ${wrongExit.length} execs answered with another exit status, e.g. #${wrongExit[0]!.i}: ${JSON.stringify(wrongExit[0]!.a.body).slice(0, 300)}`)
  }
  expect(wrongExit.length, 'burst execs answered with a wrong exit status').toBe(0)
}
