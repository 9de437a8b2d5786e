import { describe, it, expect, beforeAll, afterAll } from 'vitest'
import { createHash, randomBytes } from 'node:crypto'
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { TestGateway } from '../helpers/gateway.js'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import { execStart, openPausedBinaryReader } from '../helpers/api.js'
import { sleep, waitFor } from '../helpers/wait.js'

// docs/api.md §4 flow control: while a reader is attached the gateway reads from the sandbox no
// faster than it, so a paused reader slows the command instead of growing the gateway's memory,
// and an attached reader never sees a gap.

const SIZE = 200 * 1024 * 1024

describe.each(['embedded', 'openssh'] as const)('flow control through the %s daemon', (daemon) => {
  let sb: TestSandbox
  let g: TestGateway
  let dir: string
  let file: string
  let digest: string

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'egw-flow-'))
    // OpenSSH runs the command as the sandbox account.
    chmodSync(dir, 0o755)
    file = join(dir, 'blob')
    const hash = createHash('sha256')
    const block = randomBytes(1024 * 1024)
    const blocks: Buffer[] = []
    for (let i = 0; i < SIZE / block.length; i++) {
      const b = Buffer.from(block)
      b.writeUInt32BE(i, 0) // no two blocks alike, so a reordering would show
      blocks.push(b)
      hash.update(b)
    }
    digest = hash.digest('hex')
    writeFileSync(file, Buffer.concat(blocks), { mode: 0o644 })
    sb = await startSandbox(daemon, 'flow')
    g = sb.g
  })

  afterAll(async () => {
    await sb?.close()
    rmSync(dir, { recursive: true, force: true })
  })

  it('200 MiB to a binary WebSocket reader that pauses for 5 s arrives byte-exact, and the gateway holds the command back', async () => {
    const id = await execStart(g.publicUrl, 'flow', { command: ['cat', file] })
    const entry = g.gw.execs.get(id)!
    const reader = openPausedBinaryReader(g.publicUrl, id, { pauseAtBytes: 16 * 1024 * 1024, onFrame: (data) => { expect(data[0]).toBe(1) } })
    let rssBefore = 0
    let rssPeak = 0
    const sample = setInterval(() => { rssPeak = Math.max(rssPeak, process.memoryUsage().rss) }, 50)
    await waitFor(() => reader.paused, { timeoutMs: 30_000 })
    global.gc?.()
    rssBefore = process.memoryUsage().rss
    rssPeak = rssBefore
    await waitFor(() => entry.flowHeld, { timeoutMs: 5000 })
    const producedAtPause = entry.stdout.total
    await sleep(5000)
    // Held back: the command produced at most a few windows more while nobody read.
    expect(entry.stdout.total - producedAtPause).toBeLessThan(16 * 1024 * 1024)
    expect(entry.status).toBe('running')
    reader.ws.resume()
    const code = await reader.closed
    clearInterval(sample)
    expect(code).toBe(1000)
    expect(reader.final).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
    expect(reader.received).toBe(SIZE)
    expect(reader.sha256()).toBe(digest)
    expect(rssPeak - rssBefore, 'gateway (and client) RSS growth while paused and after').toBeLessThan(64 * 1024 * 1024)
  }, 120_000)

  it('a reader that never attaches costs only the retention: the command runs at full speed', async () => {
    const id = await execStart(g.publicUrl, 'flow', { command: ['cat', file] })
    await waitFor(() => g.gw.execs.get(id)!.finished, { timeoutMs: 60_000 })
    const e = g.gw.execs.get(id)!
    expect(e.toJSON()).toMatchObject({ status: 'exited', exitCode: 0, stdoutBytes: SIZE })
    expect(e.stdout.tail().data.length).toBe(8 * 1024 * 1024)
    expect(e.stdout.tail().truncated).toBe(true)
  }, 120_000)
})
