import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { expectHonestUnharmed, startHostileWorld, type HostileWorld } from './harness.js'
import { NO_RATE_LIMIT, startHostileSandbox, UNSAFE_TEXT, type HostileSandbox } from './hostile-sshd.js'
import { sleep } from '../helpers/wait.js'

// Strings a hostile sandbox SSH daemon chooses that reach exec records and the gateway's log:
// a channel-open failure's description, a disconnect's description, the output of the script
// that stages a long command line. Each is cut to a few hundred characters and stripped of
// control characters (terminal escapes, forged log lines, bidi overrides) before it is kept.

// Under ssh2's 35,000-byte packet limit; the marker after the padding must never survive.
const HUGE = '\u001b[2J\u001b[31mdaemon says: ' + 'A'.repeat(30_000) + '\n{"level":60,"msg":"forged log line"}\r\u202eevil'
const DETAIL_MAX = 300

function expectBounded (detail: unknown): void {
  expect(typeof detail).toBe('string')
  const d = detail as string
  expect(d.length).toBeLessThanOrEqual(DETAIL_MAX)
  expect(d).not.toMatch(UNSAFE_TEXT)
  expect(d).not.toContain('forged log line')
}

describe('description strings from a hostile sandbox SSH daemon', () => {
  let world: HostileWorld
  let opens: HostileSandbox
  let disconnects: HostileSandbox
  let stages: HostileSandbox
  beforeAll(async () => {
    world = await startHostileWorld({ extraArgs: NO_RATE_LIMIT })
    opens = await startHostileSandbox(world, 'strings-open', {
      onSessionOpen: (c, sender) => { c.openFailure(sender, 2, HUGE); return true }
    })
    disconnects = await startHostileSandbox(world, 'strings-disconnect', {
      onExec: (x) => { if (!x.command.includes('hostile-disconnect')) return 'honest'; x.conn.disconnect(2, HUGE) }
    })
    stages = await startHostileSandbox(world, 'strings-stage', {
      // The staging script (mktemp, then cat into the file) answers with the description.
      onExec: (x) => {
        if (!x.command.includes('mktemp')) return 'honest'
        x.conn.channelData(x.id, Buffer.from(HUGE.slice(0, 30_000)))
        x.conn.exitStatus(x.id, 1)
        x.channel.eof()
        x.channel.close()
      }
    })
  })
  afterAll(async () => {
    for (const sb of [opens, disconnects, stages]) await sb?.stop()
    await world?.stop()
  })

  it('reach records and logs bounded and clean, and the honest sandbox does not notice', async () => {
    let attacks = 0
    const r = await world.underAttack('strings: huge descriptions', async (signal) => {
      while (!signal.aborted) {
        const open = await opens.exec(['true'])
        expect(open.status).toBe(502)
        expect(open.body).toMatchObject({ code: 'ssh_failed', detail: expect.stringMatching(/^the sandbox refused the exec request: \(SSH\) Channel open failure: daemon says: A+… \(\d+ characters\)$/) })
        expectBounded(open.body.detail)
        const disc = await disconnects.exec(['sh', '-c', 'sleep 5 # hostile-disconnect'])
        expect(disc.status).toBe(503)
        expect(disc.body).toMatchObject({ code: 'relay_unavailable', detail: expect.stringMatching(/daemon says: A+…/) })
        expectBounded(disc.body.detail)
        // 40,000 bytes of argv: too long for one exec request, so it is staged first.
        const stage = await stages.exec(['printf', '%s', 'x'.repeat(20_000), 'y'.repeat(20_000)])
        expect(stage.status).toBe(502)
        expect(stage.body).toMatchObject({ code: 'ssh_failed', detail: expect.stringMatching(/^could not stage the command line in the sandbox \(exit 1\): daemon says: A+…/) })
        expectBounded(stage.body.detail)
        for (const e of [open, disc, stage]) {
          const rec = await (await fetch(`${world.publicUrl}/v1/execs/${e.body.execId as string}`)).json() as any
          expectBounded(rec.error.detail)
        }
        attacks++
        // Paced: each round costs four SSH handshakes (the refused open is retried on a fresh
        // connection, the disconnect ends one); what is measured is where the strings go.
        await sleep(400)
      }
    })
    expectHonestUnharmed(r)
    expect(attacks).toBeGreaterThan(2)
    // No log line carries the 30 KB, or anything after it.
    const log = world.gateway.output()
    expect(log).not.toContain('A'.repeat(DETAIL_MAX))
    expect(log).not.toContain('forged log line')
    expect(log).not.toContain('\u001b[')
    expect(Math.max(...log.split('\n').map((l) => l.length))).toBeLessThan(4096)
  })

  it('an honest exec on each of these sandboxes that the attack does not claim still runs', async () => {
    for (const sb of [disconnects, stages]) {
      const e = await sb.exec(['sh', '-c', 'printf ok; exit 2'])
      expect(e.status).toBe(200)
      expect(e.body).toMatchObject({ stdout: 'ok', exitCode: 2 })
    }
  })
})
