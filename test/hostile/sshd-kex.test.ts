import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { expectHonestUnharmed, startHostileWorld, type HostileWorld } from './harness.js'
import { NO_RATE_LIMIT, refusalCounts, startHostileSandbox, type HostileSandbox } from './hostile-sshd.js'
import { GATEWAY_KEX } from '../../src/relay/ssh-guard.js'
import { sleep } from '../helpers/wait.js'

// Key exchanges a hostile sandbox SSH daemon chooses. Diffie-Hellman group exchange lets the
// daemon pick the modulus, and ssh2 never checks it: a 10000-bit one cost ~1.4 s of the
// gateway's event loop per exchange, as often as the daemon liked. The gateway offers only
// curve25519 and ECDH (fixed cost), and fails a connection whose daemon re-keys more than
// --ssh-max-rekeys-per-minute times. The attacks are paced (an exec every 100 ms): what is
// measured is the cost of each exchange, not of an exec flood, which the rate limit governs.
const PACE_MS = 100

describe('a sandbox SSH daemon that chooses the key exchange', () => {
  let world: HostileWorld
  let dhOnly: HostileSandbox
  let dhFirst: HostileSandbox
  beforeAll(async () => {
    world = await startHostileWorld({ extraArgs: NO_RATE_LIMIT })
    const dh = ['diffie-hellman-group-exchange-sha256', 'diffie-hellman-group-exchange-sha1', 'diffie-hellman-group18-sha512', 'diffie-hellman-group16-sha512', 'diffie-hellman-group14-sha256'] as const
    dhOnly = await startHostileSandbox(world, 'dh-only', { algorithms: { kex: [...dh] } })
    dhFirst = await startHostileSandbox(world, 'dh-first', { algorithms: { kex: [...dh, 'curve25519-sha256', 'ecdh-sha2-nistp256'] } })
  })
  afterAll(async () => {
    await dhOnly?.stop()
    await dhFirst?.stop()
    await world?.stop()
  })

  it('never offers group exchange or a fixed DH group: a daemon that speaks only those fails fast with ssh_failed', async () => {
    const results: Array<{ status: number, body: any, ms: number }> = []
    const r = await world.underAttack('kex: DH-GEX-only daemon', async (signal) => {
      while (!signal.aborted) { results.push(await dhOnly.exec(['true'], 10_000)); await sleep(PACE_MS) }
    })
    expectHonestUnharmed(r)
    expect(results.length).toBeGreaterThan(3)
    for (const e of results) {
      expect(e.status).toBe(502)
      expect(e.body).toMatchObject({ code: 'ssh_failed' })
      expect(e.body.detail).toMatch(/no matching key exchange/)
      expect(e.ms).toBeLessThan(3000)
    }
    expect(dhOnly.sshd.kexOffers.length).toBeGreaterThan(0)
    for (const offer of dhOnly.sshd.kexOffers) {
      expect(offer.filter((k) => k.startsWith('diffie-hellman'))).toEqual([])
      expect(offer.filter((k) => !k.startsWith('ext-info') && !k.startsWith('kex-strict'))).toEqual(GATEWAY_KEX)
    }
  })

  it('a daemon that prefers group exchange but also speaks curve25519 gets curve25519', async () => {
    const e = await dhFirst.exec(['sh', '-c', 'printf ok; exit 5'])
    expect(e.status).toBe(200)
    expect(e.body).toMatchObject({ stdout: 'ok', exitCode: 5 })
    expect(dhFirst.sshd.negotiatedKex.length).toBeGreaterThan(0)
    for (const kex of dhFirst.sshd.negotiatedKex) expect(kex).toBe('curve25519-sha256')
  })
})

describe('a sandbox SSH daemon that re-keys without end', () => {
  let world: HostileWorld
  let storm: HostileSandbox
  beforeAll(async () => {
    world = await startHostileWorld({ extraArgs: NO_RATE_LIMIT })
    storm = await startHostileSandbox(world, 'rekey-storm', {
      // Every completed exchange starts the next one, from the moment the gateway logged in.
      onReady: (c) => {
        const again = (): void => { setImmediate(() => { try { c.conn.rekey() } catch { /* gone */ } }) }
        c.conn.on('handshake', again)
        again()
      }
    })
  })
  afterAll(async () => {
    await storm?.stop()
    await world?.stop()
  })

  it('fails each connection once the daemon passes --ssh-max-rekeys-per-minute (10) with ssh_failed, and the honest sandbox does not notice', async () => {
    const before = await refusalCounts(world.publicUrl)
    const results: Array<{ status: number, body: any, ms: number }> = []
    const r = await world.underAttack('kex: re-key storm', async (signal) => {
      while (!signal.aborted) { results.push(await storm.exec(['sleep', '3'], 10_000)); await sleep(PACE_MS) }
    })
    expectHonestUnharmed(r)
    expect(results.length).toBeGreaterThan(3)
    for (const e of results) {
      expect(e.status).toBe(502)
      expect(e.body).toMatchObject({ code: 'ssh_failed' })
      expect(e.body.detail).toMatch(/started 11 key exchanges within a minute/)
      expect(e.ms).toBeLessThan(3000)
    }
    const after = await refusalCounts(world.publicUrl)
    expect(after.rekey_rate! - (before.rekey_rate ?? 0)).toBeGreaterThanOrEqual(results.length)
    // Each failed connection cost at most 11 exchanges of a few ms: the gateway stayed idle.
    expect(r.cpuSeconds / r.wallSeconds).toBeLessThan(0.9)
  })
})
