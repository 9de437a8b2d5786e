import { createHash, randomBytes, randomUUID } from 'node:crypto'
import fc from 'fast-check'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { Directory, type DirectoryEvent, type DirectoryOptions } from '../../src/cluster/directory.js'
import type { RegisterResult } from '../../src/cluster/owners.js'
import { DIRECTORY_UNAVAILABLE, DirectoryUnavailable } from '../../src/cluster/redis-client.js'
import { startRedisServer, type RedisServer } from '../helpers/redis-server.js'
import { startTcpProxy } from '../helpers/tcp-proxy.js'
import { waitFor } from '../helpers/wait.js'

// The cluster directory (issue 14) against a real redis-server: supervisor registration decided
// by one fenced script as SessionRegistry decides it within one gateway, heartbeats, finished
// results written once, and every call bounded when Redis stops, restarts or loses its data.

// FC_SEED=s replays the property run (fast-check prints the seed of a failure).
const SEED = process.env.FC_SEED === undefined ? Date.now() % 2 ** 31 : Number(process.env.FC_SEED)

const MiB = 1024 * 1024

// Races a promise against a bound, so a hang fails the test with a message instead of timing
// it out silently.
async function within<T> (ms: number, p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => { reject(new Error(`${what} did not settle within ${ms} ms`)) }, ms)
    })])
  } finally {
    clearTimeout(timer)
  }
}

function sha256 (b: Buffer): string {
  return createHash('sha256').update(b).digest('hex')
}

describe('cluster directory (Redis)', () => {
  let redis: RedisServer
  const open: Directory[] = []
  const cleanups: Array<() => Promise<void>> = []

  beforeAll(async () => { redis = await startRedisServer() })
  afterAll(async () => { await redis?.stop() })
  afterEach(async () => {
    // A test that failed mid-pause must not leave Redis stopped for the next one.
    redis.resume()
    await within(5000, Promise.all(open.splice(0).map(async (d) => { await d.close() })), 'closing the directories')
    for (const c of cleanups.splice(0)) await within(5000, c(), 'a cleanup')
  })

  function directory (replicaId: string, opts: Partial<DirectoryOptions> & { prefix: string }): Directory {
    const d = new Directory({
      url: redis.url,
      replicaId,
      internalUrl: `http://127.0.0.1:1/${replicaId}`,
      publicUrl: `http://127.0.0.1:2/${replicaId}`,
      ...opts
    })
    open.push(d)
    return d
  }

  async function started (replicaId: string, opts: Partial<DirectoryOptions> & { prefix: string }): Promise<Directory> {
    const d = directory(replicaId, opts)
    await within(5000, d.start(), `starting ${replicaId}`)
    return d
  }

  function prefix (): string {
    return `test:${randomUUID()}:`
  }

  it('registration precedence: a newer instance wins, the one it replaced is refused while the newer owns, the same instance re-registers, the fence strictly rises', async () => {
    const p = prefix()
    const [r1, r2, r3] = await Promise.all([started('r1', { prefix: p }), started('r2', { prefix: p }), started('r3', { prefix: p })])
    const fences: number[] = []
    const ok = (res: RegisterResult): Extract<RegisterResult, { ok: true }> => {
      if (!res.ok) throw new Error(`registration refused: ${JSON.stringify(res)}`)
      fences.push(res.fence)
      return res
    }

    const a = ok(await r1.register({ sandboxId: 's', replicaId: 'r1', instanceId: 'A', sessionId: 'a1' }))
    expect(a.previous).toBeUndefined()
    expect(await r1.owner('s')).toMatchObject({ sandboxId: 's', replicaId: 'r1', instanceId: 'A', sessionId: 'a1', fence: a.fence, replicaLive: true })

    // A newer process on another replica takes the sandbox, and learns whom to tell.
    const b = ok(await r2.register({ sandboxId: 's', replicaId: 'r2', instanceId: 'B', sessionId: 'b1' }))
    expect(b.previous).toEqual({ replicaId: 'r1', sessionId: 'a1', fence: a.fence, instanceId: 'A' })

    // The replaced process never takes it back while B owns it, through any replica.
    for (const r of [r1, r2, r3]) {
      const refused = await r.register({ sandboxId: 's', replicaId: r.replicaId, instanceId: 'A', sessionId: 'a2' })
      expect(refused).toEqual({ ok: false, reason: 'superseded', owner: { replicaId: 'r2', sessionId: 'b1', fence: b.fence, instanceId: 'B' } })
    }
    expect((await r1.owner('s'))?.sessionId).toBe('b1')

    // B reconnecting (a new session, another replica) wins.
    const b2 = ok(await r3.register({ sandboxId: 's', replicaId: 'r3', instanceId: 'B', sessionId: 'b2' }))
    expect(b2.previous).toEqual({ replicaId: 'r2', sessionId: 'b1', fence: b.fence, instanceId: 'B' })

    // A process that does not say which it is always wins; A stays refused.
    const anon = ok(await r1.register({ sandboxId: 's', replicaId: 'r1', instanceId: undefined, sessionId: 'x1' }))
    expect(anon.previous?.instanceId).toBe('B')
    expect((await r2.register({ sandboxId: 's', replicaId: 'r2', instanceId: 'A', sessionId: 'a3' })).ok).toBe(false)
    expect((await r2.register({ sandboxId: 's', replicaId: 'r2', instanceId: 'B', sessionId: 'b3' })).ok).toBe(false)
    const anon2 = ok(await r2.register({ sandboxId: 's', replicaId: 'r2', instanceId: undefined, sessionId: 'x2' }))
    expect(anon2.previous).toEqual({ replicaId: 'r1', sessionId: 'x1', fence: anon.fence, instanceId: undefined })

    // Once the owner released (its session ended), the sandbox is free, as in one gateway.
    expect(await r2.release({ sandboxId: 's', replicaId: 'r2', fence: anon2.fence })).toBe(true)
    expect(await r1.owner('s')).toBeUndefined()
    const back = ok(await r1.register({ sandboxId: 's', replicaId: 'r1', instanceId: 'A', sessionId: 'a4' }))
    expect(back.previous).toBeUndefined()

    for (let i = 1; i < fences.length; i++) expect(fences[i]).toBeGreaterThan(fences[i - 1]!)
  })

  it('remembers at most 16 replaced processes per sandbox, dropping the oldest', async () => {
    const p = prefix()
    const r = await started('r1', { prefix: p })
    for (let i = 0; i < 20; i++) {
      expect((await r.register({ sandboxId: 's', replicaId: 'r1', instanceId: `I${i}`, sessionId: `s${i}` })).ok).toBe(true)
    }
    // I19 owns; I3..I18 are the 16 newest replaced (I0..I2 dropped). I0 looks like a new process.
    for (let i = 3; i <= 18; i++) {
      expect((await r.register({ sandboxId: 's', replicaId: 'r1', instanceId: `I${i}`, sessionId: 'again' })).ok).toBe(false)
    }
    expect((await r.register({ sandboxId: 's', replicaId: 'r1', instanceId: 'I0', sessionId: 'back' })).ok).toBe(true)
  })

  it('concurrent registrations from several replicas: one owner at a time, and the fence order is a valid history of the sequential rule', async () => {
    const p = prefix()
    const replicas = await Promise.all([0, 1, 2, 3].map(async (i) => await started(`r${i}`, { prefix: p })))
    const instances = ['A', 'B', 'C', 'D', 'E']
    const op = fc.record({
      replica: fc.integer({ min: 0, max: replicas.length - 1 }),
      instance: fc.option(fc.constantFrom(...instances), { nil: undefined, freq: 6 }),
      delayMs: fc.integer({ min: 0, max: 4 })
    })
    console.log(`[cluster-directory] fast-check seed ${SEED} (FC_SEED=${SEED} replays)`)
    await fc.assert(fc.asyncProperty(fc.array(op, { minLength: 2, maxLength: 24 }), async (ops) => {
      const sandboxId = `s-${randomUUID()}`
      const observed: number[] = []
      const monitoring = { on: true }
      const monitor = (async () => {
        while (monitoring.on) {
          const o = await replicas[0]!.owner(sandboxId)
          if (o !== undefined) observed.push(o.fence)
        }
      })()
      const results = await within(10_000, Promise.all(ops.map(async (o, i) => {
        await new Promise((resolve) => setTimeout(resolve, o.delayMs))
        const res = await replicas[o.replica]!.register({ sandboxId, replicaId: `r${o.replica}`, instanceId: o.instance, sessionId: `session-${i}` })
        return { ...o, i, res }
      })), 'the concurrent registrations')
      monitoring.on = false
      await within(5000, monitor, 'the owner monitor')

      // Replay the winners in fence order through the sequential rule (SessionRegistry's), with
      // every refusal placed right after the registration whose owner it saw.
      const wins = results.filter((r) => r.res.ok).sort((x, y) => fence(x.res) - fence(y.res))
      const refusals = results.filter((r) => !r.res.ok)
      expect(wins.length).toBeGreaterThan(0)
      let owner: { instance: string | undefined, fence: number, session: string, replica: number } | undefined
      const superseded: string[] = []
      for (const w of wins) {
        if (!w.res.ok) throw new Error('unreachable')
        if (owner !== undefined && w.instance !== undefined && owner.instance !== w.instance) expect(superseded).not.toContain(w.instance)
        expect(w.res.previous === undefined ? undefined : w.res.previous.fence).toBe(owner?.fence)
        if (owner !== undefined) expect(w.res.previous).toEqual({ replicaId: `r${owner.replica}`, sessionId: owner.session, fence: owner.fence, instanceId: owner.instance })
        if (w.instance !== undefined && superseded.includes(w.instance)) superseded.splice(superseded.indexOf(w.instance), 1)
        if (owner?.instance !== undefined && owner.instance !== w.instance) {
          if (superseded.includes(owner.instance)) superseded.splice(superseded.indexOf(owner.instance), 1)
          superseded.push(owner.instance)
        }
        for (const r of refusals) {
          if (r.res.ok || r.res.owner.fence !== w.res.fence) continue
          // Refused while this one owned: it had been replaced before.
          expect(r.instance).toBeDefined()
          expect(r.instance).not.toBe(w.instance)
          expect(superseded).toContain(r.instance)
        }
        owner = { instance: w.instance, fence: w.res.fence, session: `session-${w.i}`, replica: w.replica }
      }
      for (const r of refusals) {
        if (r.res.ok) continue
        expect(wins.map((w) => fence(w.res))).toContain(r.res.owner.fence)
      }
      // Fences strictly rise and are unique; reads never go back; the record is the last winner.
      const fences = wins.map((w) => fence(w.res))
      expect(new Set(fences).size).toBe(fences.length)
      for (let i = 1; i < observed.length; i++) expect(observed[i]).toBeGreaterThanOrEqual(observed[i - 1]!)
      for (const f of observed) expect(fences).toContain(f)
      const final = await replicas[1]!.owner(sandboxId)
      expect(final?.fence).toBe(owner?.fence)
      expect(final?.sessionId).toBe(owner?.session)
    }), { numRuns: 40, seed: SEED })
  })

  it('release clears the record only with the current fence', async () => {
    const p = prefix()
    const [r1, r2] = await Promise.all([started('r1', { prefix: p }), started('r2', { prefix: p })])
    const a = await r1.register({ sandboxId: 's', replicaId: 'r1', instanceId: 'A', sessionId: 'a' })
    const b = await r2.register({ sandboxId: 's', replicaId: 'r2', instanceId: 'B', sessionId: 'b' })
    if (!a.ok || !b.ok) throw new Error('registrations refused')
    // The replaced owner's release (its session closing late) leaves the new owner alone.
    expect(await r1.release({ sandboxId: 's', replicaId: 'r1', fence: a.fence })).toBe(false)
    expect(await r2.release({ sandboxId: 's', replicaId: 'r2', fence: a.fence })).toBe(false)
    expect(await r2.release({ sandboxId: 's', replicaId: 'r1', fence: b.fence })).toBe(false)
    expect((await r1.owner('s'))?.fence).toBe(b.fence)
    expect(await r2.release({ sandboxId: 's', replicaId: 'r2', fence: b.fence })).toBe(true)
    expect(await r1.owner('s')).toBeUndefined()
    expect(await r2.release({ sandboxId: 's', replicaId: 'r2', fence: b.fence })).toBe(false)
  })

  it('a replica that stops heartbeating leaves replicas() after its TTL; its owner records stay, marked not live', async () => {
    const p = prefix()
    const ttl = 600
    const quiet = await started('quiet', { prefix: p, replicaTtlMs: ttl })
    const steady = await started('steady', { prefix: p, replicaTtlMs: ttl })
    const gone = await started('gone', { prefix: p, replicaTtlMs: ttl })
    expect((await steady.replicas()).map((r) => r.replicaId)).toEqual(['gone', 'quiet', 'steady'])
    expect(await steady.replica('quiet')).toEqual({ replicaId: 'quiet', internalUrl: 'http://127.0.0.1:1/quiet', publicUrl: 'http://127.0.0.1:2/quiet', startedAt: expect.any(String) })
    const reg = await quiet.register({ sandboxId: 'q', replicaId: 'quiet', instanceId: 'Q', sessionId: 'q1' })
    expect(reg.ok).toBe(true)
    await steady.register({ sandboxId: 't', replicaId: 'steady', instanceId: 'T', sessionId: 't1' })

    // Heartbeats keep a replica listed well past its TTL.
    await new Promise((resolve) => setTimeout(resolve, 3 * ttl))
    expect((await steady.replicas()).map((r) => r.replicaId)).toEqual(['gone', 'quiet', 'steady'])

    // A close that deletes its heartbeat leaves at once; one that stops (as a crash) after the TTL.
    await gone.close()
    expect((await steady.replicas()).map((r) => r.replicaId)).toEqual(['quiet', 'steady'])
    const stoppedAt = Date.now()
    await quiet.close({ deleteHeartbeat: false })
    expect(await steady.replica('quiet')).toBeDefined()
    await waitFor(async () => (await steady.replica('quiet')) === undefined, { timeoutMs: ttl + 1500, description: 'the quiet replica to expire' })
    expect(Date.now() - stoppedAt).toBeGreaterThanOrEqual(ttl - 250)
    expect((await steady.replicas()).map((r) => r.replicaId)).toEqual(['steady'])

    expect(await steady.owner('q')).toMatchObject({ replicaId: 'quiet', sessionId: 'q1', replicaLive: false })
    const owners = await steady.owners()
    expect(owners.map((o) => [o.sandboxId, o.replicaId, o.replicaLive])).toEqual([['q', 'quiet', false], ['t', 'steady', true]])
  })

  it('owners() and replicas() page through many keys with SCAN and see only their prefix', async () => {
    const p = prefix()
    const r = await started('r1', { prefix: p })
    const other = await started('r1', { prefix: prefix() })
    await other.register({ sandboxId: 'elsewhere', replicaId: 'r1', instanceId: 'X', sessionId: 'x' })
    const ids = Array.from({ length: 1200 }, (_, i) => `sb-${String(i).padStart(4, '0')}`)
    for (let i = 0; i < ids.length; i += 100) {
      await Promise.all(ids.slice(i, i + 100).map(async (id) => await r.register({ sandboxId: id, replicaId: 'r1', instanceId: 'I', sessionId: id })))
    }
    const owners = await r.owners()
    expect(owners.map((o) => o.sandboxId)).toEqual(ids)
    expect(owners.every((o) => o.replicaLive && o.replicaId === 'r1')).toBe(true)
    expect((await r.replicas()).map((x) => x.replicaId)).toEqual(['r1'])
  })

  it('finished results: exact bytes back, capped tails, and the first terminal write wins', async () => {
    const p = prefix()
    const r1 = await started('r1', { prefix: p, finishedCapBytes: MiB })
    const r2 = await started('r2', { prefix: p, finishedCapBytes: MiB })
    const stdout = randomBytes(MiB + 300_000)
    const stderr = randomBytes(70_000)
    const record = { id: 'ex_1', status: 'exited', exitCode: 7, signal: null, text: 'naïve ✓' }
    expect(await r1.putFinished('ex_1', { record, stdout, stderr, stderrOffset: 12, stderrTruncated: true }, 60_000)).toBe('written')

    const got = await r2.finished('ex_1')
    expect(got?.record).toEqual(record)
    expect(got?.stdout.length).toBe(MiB)
    expect(sha256(got!.stdout)).toBe(sha256(stdout.subarray(300_000)))
    expect(got?.stdoutOffset).toBe(300_000)
    expect(got?.stdoutTruncated).toBe(true)
    expect(sha256(got!.stderr)).toBe(sha256(stderr))
    expect(got?.stderrOffset).toBe(12)
    expect(got?.stderrTruncated).toBe(true)

    // The same write again (a retry) is 'same'; a different one (a late exit after a 503) loses.
    expect(await r2.putFinished('ex_1', { record, stdout, stderr, stderrOffset: 12, stderrTruncated: true }, 60_000)).toBe('same')
    expect(await r2.putFinished('ex_1', { record: { ...record, exitCode: 0 }, stdout, stderr }, 60_000)).toBe('conflict')
    expect(await r1.putFinished('ex_1', { record, stdout: Buffer.from('x'), stderr }, 60_000)).toBe('conflict')
    expect((await r1.finished('ex_1'))?.record).toEqual(record)
    expect(sha256((await r1.finished('ex_1'))!.stdout)).toBe(sha256(stdout.subarray(300_000)))

    // Empty and binary streams, under the cap, come back byte for byte, then expire with the TTL.
    const bin = Buffer.from([0, 255, 13, 10, 0xc3, 0x28])
    expect(await r1.putFinished('ex_2', { record: { id: 'ex_2' }, stdout: bin, stderr: Buffer.alloc(0) }, 400)).toBe('written')
    const two = await r2.finished('ex_2')
    expect(two?.stdout.equals(bin)).toBe(true)
    expect(two?.stderr.length).toBe(0)
    expect(two?.stdoutTruncated).toBe(false)
    await waitFor(async () => (await r2.finished('ex_2')) === undefined, { timeoutMs: 2000, description: 'ex_2 to expire' })
    expect(await r2.finished('never')).toBeUndefined()

    // The exec index, with its TTL.
    await r1.putExecOwner('ex_3', { replicaId: 'r1', sandboxId: 's' }, 400)
    expect(await r2.execOwner('ex_3')).toEqual({ replicaId: 'r1', sandboxId: 's' })
    await waitFor(async () => (await r2.execOwner('ex_3')) === undefined, { timeoutMs: 2000, description: 'ex_3 to expire' })
  })

  it('Redis SIGSTOPped past the command bound: every call rejects with directory_unavailable within the bound, and works again after SIGCONT', async () => {
    const p = prefix()
    const boundMs = 300
    const slackMs = 400
    const d = await started('r1', { prefix: p, commandTimeoutMs: boundMs, replicaTtlMs: 3000 })
    const reg = await d.register({ sandboxId: 's', replicaId: 'r1', instanceId: 'A', sessionId: 'a' })
    if (!reg.ok) throw new Error('refused')
    const events: DirectoryEvent[] = []
    d.onEvent((e) => { events.push(e) })
    const calls: Array<[string, () => Promise<unknown>]> = [
      ['register', async () => await d.register({ sandboxId: 's', replicaId: 'r1', instanceId: 'A', sessionId: 'a' })],
      ['owner', async () => await d.owner('s')],
      ['owners', async () => await d.owners()],
      ['replicas', async () => await d.replicas()],
      ['heartbeat', async () => await d.heartbeat()],
      ['putExecOwner', async () => { await d.putExecOwner('e', { replicaId: 'r1', sandboxId: 's' }) }],
      ['finished', async () => await d.finished('e')],
      ['putFinished', async () => await d.putFinished('e', { record: {}, stdout: Buffer.alloc(10), stderr: Buffer.alloc(0) }, 1000)],
      ['release', async () => await d.release({ sandboxId: 'nope', replicaId: 'r1', fence: 1 })]
    ]
    redis.pause()
    const pausedAt = Date.now()
    let n = 0
    // Longer than the socket timeout (3 bounds), so calls meet a stalled socket, a dropped one and
    // reconnects to a server that accepts but never answers.
    while (Date.now() - pausedAt < 3500) {
      const [name, call] = calls[n++ % calls.length]!
      const t0 = performance.now()
      const err = await within(boundMs + 2000, call().then(() => undefined, (e: unknown) => e), `${name} while Redis is stopped`)
      const ms = performance.now() - t0
      expect(err, `${name} should fail while Redis is stopped`).toBeInstanceOf(DirectoryUnavailable)
      expect((err as DirectoryUnavailable).code).toBe(DIRECTORY_UNAVAILABLE)
      expect(ms, `${name} took ${ms} ms`).toBeLessThan(boundMs + slackMs)
    }
    expect(n).toBeGreaterThanOrEqual(calls.length)
    // The connection was ready and silent: the watchdog dropped it for a new one.
    expect(events.filter((e) => e.type === 'connection-replaced').length).toBeGreaterThanOrEqual(1)
    const resumedAt = events.length
    redis.resume()
    // A write that timed out has an unknown outcome: the registrations sent into the stopped Redis
    // run once it resumes, so the fence may have risen, but only by A's own re-registrations.
    await waitFor(async () => (await d.owner('s'))?.instanceId === 'A', { timeoutMs: 5000, description: 'the directory to answer again after SIGCONT' })
    expect((await d.owner('s'))!.fence).toBeGreaterThanOrEqual(reg.fence)
    expect(events.some((e) => e.type === 'error')).toBe(true)
    // The directory re-publishes by itself (a new connection, or its heartbeat key expired
    // during the pause) and keeps A's registration as its own, at whatever fence it now has:
    // the caller's release with the fence it was given still clears it.
    await waitFor(() => events.slice(resumedAt).some((e) => e.type === 'republished'), { timeoutMs: 5000, description: 'a re-publish after SIGCONT' })
    expect(events.slice(resumedAt).find((e) => e.type === 'republished')).toEqual({ type: 'republished', restored: [], lost: [] })
    expect(await d.release({ sandboxId: 's', replicaId: 'r1', fence: reg.fence })).toBe(true)
    expect(await d.owner('s')).toBeUndefined()
    for (const [name, call] of calls) await within(2000, call(), `${name} after SIGCONT`)
  })

  it('close() resolves within its bound while Redis is stopped', async () => {
    const d = await started('r1', { prefix: prefix(), commandTimeoutMs: 300 })
    redis.pause()
    const t0 = performance.now()
    await within(2000, d.close(), 'close while Redis is stopped')
    expect(performance.now() - t0).toBeLessThan(800)
    redis.resume()
  })

  it('a directory whose Redis is not there yet rejects start() within the bound and connects by itself later', async () => {
    const proxy = await startTcpProxy({ targetHost: '127.0.0.1', targetPort: redis.port })
    cleanups.push(async () => { await proxy.close() })
    proxy.blackholeAll()
    const p = prefix()
    const d = directory('late', { prefix: p, url: `redis://127.0.0.1:${proxy.port}`, commandTimeoutMs: 200, reconnectMaxMs: 300 })
    const err = await within(3000, d.start(600).then(() => undefined, (e: unknown) => e), 'start without Redis')
    expect((err as DirectoryUnavailable).code).toBe(DIRECTORY_UNAVAILABLE)
    const err2 = await within(2000, d.owner('s').then(() => undefined, (e: unknown) => e), 'owner without Redis')
    expect((err2 as DirectoryUnavailable).code).toBe(DIRECTORY_UNAVAILABLE)
    proxy.setMode('pass')
    const watcher = await started('watcher', { prefix: p })
    await waitFor(async () => (await watcher.replica('late')) !== undefined, { timeoutMs: 5000, description: 'the late replica to heartbeat' })
    await within(3000, d.start(), 'start once Redis is there')
  })

  it('Redis restarted empty: each directory re-publishes its heartbeat and owner records by itself, never over a newer owner', async () => {
    const p = prefix()
    // A reaches Redis through a proxy, so the test decides when it comes back.
    const proxy = await startTcpProxy({ targetHost: '127.0.0.1', targetPort: redis.port })
    cleanups.push(async () => { await proxy.close() })
    const a = await started('a', { prefix: p, url: `redis://127.0.0.1:${proxy.port}`, commandTimeoutMs: 300, reconnectMaxMs: 300, replicaTtlMs: 3000 })
    const b = await started('b', { prefix: p, commandTimeoutMs: 300, reconnectMaxMs: 300, replicaTtlMs: 3000 })
    const aEvents: DirectoryEvent[] = []
    const bEvents: DirectoryEvent[] = []
    a.onEvent((e) => { aEvents.push(e) })
    b.onEvent((e) => { bEvents.push(e) })
    const a1 = await a.register({ sandboxId: 's1', replicaId: 'a', instanceId: 'I1', sessionId: 'a-s1' })
    const a2 = await a.register({ sandboxId: 's2', replicaId: 'a', instanceId: 'I2', sessionId: 'a-s2' })
    const a3 = await a.register({ sandboxId: 's3', replicaId: 'a', instanceId: 'I3', sessionId: 'a-s3' })
    await a.register({ sandboxId: 's1', replicaId: 'a', instanceId: 'I1new', sessionId: 'a-s1b' })
    const b4 = await b.register({ sandboxId: 's4', replicaId: 'b', instanceId: 'I4', sessionId: 'b-s4' })
    if (!a1.ok || !a2.ok || !a3.ok || !b4.ok) throw new Error('refused')
    // s3's session ends while Redis is away: its release must not come back as a record.
    proxy.blackholeAll()
    const released = await within(2000, a.release({ sandboxId: 's3', replicaId: 'a', fence: a3.fence }).then(() => undefined, (e: unknown) => e), 'release with Redis away')
    expect((released as DirectoryUnavailable).code).toBe(DIRECTORY_UNAVAILABLE)

    await within(15_000, redis.restart(), 'restarting redis')
    const c = await started('c', { prefix: p })
    // Meanwhile a new supervisor process for s2 registered through replica c.
    const c2 = await c.register({ sandboxId: 's2', replicaId: 'c', instanceId: 'I2next', sessionId: 'c-s2' })
    if (!c2.ok) throw new Error('refused')
    expect(c2.previous).toBeUndefined()
    // Fences keep rising across the data loss.
    expect(c2.fence).toBeGreaterThan(a2.fence)

    // b reaches Redis directly: it comes back by itself.
    await waitFor(async () => (await c.replica('b')) !== undefined && (await c.owner('s4'))?.fence === b4.fence, { timeoutMs: 5000, description: 'b to re-publish' })
      .catch((err: Error) => { throw new Error(`${err.message}; b's events: ${JSON.stringify(bEvents.map((e) => e.type === 'error' ? e.error.message : e))}`) })
    expect(bEvents).toContainEqual({ type: 'republished', restored: ['s4'], lost: [] })
    expect(await c.replica('a')).toBeUndefined()

    proxy.setMode('pass')
    await waitFor(() => aEvents.some((e) => e.type === 'republished'), { timeoutMs: 5000, description: 'a to re-publish' })
    expect(aEvents.filter((e) => e.type === 'republished')[0]).toEqual({ type: 'republished', restored: ['s1'], lost: ['s2'] })
    expect(await c.replica('a')).toBeDefined()
    const owners = await c.owners()
    expect(owners.map((o) => [o.sandboxId, o.replicaId, o.sessionId, o.replicaLive])).toEqual([
      ['s1', 'a', 'a-s1b', true],
      ['s2', 'c', 'c-s2', true],
      ['s4', 'b', 'b-s4', true]
    ])
    // What s1 had superseded survives the loss: the replaced process stays refused.
    expect((await c.register({ sandboxId: 's1', replicaId: 'c', instanceId: 'I1', sessionId: 'stale' })).ok).toBe(false)
    // a released its record for s2 only in its own books: c's record is untouched by later releases.
    expect(await a.release({ sandboxId: 's2', replicaId: 'a', fence: a2.fence })).toBe(false)
    expect((await c.owner('s2'))?.sessionId).toBe('c-s2')
  })
})

function fence (r: RegisterResult): number {
  return r.ok ? r.fence : -1
}
