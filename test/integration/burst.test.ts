import { afterEach, describe, expect, it } from 'vitest'
import { createFaultKit } from '../helpers/fault-kit.js'
import { postJsonOnce } from '../helpers/http.js'
import { timed } from '../helpers/wait.js'
import type { TestGateway } from '../helpers/gateway.js'

// A burst of execs at one sandbox is queued behind a bounded number of SSH connection opens,
// never refused while the sandbox is below its running-exec cap: 500 at once all run, each with
// its own output and exit status (a mix-up between execs would show as a wrong pair).

// The default --max-pending-relays-per-sandbox (32) is the budget of connection opens.
const kit = createFaultKit({})
afterEach(async () => { await kit.cleanup() })

const BURST = 500

async function burst (g: TestGateway, sandboxId: string): Promise<{ ms: number, refused: number, wrong: string[] }> {
  const url = `${g.publicUrl}/v1/sandboxes/${sandboxId}/execs?wait=true`
  const { value: results, ms } = await timed(Promise.all(Array.from({ length: BURST }, async (_, i) =>
    await postJsonOnce(url, { command: ['sh', '-c', `printf %s ${i}; exit ${i % 256}`] }))))
  const wrong: string[] = []
  let refused = 0
  results.forEach((r, i) => {
    if (r.status === 429) refused++
    if (r.status !== 200 || r.body.status !== 'exited' || r.body.exitCode !== i % 256 || r.body.stdout !== String(i)) {
      wrong.push(`${i}: ${r.status} ${JSON.stringify(r.body).slice(0, 200)}`)
    }
  })
  return { ms, refused, wrong }
}

describe('burst of concurrent ?wait=true execs at one sandbox', () => {
  it.each([
    ['embedded daemon, pooled', 'embedded', true],
    ['embedded daemon, --ssh-pool false', 'embedded', false],
    ['OpenSSH, pooled', 'openssh', true],
    ['OpenSSH, --ssh-pool false', 'openssh', false]
  ] as const)(`${BURST} at once all run with their true exit, none 429 (%s)`, async (_label, daemon, sshPool) => {
    const g = await kit.gateway({ sshPool })
    const id = 'burst'
    await kit.sandbox(g, id, daemon)
    // The supervisor is asked for at most its pending-relay cap of relays at once; the rest wait.
    let peakPending = 0
    let peakQueued = 0
    const sampler = setInterval(() => {
      peakPending = Math.max(peakPending, g.gw.registry.pendingCount(id))
      peakQueued = Math.max(peakQueued, g.gw.pool.queued(id))
    }, 2)
    const r = await burst(g, id).finally(() => clearInterval(sampler))
    console.log(`burst ${daemon} pool=${String(sshPool)}: ${BURST} execs in ${(r.ms / 1000).toFixed(1)} s, ${r.refused} refused, ${r.wrong.length} wrong; peak ${peakPending} relays pending, ${peakQueued} execs queued for a connection`)
    expect(r.refused).toBe(0)
    expect(peakPending).toBeLessThanOrEqual(32)
    expect(r.wrong.slice(0, 5)).toEqual([])
    expect(r.wrong).toHaveLength(0)
    expect(g.gw.registry.pendingCount(id)).toBe(0)
  }, 60_000)
})
