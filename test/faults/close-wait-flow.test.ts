import { createHash } from 'node:crypto'
import { afterEach, describe, expect, it } from 'vitest'
import { execStart, openPausedBinaryReader } from '../helpers/api.js'
import { createFaultKit, FAST } from '../helpers/fault-kit.js'
import { sleep, waitFor } from '../helpers/wait.js'

// OpenSSH sends exit-status as soon as the command exits, and the output still in its buffers
// after it, as the window allows. While a paused reader holds the gateway's window shut, that tail
// cannot come; the close wait (a bound on a sandbox that trickles) must stand still meanwhile, or
// the exec ends without its last bytes. Found by the oracle suite (16 KiB lost at the end through
// OpenSSH); made deterministic here with a scripted daemon that sends exit-status right after
// handing its output to a closed window.

const kit = createFaultKit(FAST)
const { gateway, supervisor, scripted } = kit
afterEach(async () => { await kit.cleanup() })

const SIZE = 16 * 1024 * 1024

describe('close wait and flow control', () => {
  it('a reader paused for far longer than --close-wait-ms, while the tail waits behind the exit status, still gets every byte', async () => {
    const g = await gateway()
    const payload = Buffer.alloc(SIZE)
    for (let i = 0; i < SIZE; i += 4) payload.writeUInt32BE(i, i)
    const digest = createHash('sha256').update(payload).digest('hex')
    const s = await scripted(({ channel }) => {
      channel.write(payload, () => {
        channel.end()
        channel.close()
      })
      channel.exit(5)
    })
    supervisor(g, 'tail', { sshTarget: `${s.host}:${s.port}` })
    await g.waitConnected('tail')
    const id = await execStart(g.publicUrl, 'tail', { command: ['anything'] })
    const entry = g.gw.execs.get(id)!
    // Paused from its first frame on.
    const reader = openPausedBinaryReader(g.publicUrl, id, { pauseAtBytes: 0 })
    await waitFor(() => entry.flowHeld, { timeoutMs: 10_000 })
    // Ten close waits with the window shut and the exit status in.
    await sleep(FAST.closeWaitMs! * 10)
    expect(entry.status).toBe('running')
    reader.ws.resume()
    expect(await reader.closed).toBe(1000)
    expect(reader.final).toEqual({ type: 'exit', exitCode: 5, signal: null, timedOut: false })
    expect(reader.received).toBe(SIZE)
    expect(reader.sha256()).toBe(digest)
    expect(entry.toJSON()).toMatchObject({ status: 'exited', exitCode: 5, stdoutBytes: SIZE })
  }, 60_000)
})
