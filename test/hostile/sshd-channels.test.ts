import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { expectHonestUnharmed, startHostileWorld, type HostileWorld } from './harness.js'
import { NO_RATE_LIMIT, refusalCounts, startHostileSandbox, wire, type HostileConn, type HostileExec, type HostileSandbox } from './hostile-sshd.js'
import { sleep, waitFor } from '../helpers/wait.js'

// Channel bookkeeping against a hostile sandbox SSH daemon, on pooled connections (several
// execs of one sandbox share one SSH connection). In stock ssh2 1.17, one packet naming channel
// 0xFFFFFFFF made ChannelManager.get() throw out of the parser and killed the connection with
// every exec on it, and an exit report sent before the exec request was answered was lost and
// blocked the true one. Now packets for channels that are not open are ignored and counted,
// an exec's report counts once, and only while its channel is open and its exec accepted.

const { u32, str, bool, msg } = wire
const BOGUS_IDS = [0xffff_ffff, 0xffff_fffe, 1_000_000, 2 ** 31]

// Every channel-addressed message, for a channel id that is not open.
function forgeFor (c: HostileConn, id: number): void {
  c.channelData(id, Buffer.from('FORGED-OUT'))
  c.raw(msg(95, u32(id), u32(1), str('FORGED-ERR')))
  c.exitStatus(id, 77)
  c.exitSignal(id, 'KILL')
  c.raw(msg(93, u32(id), u32(1 << 20)))
  c.raw(msg(99, u32(id)))
  c.raw(msg(100, u32(id)))
  c.raw(msg(98, u32(id), str('keepalive@openssh.com'), bool(true)))
  c.raw(msg(96, u32(id)))
  c.raw(msg(97, u32(id)))
  c.raw(msg(91, u32(id), u32(7), u32(1 << 21), u32(1 << 15)))
  c.raw(msg(92, u32(id), u32(2), str('forged'), str('')))
}

// The attacker's own exec: forgeries for ids that are not open, then its own output and exit
// status, two more reports for the same channel, its close, and reports after the close.
async function forge (x: HostileExec): Promise<void> {
  for (const id of BOGUS_IDS) forgeFor(x.conn, id)
  x.conn.channelData(x.id, Buffer.from('own\n'))
  x.conn.exitStatus(x.id, 77)
  x.conn.exitStatus(x.id, 78)
  x.conn.exitSignal(x.id, 'TERM')
  // Through ssh2's channel, so that its server does not send a second close of its own.
  x.channel.eof()
  x.channel.close()
  x.conn.exitStatus(x.id, 79)
  x.conn.channelData(x.id, Buffer.from('late\n'))
}

describe('channel ids and exit reports from a hostile sandbox SSH daemon, on a pooled connection', () => {
  let world: HostileWorld
  let forger: HostileSandbox
  let opener: HostileSandbox
  const connOf = new Map<string, HostileConn>()
  const apiOpens: Array<Error | undefined> = []
  beforeAll(async () => {
    // Pooled even when the suite runs with EXEC_GATEWAY_SSH_POOL=false: the attack is about two
    // execs sharing one connection (a flag wins over the environment).
    world = await startHostileWorld({ extraArgs: ['--ssh-pool=true', ...NO_RATE_LIMIT] })
    forger = await startHostileSandbox(world, 'forger', {
      onExec: (x) => {
        const tag = /hostile-(victim|forge|early)-\d+/.exec(x.command)?.[0]
        if (tag !== undefined) connOf.set(tag, x.conn)
        return tag?.includes('forge') === true ? forge(x) : 'honest'
      },
      // An exit report before the exec request is answered, then the command runs for real.
      beforeExecReply: (c, id, command) => { if (command.includes('hostile-early')) c.exitStatus(id, 77) }
    })
    opener = await startHostileSandbox(world, 'opener', {
      // Channels of every kind the daemon may try to open towards a client, at login.
      onReady: (c) => {
        c.conn.x11('10.0.0.1', 6000, (err) => apiOpens.push(err))
        c.conn.forwardOut('127.0.0.1', 22, '10.0.0.1', 4242, (err) => apiOpens.push(err))
        c.conn.openssh_forwardOutStreamLocal('/tmp/agent.sock', (err) => apiOpens.push(err))
        c.channelOpen('auth-agent@openssh.com', 9001)
        c.channelOpen('session', 9002)
        c.channelOpen('made-up@example.com', 9003)
      },
      onExec: (x) => {
        if (!x.command.includes('hostile-open-flood')) return 'honest'
        for (let i = 0; i < 20; i++) x.conn.channelOpen('x11', 10_000 + i, Buffer.concat([str('10.0.0.1'), u32(6000 + i)]))
      }
    })
  })
  afterAll(async () => {
    await forger?.stop()
    await opener?.stop()
    await world?.stop()
  })

  it('forgeries for channels that are not open, and extra reports, never reach another exec or kill the connection', async () => {
    const before = await refusalCounts(world.publicUrl)
    let rounds = 0
    const r = await world.underAttack('channels: forged ids and exit reports, pooled', async (signal) => {
      while (!signal.aborted) {
        const n = rounds++
        const victim = forger.exec(['sh', '-c', `sleep 1; printf victim; printf verr >&2; exit 3 # hostile-victim-${n}`])
        await sleep(300)
        const attacker = await forger.exec(['true', `hostile-forge-${n}`])
        expect(attacker.status).toBe(200)
        expect(attacker.body).toMatchObject({ stdout: 'own\n', stderr: '', exitCode: 77, signal: null })
        const v = await victim
        expect(v.status).toBe(200)
        expect(v.body).toMatchObject({ stdout: 'victim', stderr: 'verr', exitCode: 3, signal: null })
        // They shared one SSH connection, and it survived the forgeries.
        expect(connOf.get(`hostile-forge-${n}`)).toBe(connOf.get(`hostile-victim-${n}`))
      }
    })
    expectHonestUnharmed(r)
    expect(rounds).toBeGreaterThan(1)
    const after = await refusalCounts(world.publicUrl)
    const delta = (reason: string): number => (after[reason] ?? 0) - (before[reason] ?? 0)
    // Per round: 12 messages for each of 4 bogus ids, and the data after the close.
    expect(delta('unknown_channel')).toBe(rounds * (12 * BOGUS_IDS.length + 1))
    expect(delta('duplicate_exit')).toBe(rounds * 2)
    expect(delta('bad_exit_report')).toBe(rounds)
    expect(delta('protocol_error')).toBe(0)
  })

  it('an exit report before the exec request is answered is ignored: the command\'s real one stands', async () => {
    const before = await refusalCounts(world.publicUrl)
    const e = await forger.exec(['sh', '-c', 'printf early; exit 4 # hostile-early-0'])
    expect(e.status).toBe(200)
    expect(e.body).toMatchObject({ stdout: 'early', exitCode: 4, signal: null })
    const after = await refusalCounts(world.publicUrl)
    expect(after.bad_exit_report! - (before.bad_exit_report ?? 0)).toBe(1)
  })

  it('channels the daemon opens towards the gateway are all refused and counted; the connection keeps working', async () => {
    const before = await refusalCounts(world.publicUrl)
    const e = await opener.exec(['sh', '-c', 'printf fine; exit 6'])
    expect(e.status).toBe(200)
    expect(e.body).toMatchObject({ stdout: 'fine', exitCode: 6 })
    const after = await refusalCounts(world.publicUrl)
    expect(after.channel_open! - (before.channel_open ?? 0)).toBe(6)
    // ssh2's own opens came back with errors; the raw ones with CHANNEL_OPEN_FAILURE.
    await waitFor(() => apiOpens.length === 3, { timeoutMs: 5000, description: "the gateway's answers to the daemon's opens" })
    for (const err of apiOpens) expect(err).toBeInstanceOf(Error)
    for (const id of [9001, 9002, 9003]) expect(opener.sshd.openFailuresReceived).toContain(id)
  })

  it('beyond --ssh-max-refused-channel-opens (16) the connection fails with ssh_failed, and the honest sandbox does not notice', async () => {
    const before = await refusalCounts(world.publicUrl)
    const results: Array<{ status: number, body: any }> = []
    const r = await world.underAttack('channels: channel-open flood', async (signal) => {
      while (!signal.aborted) {
        results.push(await opener.exec(['sleep', '5', 'hostile-open-flood']))
        await sleep(100)
      }
    })
    expectHonestUnharmed(r)
    expect(results.length).toBeGreaterThan(2)
    for (const e of results) {
      expect(e.status).toBe(502)
      expect(e.body).toMatchObject({ code: 'ssh_failed', detail: expect.stringMatching(/tried to open 17 channels towards the gateway/) })
    }
    const after = await refusalCounts(world.publicUrl)
    // Each connection: 6 opens at login, 10 more refused, the 17th fails it (the first flood
    // may land on the warm connection of the test before, whose 6 were counted then).
    expect([17 * results.length, 17 * results.length - 6]).toContain(after.channel_open! - (before.channel_open ?? 0))
  })
})
