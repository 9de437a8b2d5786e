// Phase: exec round trip as a shell script pays it, whole processes on both sides: `curl` →
// gateway D (pooled, token checked) → supervisor → OpenSSH, against `ssh -S <sock> … true` on an
// OpenSSH ControlMaster to the same sshd (one session on a live connection, as the pool's
// channel). Interleaved, one of each per round.
import { join } from 'node:path'
import { expect } from 'vitest'
import { median, percentile } from '../../test/helpers/stats.js'
import { curlArgs, curlExecTrue, timeProcess } from '../clients.js'
import { CURL, GOALS, RTT_N, RTT_WARMUP, SSH } from '../knobs.js'
import { fixed, log, ms } from '../report.js'
import { SshMaster } from '../ssh-master.js'
import type { World } from '../world.js'

// curlStart and sshStart are the two clients' own process start (no request, no session), so
// that the ratio can be split into what the clients cost and what the exec path costs.
type Kind = 'curl' | 'sshMux' | 'curlStart' | 'sshStart'

export async function controlMasterRoundTrip (world: World): Promise<void> {
  const { results } = world
  const e = world.setup
  if (e.gwD === undefined) throw new Error('gateway D was not started')
  const master = await SshMaster.start(e.ssh, join(e.tmp, 'cm.sock'))
  world.onTeardown(async () => await master.close())
  const args = curlArgs(e.gwD.publicUrl, 'ossh', e.apiToken)
  const runners: Record<Kind, () => Promise<number>> = {
    curl: async () => {
      const r = await curlExecTrue(args)
      if (r.status !== 200 || r.exitCode !== 0) throw new Error(`curl exec true: HTTP ${r.status}, exitCode ${JSON.stringify(r.exitCode)}: ${r.body.slice(0, 300)}`)
      return r.ms
    },
    sshMux: async () => {
      const r = await e.ssh.run(['true'], { options: master.clientOptions(), timeoutMs: 30_000 })
      if (r.code !== 0) throw new Error(`ssh -S true exited ${r.code}: ${r.stderr.trim()}`)
      return r.ms
    },
    curlStart: async () => await timeProcess(CURL, ['--version']),
    sshStart: async () => await timeProcess(SSH, ['-V'])
  }
  const kinds = Object.keys(runners) as Kind[]
  const samples: Record<Kind, number[]> = { curl: [], sshMux: [], curlStart: [], sshStart: [] }
  const failed: Record<Kind, string[]> = { curl: [], sshMux: [], curlStart: [], sshStart: [] }
  const attempt = async (k: Kind, into?: number[]): Promise<void> => {
    try { into?.push(await runners[k]()) } catch (err) { failed[k].push(String(err).slice(0, 300)) }
  }
  try {
    for (let i = 0; i < RTT_WARMUP; i++) for (const k of kinds) await attempt(k)
    const t0 = Date.now()
    for (let i = 0; i < RTT_N; i++) {
      // The order swaps every round, so neither always runs right after the other.
      for (const k of i % 2 === 0 ? kinds : [...kinds].reverse()) await attempt(k, samples[k])
    }
    log(`ControlMaster round trips: ${RTT_N} × ${kinds.length} in ${((Date.now() - t0) / 1000).toFixed(1)} s`)
    // ssh falls back to a connection of its own when the master is gone: that would time the
    // wrong thing, so the master must have lived through the whole run.
    if (await master.check() === undefined) throw new Error('the ssh ControlMaster died during the run')
  } finally {
    await master.close()
  }
  const desc = (k: Kind): string => `median ${ms(median(samples[k]))} ms, p90 ${ms(percentile(samples[k], 0.9))} ms${failed[k].length > 0 ? `, **${failed[k].length} of ${RTT_N + RTT_WARMUP} failed**` : ''}`
  const ratio = median(samples.curl) / median(samples.sshMux)
  results.rows.push({
    what: `exec round trip \`true\`, whole processes (n=${RTT_N}, interleaved): \`curl\` → gateway (pooled, API token) → supervisor → OpenSSH, vs \`ssh -S <sock> … true\` on a ControlMaster to the same sshd`,
    gateway: `\`curl -X POST …?wait=true\`: ${desc('curl')}`,
    peer: `\`ssh -S\`: ${desc('sshMux')}`,
    ratio: `${fixed(ratio, 2)} (p90 ${fixed(percentile(samples.curl, 0.9) / percentile(samples.sshMux, 0.9), 2)})`,
    goal: `≤ ${GOALS.controlMasterRttRatio.toFixed(1)}`,
    met: ratio <= GOALS.controlMasterRttRatio
  })
  // The exec path alone: each client's round trip less its own process start (medians).
  const curlPath = median(samples.curl) - median(samples.curlStart)
  const sshPath = median(samples.sshMux) - median(samples.sshStart)
  results.rows.push({
    what: 'the same, split: each client\'s process start alone (`curl --version`, `ssh -V`, interleaved with the runs above), and the round trip less it (the exec path: gateway + relay + sshd against the mux socket + master + sshd)',
    gateway: `curl start: median ${ms(median(samples.curlStart))} ms; exec path ${ms(curlPath)} ms`,
    peer: `ssh start: median ${ms(median(samples.sshStart))} ms; exec path ${ms(sshPath)} ms`,
    ratio: `${fixed(curlPath / sshPath, 2)} (exec paths)`,
    goal: '—',
    met: undefined
  })
  results.commands.push(
    `- ControlMaster: \`${SSH} ${e.ssh.args([], master.masterOptions()).join(' ')}\`, closed with \`-O exit\``,
    `- ControlMaster peer: \`${e.ssh.commandLine('true', master.clientOptions().join(' '))}\``,
    `- curl: \`${CURL} ${args.map((a) => a.includes('Bearer') ? "'authorization: Bearer <token>'" : /[^A-Za-z0-9_./:=,@%+-]/.test(a) ? `'${a}'` : a).join(' ')}\``
  )
  results.notes.push(`ControlMaster round trip: both timed from spawn to exit of the whole process (\`curl\`: process start, TCP connect, the request with its bearer token, the exec, the JSON answer, checked for HTTP 200 and \`exitCode\` 0; \`ssh -S\`: process start, the mux socket, one session on the master's connection, \`true\`, the exit status). ${RTT_WARMUP} warm-up rounds, then ${RTT_N}, the order swapped every round; the master checked alive at the end (\`-O check\`)`)
  for (const k of kinds) {
    if (failed[k].length > 0) results.failures.push(`ControlMaster round trip ${k}: ${failed[k].length} of ${RTT_N + RTT_WARMUP} failed, e.g. ${failed[k][0]}`)
  }
  expect(kinds.filter((k) => failed[k].length > 0), 'kinds of round trip with failed runs').toEqual([])
}
