// Phase 3: stdout throughput of the random file to a WebSocket reader (binary frames and base64
// JSON), every byte sha256-checked, against `ssh … cat` with OpenSSH's default cipher and with the
// one the gateway's ssh2 negotiates (GCM_CIPHER); and where the CPU goes meanwhile, per GiB
// against the OpenSSH client's over the same transfer.
import { closeSync, openSync } from 'node:fs'
import os from 'node:os'
import { expect } from 'vitest'
import { median } from '../../test/helpers/stats.js'
import type { StreamMode, StreamRun } from '../clients.js'
import { BINARY_SUBPROTOCOL } from '../../src/schemas/websocket.js'
import { FILE_MIB, GCM_CIPHER, GOALS, TPUT_REPS } from '../knobs.js'
import { CLK_TCK, cpuTicksOfAll, processTree } from '../proc.js'
import { fixed, log } from '../report.js'
import type { World } from '../world.js'

// CPU seconds of one gateway transfer: the gateway, the supervisor, the sshd side (pooled session
// processes and their `cat`), and this process (the WebSocket client).
interface Cpu { gateway: number, supervisor: number, sshd: number, client: number, wallS: number }

const mbps = (bytes: number, t: number): number => bytes / 1e6 / (t / 1000)

export async function throughput (world: World): Promise<void> {
  const { api, profiler, results } = world
  const e = world.setup
  const devNull = openSync('/dev/null', 'w')
  const gcm = ['-c', GCM_CIPHER]
  // The OpenSSH client with the gateway's cipher: its time, its CPU for the transfer, and its CPU
  // for `true` (connection setup alone, which the pooled gateway does not pay per transfer).
  const sshGcm = { ms: [] as number[], cpuS: [] as number[], setupCpuS: [] as number[] }
  const t = { ssh: [] as number[], binary: [] as number[], base64: [] as number[], sshPipedStream: [] as number[], binaryStream: [] as number[] }
  const check = (what: string, r: StreamRun): void => {
    expect(r.bytes, `${what}: bytes received`).toBe(e.fileBytes)
    expect(r.sha256, `${what}: sha256 of the bytes received`).toBe(e.fileSha256)
  }
  const cpu: Record<StreamMode, Cpu[]> = { binary: [], base64: [] }
  const supA = e.supervisors[0]!
  const measured = async (mode: StreamMode): Promise<StreamRun> => {
    const sshdPids = processTree(e.sshdPid)
    const b = { gateway: cpuTicksOfAll([e.gwA.pid]), supervisor: cpuTicksOfAll([supA.pid]), sshd: cpuTicksOfAll(sshdPids) }
    const c0 = process.cpuUsage()
    const r = await profiler.profiled(e.gwA, `throughput-${mode}`, async () => await api.websocketCat(e.gwA.publicUrl, 'ossh', e.file, mode))
    const c1 = process.cpuUsage(c0)
    cpu[mode].push({
      gateway: (cpuTicksOfAll([e.gwA.pid]) - b.gateway) / CLK_TCK,
      supervisor: (cpuTicksOfAll([supA.pid]) - b.supervisor) / CLK_TCK,
      sshd: (cpuTicksOfAll(sshdPids) - b.sshd) / CLK_TCK,
      client: (c1.user + c1.system) / 1e6,
      wallS: r.ms / 1000
    })
    return r
  }
  try {
    // Warm-up: page cache, pools, JIT.
    await e.ssh.run(['cat', e.file], { stdoutFd: devNull })
    await e.ssh.runWithCpu(['cat', e.file], gcm)
    check('warm-up binary', await api.websocketCat(e.gwA.publicUrl, 'ossh', e.file, 'binary'))
    for (let rep = 0; rep < TPUT_REPS; rep++) {
      const s = await e.ssh.run(['cat', e.file], { stdoutFd: devNull })
      if (s.code !== 0) throw new Error(`ssh cat exited ${s.code}: ${s.stderr}`)
      t.ssh.push(s.ms)
      // No sha256 on this side (it goes to /dev/null): the piped run below checks what ssh delivers.
      const g = await e.ssh.runWithCpu(['cat', e.file], gcm)
      sshGcm.ms.push(g.ms)
      sshGcm.cpuS.push(g.cpuS)
      sshGcm.setupCpuS.push((await e.ssh.runWithCpu(['true'], gcm)).cpuS)
      const bin = await measured('binary')
      check('binary', bin)
      t.binary.push(bin.ms)
      t.binaryStream.push(bin.streamMs)
      const piped = await e.ssh.catPiped(e.file)
      check('ssh piped', piped)
      t.sshPipedStream.push(piped.streamMs)
      const b64 = await measured('base64')
      check('base64', b64)
      t.base64.push(b64.ms)
      const f = (x: number): string => mbps(e.fileBytes, x).toFixed(0)
      log(`throughput rep ${rep + 1}: ssh>/dev/null ${f(s.ms)}, ssh -c ${GCM_CIPHER}>/dev/null ${f(g.ms)} (client CPU ${g.cpuS.toFixed(2)} s), binary ${f(bin.ms)} (stream ${f(bin.streamMs)}, ${bin.frames} frames), ssh|sha256 stream ${f(piped.streamMs)}, base64 ${f(b64.ms)} (${b64.frames} frames) MB/s`)
    }
  } finally {
    closeSync(devNull)
  }
  for (const mode of ['binary', 'base64'] as const) {
    const avg = (k: keyof Cpu): number => cpu[mode].reduce((a, c) => a + c[k], 0) / cpu[mode].length
    const line = `CPU seconds during one ${mode} transfer of ${FILE_MIB} MiB (mean of ${cpu[mode].length}, wall ${avg('wallS').toFixed(2)} s, ${os.availableParallelism()} cores): gateway ${avg('gateway').toFixed(2)}, supervisor ${avg('supervisor').toFixed(2)}, sshd + cat ${avg('sshd') >= 0 ? avg('sshd').toFixed(2) : 'n/a (a process of its tree ended mid-transfer, its time went where /proc no longer shows it)'}, WebSocket client (bench process) ${avg('client').toFixed(2)}; total ${(avg('gateway') + avg('supervisor') + Math.max(0, avg('sshd')) + avg('client')).toFixed(2)} of ${(avg('wallS') * os.availableParallelism()).toFixed(2)} available`
    log(line)
    results.notes.push(line)
  }
  const ssh = mbps(e.fileBytes, median(t.ssh))
  const sshG = mbps(e.fileBytes, median(sshGcm.ms))
  const bin = mbps(e.fileBytes, median(t.binary))
  const b64 = mbps(e.fileBytes, median(t.base64))
  const binStream = mbps(e.fileBytes, median(t.binaryStream))
  const sshStream = mbps(e.fileBytes, median(t.sshPipedStream))
  const peer = `\`ssh … cat\` > /dev/null: ${ssh.toFixed(0)} MB/s`
  results.rows.push({
    what: `stdout throughput, ${FILE_MIB} MiB random, gateway → WebSocket \`${BINARY_SUBPROTOCOL}\` (OpenSSH via supervisor; end to end, median of ${TPUT_REPS}, sha256 checked)`,
    gateway: `${bin.toFixed(0)} MB/s`,
    peer,
    ratio: fixed(bin / ssh, 2),
    // The goal is against the gateway's own cipher (next row); OpenSSH's default is chacha20.
    goal: '—'
  })
  results.rows.push({
    what: `the same binary WebSocket stream against \`ssh -c ${GCM_CIPHER} … cat\` > /dev/null (the cipher the gateway's ssh2 negotiates with this sshd), interleaved, same sshd and file`,
    gateway: `${bin.toFixed(0)} MB/s`,
    peer: `\`ssh -c ${GCM_CIPHER} … cat\` > /dev/null: ${sshG.toFixed(0)} MB/s`,
    ratio: fixed(bin / sshG, 2),
    goal: `≥ ${GOALS.gcmThroughputRatio.toFixed(2)}`,
    met: bin / sshG >= GOALS.gcmThroughputRatio
  })
  results.rows.push({
    what: 'stdout throughput, the same as JSON text events `?encoding=base64` (end to end, sha256 checked)',
    gateway: `${b64.toFixed(0)} MB/s`,
    peer,
    ratio: fixed(b64 / ssh, 2),
    goal: '—'
  })
  results.rows.push({
    what: 'stdout streaming rate only (first byte → end, no connection setup), binary WebSocket vs `ssh … cat` piped into the bench process; both sha256 checked',
    gateway: `${binStream.toFixed(0)} MB/s`,
    peer: `\`ssh … cat\` piped into a sha256 in the bench process: ${sshStream.toFixed(0)} MB/s`,
    ratio: fixed(binStream / sshStream, 2),
    goal: '—'
  })
  // CPU per GiB: the median over the repetitions of each process's CPU for one transfer.
  const gib = e.fileBytes / 2 ** 30
  const perGiB = (xs: number[]): number => median(xs) / gib
  const sshPerGiB = perGiB(sshGcm.cpuS)
  const gwPerGiB = perGiB(cpu.binary.map((c) => c.gateway))
  const supPerGiB = perGiB(cpu.binary.map((c) => c.supervisor))
  const sshCpu = `OpenSSH client (\`ssh -c ${GCM_CIPHER} … cat\` > /dev/null, connection setup included): ${sshPerGiB.toFixed(2)} CPU-s/GiB`
  results.rows.push({
    what: `gateway CPU per GiB relayed (binary WebSocket transfers above, from /proc/<pid>/stat) ÷ the OpenSSH client's, same file and cipher, median of ${TPUT_REPS}`,
    gateway: `${gwPerGiB.toFixed(2)} CPU-s/GiB`,
    peer: sshCpu,
    ratio: fixed(gwPerGiB / sshPerGiB, 2),
    goal: `≤ ${GOALS.gatewayCpuPerGiBRatio.toFixed(1)}`,
    met: gwPerGiB / sshPerGiB <= GOALS.gatewayCpuPerGiBRatio
  })
  results.rows.push({
    what: 'supervisor CPU per GiB relayed (the same transfers; TCP to sshd → HTTP/2 relay) ÷ the OpenSSH client\'s',
    gateway: `${supPerGiB.toFixed(2)} CPU-s/GiB`,
    peer: sshCpu,
    ratio: fixed(supPerGiB / sshPerGiB, 2),
    goal: `≤ ${GOALS.supervisorCpuPerGiBRatio.toFixed(1)}`,
    met: supPerGiB / sshPerGiB <= GOALS.supervisorCpuPerGiBRatio
  })
  results.notes.push(`throughput CPU per GiB: gateway and supervisor = Δ(utime+stime+cutime+cstime) from /proc/<pid>/stat over each binary transfer (POST to close; ${CLK_TCK} ticks/s); OpenSSH client = user+sys of the ssh process from bash's \`times\` (it runs \`ssh … > /dev/null\` and reports its reaped child), per transfer ${sshGcm.cpuS.map((x) => x.toFixed(3)).join(', ')} s, of which connection setup (\`ssh -c ${GCM_CIPHER} … true\`, measured alongside) ${sshGcm.setupCpuS.map((x) => x.toFixed(3)).join(', ')} s; medians over ${TPUT_REPS} repetitions, GiB = 2^30 bytes`)
  results.notes.push(`throughput: MB = 10^6 bytes. End to end = gateway: POST to WebSocket close; ssh: spawn to exit (so it includes ssh's connection setup, see the round trip rows). Streaming rate = first output byte to the end. ${TPUT_REPS} interleaved repetitions after one warm-up`)
}
