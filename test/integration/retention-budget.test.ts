import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startGateway, type TestGateway } from '../helpers/gateway.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { api, execWait, readEvents } from '../helpers/api.js'
import { waitFor } from '../helpers/wait.js'

// Issue 17, retention budgets through a real gateway and two real supervisors (embedded daemon):
// sandbox A runs 20 execs of 1 MiB per stream against budgets of 1 MiB per exec and stream,
// 4 MiB per sandbox and 5 MiB in total. A's oldest output goes (a gap, `*Truncated: true`), its
// newest stays whole, and sandbox B, holding less than A, keeps every byte of its finished exec.

const MiB = 1024 * 1024
const A = 'budget-a'
const B = 'budget-b'
const EXECS = 20

// `yes <word> | head -c n`: a pattern that says whose bytes these are and where they are.
const pattern = (word: string, n: number): string => `${word}\n`.repeat(Math.ceil(n / (word.length + 1))).slice(0, n)
const printBoth = (out: string, err: string): string =>
  `yes ${out} | head -c ${MiB}; sleep 0.2; yes ${err} | head -c ${MiB} >&2`

const outputOf = (events: any[], stream: string): string => events.filter((e) => e.type === stream).map((e) => e.data).join('')

describe('retention budgets per sandbox and in total', () => {
  let g: TestGateway
  const sups: SupervisorProcess[] = []
  let flagDir: string

  beforeAll(async () => {
    flagDir = mkdtempSync(join(tmpdir(), 'egw-budget-'))
    g = await startGateway({ retentionBytes: MiB, retentionBytesPerSandbox: 4 * MiB, retentionBytesTotal: 5 * MiB })
    for (const id of [A, B]) sups.push(startSupervisorProcess({ gatewayUrl: g.supervisorUrl, sandboxId: id, token: g.token(id) }))
    await g.waitConnected(A)
    await g.waitConnected(B)
  })
  afterAll(async () => {
    // Releases any exec still waiting for the flag, whatever failed.
    try { writeFileSync(join(flagDir, 'go'), '') } catch { /* dir gone */ }
    for (const s of sups) await s.stop()
    await g?.close()
    rmSync(flagDir, { recursive: true, force: true })
  })

  it('A\'s oldest output is dropped first, its newest and B\'s finished exec stay whole, /metrics stays within the total', async () => {
    const b = await execWait(g.publicUrl, B, { command: ['sh', '-c', printBoth('bout', 'berr')] })
    expect(b.status).toBe(200)
    expect(b.body.stdout).toBe(pattern('bout', MiB))
    expect(b.body.stderr).toBe(pattern('berr', MiB))

    // Each exec prints, then waits for the flag: all 20 hold their output at once, and they are
    // created one after another (each once the previous one has printed), so "oldest" is exact.
    const flag = join(flagDir, 'go')
    const results: Array<Promise<Awaited<ReturnType<typeof execWait>>>> = []
    const ids: string[] = []
    for (let i = 0; i < EXECS; i++) {
      const script = `${printBoth(`out${i}`, `err${i}`)}; while [ ! -e ${flag} ]; do sleep 0.05; done`
      results.push(execWait(g.publicUrl, A, { command: ['sh', '-c', script], timeoutSeconds: 60 }))
      await waitFor(async () => {
        const list = (await api(g.publicUrl, 'GET', `/v1/execs?sandboxId=${A}`)).body.execs as any[]
        const mine = list.find((e) => e.command[2] === script)
        if (mine === undefined || mine.stdoutBytes !== MiB || mine.stderrBytes !== MiB) return false
        ids[i] = mine.id
        return true
      }, { timeoutMs: 20_000, intervalMs: 20, description: `exec ${i} to print 1 MiB on each stream` })
      expect(g.gw.execs.retainedBytesBy(A)).toBeLessThanOrEqual(4 * MiB)
      expect(g.gw.execs.retainedBytes).toBeLessThanOrEqual(5 * MiB)
    }
    // A is the biggest holder: the total's last MiB comes out of A, not out of B.
    expect(g.gw.execs.retainedBytesBy(B)).toBe(2 * MiB)
    expect(g.gw.execs.retainedBytesBy(A)).toBe(3 * MiB)

    writeFileSync(flag, '')
    const done = await Promise.all(results)
    for (const [i, r] of done.entries()) {
      expect(r.status, `exec ${i}`).toBe(200)
      expect(r.body.exitCode, `exec ${i}`).toBe(0)
    }
    // The newest exec is whole; the one before it lost its stdout (it arrived before its
    // stderr); all older ones lost everything.
    expect(done[19]!.body).toMatchObject({ stdout: pattern('out19', MiB), stderr: pattern('err19', MiB), stdoutTruncated: false, stderrTruncated: false })
    expect(done[18]!.body).toMatchObject({ stdout: '', stderr: pattern('err18', MiB), stdoutTruncated: true, stderrTruncated: false })
    for (let i = 0; i < 18; i++) expect(done[i]!.body, `exec ${i}`).toMatchObject({ stdout: '', stderr: '', stdoutTruncated: true, stderrTruncated: true })

    // Replays: A's oldest starts with a gap over all it printed; its newest and B's have none.
    const oldest = await readEvents(g.publicUrl, ids[0]!)
    expect(oldest).toEqual([
      { type: 'gap', stream: 'stdout', from: 0, to: MiB },
      { type: 'gap', stream: 'stderr', from: 0, to: MiB },
      { type: 'exit', exitCode: 0, signal: null, timedOut: false }
    ])
    const newest = await readEvents(g.publicUrl, ids[19]!)
    expect(newest.filter((e) => e.type === 'gap')).toEqual([])
    expect(outputOf(newest, 'stdout')).toBe(pattern('out19', MiB))
    expect(outputOf(newest, 'stderr')).toBe(pattern('err19', MiB))
    const bEvents = await readEvents(g.publicUrl, b.body.id)
    expect(bEvents.filter((e) => e.type === 'gap')).toEqual([])
    expect(outputOf(bEvents, 'stdout')).toBe(pattern('bout', MiB))
    expect(outputOf(bEvents, 'stderr')).toBe(pattern('berr', MiB))

    const metrics = (await api(g.publicUrl, 'GET', '/metrics')).text
    const retained = Number(/^exec_gateway_retained_bytes (\d+)$/m.exec(metrics)?.[1])
    expect(retained).toBe(5 * MiB)

    // A deleted exec gives its bytes back.
    expect((await api(g.publicUrl, 'DELETE', `/v1/execs/${ids[19]!}`)).status).toBe(204)
    expect(g.gw.execs.retainedBytesBy(A)).toBe(MiB)
    const after = (await api(g.publicUrl, 'GET', '/metrics')).text
    expect(Number(/^exec_gateway_retained_bytes (\d+)$/m.exec(after)?.[1])).toBe(3 * MiB)
  })
})
