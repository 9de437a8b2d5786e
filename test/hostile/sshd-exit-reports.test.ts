import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { expectHonestUnharmed, startHostileWorld, type HostileWorld } from './harness.js'
import { NO_RATE_LIMIT, refusalCounts, startHostileSandbox, type HostileSandbox } from './hostile-sshd.js'
import { sleep } from '../helpers/wait.js'

// Exit reports that are not exits. An exit-signal named `<img src=x onerror=alert(1)>` was
// stored and returned verbatim as the exec's `signal`. SSH signal names have a grammar (RFC
// 4254 §6.10: TERM, KILL, ... or name@domain); anything else fails the exec with ssh_failed and
// is never stored. Exit statuses are uint32 on the wire, and every uint32 is kept.

const BAD_NAMES = [
  '<img src=x onerror=alert(1)>',
  'KILL\n{"level":60,"msg":"forged log line"}',
  '\u001b[31mKILL',
  'TERM\u202e',
  'SIG KILL',
  'kill',
  '',
  'x@',
  '@openssh.com',
  'A'.repeat(10_000)
]
const GOOD_NAMES = ['KILL', 'TERM', 'USR1', 'SIG@openssh.com', 'RTMIN+3@example.org']

describe('exit reports outside the SSH grammar from a hostile sandbox SSH daemon', () => {
  let world: HostileWorld
  let sb: HostileSandbox
  beforeAll(async () => {
    world = await startHostileWorld({ extraArgs: NO_RATE_LIMIT })
    sb = await startHostileSandbox(world, 'exit-reports', {
      onExec: (x) => {
        const sig = /hostile-signal-(good|bad)-(\d+)/.exec(x.command)
        const status = /hostile-status-(\d+)/.exec(x.command)
        if (sig === null && status === null) return 'honest'
        x.conn.channelData(x.id, Buffer.from('before the end\n'))
        if (sig !== null) x.conn.exitSignal(x.id, (sig[1] === 'good' ? GOOD_NAMES : BAD_NAMES)[Number(sig[2])]!, false, 'E'.repeat(20_000))
        else x.conn.exitStatus(x.id, Number(status![1]))
        x.channel.eof()
        x.channel.close()
      }
    })
  })
  afterAll(async () => {
    await sb?.stop()
    await world?.stop()
  })

  it('a signal name outside the grammar fails the exec with ssh_failed and is stored nowhere', async () => {
    const before = await refusalCounts(world.publicUrl)
    let sent = 0
    const r = await world.underAttack('exit reports: signal names outside the grammar', async (signal) => {
      for (let i = 0; !signal.aborted; i = (i + 1) % BAD_NAMES.length) {
        const e = await sb.exec(['true', `hostile-signal-bad-${i}`])
        sent++
        expect(e.status).toBe(502)
        expect(e.body).toMatchObject({ code: 'ssh_failed', detail: 'the sandbox reported an exit signal outside the SSH grammar' })
        const rec = await (await fetch(`${world.publicUrl}/v1/execs/${e.body.execId as string}`)).json() as any
        expect(rec).toMatchObject({ status: 'failed', exitCode: null, signal: null, error: { code: 'ssh_failed' } })
        const text = JSON.stringify(rec)
        expect(text).not.toContain('<img')
        expect(text).not.toContain('forged log line')
        expect(text).not.toContain('AAAAAAAAAA')
        await sleep(50)
      }
    })
    expectHonestUnharmed(r)
    expect(sent).toBeGreaterThanOrEqual(BAD_NAMES.length)
    const after = await refusalCounts(world.publicUrl)
    expect(after.bad_exit_report! - (before.bad_exit_report ?? 0)).toBe(sent)
    // Nothing the daemon named reached the gateway's log either.
    const log = world.gateway.output()
    expect(log).not.toContain('<img')
    expect(log).not.toContain('forged log line')
    expect(log).not.toContain('EEEEEEEEEE')
  })

  it('names in the grammar are exit signals, stored as sent', async () => {
    for (const [i, name] of GOOD_NAMES.entries()) {
      const e = await sb.exec(['true', `hostile-signal-good-${i}`])
      expect(e.status).toBe(200)
      expect(e.body).toMatchObject({ status: 'exited', exitCode: null, signal: name, stdout: 'before the end\n' })
    }
  })

  it('every uint32 exit status is kept', async () => {
    for (const code of [0, 1, 255, 256, 2 ** 31, 0xffff_ffff]) {
      const e = await sb.exec(['true', `hostile-status-${code}`])
      expect(e.status).toBe(200)
      expect(e.body).toMatchObject({ status: 'exited', exitCode: code, signal: null })
    }
  })

  it('an honest exec on the same sandbox still runs exactly', async () => {
    const e = await sb.exec(['sh', '-c', 'printf out; printf err >&2; exit 9'])
    expect(e.status).toBe(200)
    expect(e.body).toMatchObject({ stdout: 'out', stderr: 'err', exitCode: 9 })
  })
})
