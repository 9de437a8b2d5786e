import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { Directory } from '../../src/cluster/directory.js'
import { freePort } from '../../src/cluster/launcher-probes.js'
import { deriveReplicaSecret, replicaAuthHeader } from '../../src/cluster/replica-auth.js'
import { loadDataDir } from '../../src/data-dir.js'
import { signSupervisorToken } from '../../src/tokens.js'
import { api, execStart } from '../helpers/api.js'
import { startGatewayProcess, type GatewayProcess } from '../helpers/gateway-process.js'
import { startRedisServer } from '../helpers/redis-server.js'
import { eventsFrom0, within } from '../helpers/restart-readers.js'
import { startSupervisorProcess } from '../helpers/supervisor-process.js'
import { startTcpProxy } from '../helpers/tcp-proxy.js'
import { sleep, waitFor } from '../helpers/wait.js'

// Split brain in cluster mode (issue 14), with real processes: redis-server, two `exec-gateway
// serve` replicas, a supervisor process with the embedded daemon dialling r0 through a TCP
// "balancer". r0 is frozen (SIGSTOP) and the supervisor's path to it blackholed, so the
// supervisor re-homes to r1 through the balancer while r0 still holds its old session, and
// keeps holding it after SIGCONT until its own PINGs go unanswered. All the while new execs are
// POSTed to both replicas; each one appends its mark to a file in the sandbox when it starts.
// Exactly one replica may start execs for the sandbox at any time, and none may start twice.

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {})
})

const SANDBOX = 'split-1'
// Short PINGs, announced to the supervisor too: the supervisor leaves the silent path within
// 1.5 s; r0, frozen, notices only after it is resumed.
const PING = ['--h2-ping-interval-ms', '500', '--h2-ping-timeout-ms', '1000']
const START_SCRIPT = 'echo "$0" >> "$1"; printf "out %s\\n" "$0"'

interface Sent { mark: string, via: 'r0' | 'r1', sentAt: number, status?: number, body?: any, err?: string }

describe('cluster mode: a frozen replica whose supervisor path went silent', () => {
  it('SIGSTOP r0 and blackhole the supervisor\'s path: it re-homes to r1; r0 resumes with the session lingering; exactly one replica starts new execs, none starts twice, the kept exec ends true', async () => {
    const redis = await startRedisServer()
    cleanups.push(async () => { await redis.stop() })
    const dataDir = mkdtempSync(join(tmpdir(), 'egw-split-'))
    cleanups.push(async () => { rmSync(dataDir, { recursive: true, force: true }) })
    const identity = loadDataDir(dataDir)
    const auth = replicaAuthHeader(deriveReplicaSecret(identity))
    const replicas: Record<'r0' | 'r1', { proc: GatewayProcess, internalUrl: string }> = {} as any
    const taken = new Set<number>()
    for (const id of ['r0', 'r1'] as const) {
      const port = await freePort(taken)
      taken.add(port)
      const proc = await startGatewayProcess({
        dataDir,
        localSandbox: false,
        extraArgs: ['--redis-url', redis.url, '--replica-id', id, '--internal-listen', `127.0.0.1:${port}`, '--reattach-timeout-ms', '15000', '--exec-rate-limit-per-minute', '0', ...PING]
      })
      // A stopped process handles no SIGTERM: resume it before the stop.
      cleanups.push(async () => { try { proc.proc.kill('SIGCONT') } catch { /* gone */ } await proc.stop() })
      replicas[id] = { proc, internalUrl: `http://127.0.0.1:${port}` }
    }
    const { r0, r1 } = { r0: replicas.r0.proc, r1: replicas.r1.proc }
    const dir = new Directory({ url: redis.url, prefix: 'exec-gateway:', replicaId: 'test-reader', internalUrl: 'http://127.0.0.1:1', publicUrl: 'http://127.0.0.1:1' })
    cleanups.push(async () => { await dir.close({ deleteHeartbeat: true }) })
    await dir.start()

    const hp = (u: string): URL => new URL(u)
    const lb = await startTcpProxy({ targetHost: hp(r0.supervisorUrl).hostname, targetPort: Number(hp(r0.supervisorUrl).port) })
    cleanups.push(async () => { await lb.close() })
    const sup = startSupervisorProcess({ gatewayUrl: `http://${lb.host}:${lb.port}`, sandboxId: SANDBOX, token: signSupervisorToken(identity.tokenSecret, SANDBOX) })
    cleanups.push(async () => { await sup.stop() })
    await waitFor(async () => (await dir.owner(SANDBOX))?.replicaId === 'r0', { timeoutMs: 15_000, description: `r0 owns ${SANDBOX}` })

    const starts = join(dataDir, 'starts.log')
    const kept = await execStart(r1.publicUrl, SANDBOX, { command: ['sh', '-c', 'sleep 8; echo kept; exit 7'] })

    // The load: a new exec every 100 ms, to r0 and r1 in turn, each waited for.
    const sent: Sent[] = []
    const run = { loading: true }
    const inflight: Array<Promise<void>> = []
    const load = (async () => {
      for (let i = 0; run.loading; i++) {
        const via = i % 2 === 0 ? 'r0' : 'r1'
        const s: Sent = { mark: `m${i}`, via, sentAt: Date.now() }
        sent.push(s)
        inflight.push((async () => {
          try {
            const res = await fetch(`${replicas[via].proc.publicUrl}/v1/sandboxes/${SANDBOX}/execs?wait=true`, {
              method: 'POST',
              headers: { 'content-type': 'application/json' },
              body: JSON.stringify({ command: ['sh', '-c', START_SCRIPT, s.mark, starts] }),
              signal: AbortSignal.timeout(60_000)
            })
            s.status = res.status
            s.body = await res.json()
          } catch (err) { s.err = (err as Error).message }
        })())
        await sleep(100)
      }
    })()

    await sleep(1000)
    lb.blackholeCurrent()
    lb.setTarget(hp(r1.supervisorUrl).hostname, Number(hp(r1.supervisorUrl).port))
    r0.proc.kill('SIGSTOP')
    const frozenAt = Date.now()
    await waitFor(async () => (await dir.owner(SANDBOX))?.replicaId === 'r1', { timeoutMs: 20_000, intervalMs: 100, description: `${SANDBOX} re-homed to r1` })
    const movedAfterMs = Date.now() - frozenAt
    await sleep(1000)
    r0.proc.kill('SIGCONT')
    await sleep(5000)
    run.loading = false
    await load
    await within(Promise.all(inflight), 60_000, 'every POST answered')

    const lines = readFileSync(starts, 'utf8').split('\n').filter((l) => l !== '')
    const startsOf = new Map<string, number>()
    for (const l of lines) startsOf.set(l, (startsOf.get(l) ?? 0) + 1)
    const twice = [...startsOf].filter(([, n]) => n > 1)
    const bad = sent.filter((s) => !(s.status === 200 && s.body?.exitCode === 0 && s.body?.stdout === `out ${s.mark}\n` && startsOf.get(s.mark) === 1))
    console.log(`split brain: ${sent.length} execs, re-homed after ${movedAfterMs} ms; ${bad.length} not exact: ${JSON.stringify(bad.slice(0, 5).map((s) => ({ mark: s.mark, via: s.via, status: s.status, code: s.body?.code, detail: s.body?.detail, err: s.err, starts: startsOf.get(s.mark) })))}`)
    expect(twice).toEqual([])
    // Nothing starts that nobody asked for.
    expect(lines.every((l) => sent.some((s) => s.mark === l))).toBe(true)
    expect(bad).toEqual([])

    // r0 created no exec of its own from the freeze on: every one it was given after it went to r1.
    const listOf = async (id: 'r0' | 'r1'): Promise<Array<{ id: string, createdAt: string }>> =>
      ((await (await fetch(`${replicas[id].internalUrl}/v1/execs?sandboxId=${SANDBOX}`, { headers: auth })).json()) as { execs: Array<{ id: string, createdAt: string }> }).execs
    const onR0 = (await listOf('r0')).filter((e) => Date.parse(e.createdAt) >= frozenAt)
    expect(onR0).toEqual([])
    const afterOnR1 = (await listOf('r1')).filter((e) => Date.parse(e.createdAt) >= frozenAt)
    expect(afterOnR1.length).toBeGreaterThan(0)

    // The kept exec went with the sandbox and ends with its true exit, readable from both.
    const j = await eventsFrom0(r0.publicUrl, kept, 30_000)
    expect(j.problems).toEqual([])
    expect(j.bytes('stdout').toString()).toBe('kept\n')
    expect(j.final).toEqual({ type: 'exit', exitCode: 7, signal: null, timedOut: false })
    expect((await api(r1.publicUrl, 'GET', `/v1/execs/${kept}`)).body).toMatchObject({ status: 'exited', exitCode: 7 })
  }, 120_000)
})
