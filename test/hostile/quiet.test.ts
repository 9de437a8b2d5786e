import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { expectHonestUnharmed, startHostileWorld, type HostileWorld } from './harness.js'
import { sleep } from '../helpers/wait.js'

// The control for every attack in this folder: with nothing hostile going on, the harness
// sees every honest exec succeed and its "attack" (none) within the bounds. If this fails,
// the attack tests say nothing.

describe('hostile harness, no attack', () => {
  let world: HostileWorld
  beforeAll(async () => { world = await startHostileWorld() })
  afterAll(async () => { await world?.stop() })

  it('runs the honest sandbox exactly, and an idle window changes nothing', async () => {
    const r = await world.underAttack('none (control)', async (signal) => {
      while (!signal.aborted) await sleep(50)
    }, { durationMs: 3000, quietMs: 2000 })
    expectHonestUnharmed(r, { maxRssBytes: 300 * 2 ** 20 })
    expect(r.quiet.failures).toEqual([])
    expect(r.quiet.ok).toBeGreaterThan(10)
  })
})
