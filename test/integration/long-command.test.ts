import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { createHash } from 'node:crypto'
import { readdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { startSandbox, type Daemon, type TestSandbox } from '../helpers/sandbox.js'
import { createFaultKit, FAST } from '../helpers/fault-kit.js'
import { INLINE_COMMAND_MAX_BYTES } from '../../src/relay/remote-command.js'
import { MAX_COMMAND_LINE_BYTES } from '../../src/execs/command.js'
import { api, type ApiResponse } from '../helpers/api.js'

// Command lines up to the contract's 262,144 bytes work on both daemons: ssh2's server refuses
// SSH packets over 35,000 bytes and Linux refuses a single argv string over 128 KiB, so long
// lines are staged as a file over a channel first. And a sandbox that half-closes the relay
// ends the exec with a 503 instead of leaving it waiting forever.

async function wait (s: TestSandbox, body: unknown, query = ''): Promise<ApiResponse> {
  return await api(s.g.publicUrl, 'POST', `/v1/sandboxes/${s.id}/execs?wait=true${query}`, body)
}

function stagedFiles (): string[] {
  return readdirSync(tmpdir()).filter((f) => f.startsWith('exec-gateway.'))
}

const sha = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex')

for (const daemon of ['embedded', 'openssh'] as Daemon[]) {
  describe(`long command lines (${daemon})`, () => {
    let s: TestSandbox
    beforeAll(async () => { s = await startSandbox(daemon, `long-${daemon}`) })
    afterAll(async () => { await s?.close() })

    it('just over the inline limit, and a line over 128 KiB (one argv string of sh -c): every byte arrives', async () => {
      const before = stagedFiles().length
      for (const args of [
        ['x'.repeat(INLINE_COMMAND_MAX_BYTES - 20)],
        ['a'.repeat(20_000), 'b'.repeat(20_000)],
        Array(6).fill("it's $(not) `run`; \\ \n".repeat(1400))
      ]) {
        const res = await wait(s, { command: ['printf', '%s\\n', ...args] }, '&encoding=base64')
        expect(res.status).toBe(200)
        expect(res.body.exitCode).toBe(0)
        const out = Buffer.from(res.body.stdout, 'base64')
        expect(sha(out)).toBe(sha(args.map((a) => a + '\n').join('')))
      }
      // Every staged script removed itself.
      expect(stagedFiles().length).toBe(before)
    })

    it('a command line at the contract maximum runs; one byte more is a 400', async () => {
      // `printf %s\n` + args, with the exec-id tag and quoting: fill up to the limit with 8 args.
      const arg = 'z'.repeat(Math.floor((MAX_COMMAND_LINE_BYTES - 200) / 8))
      const ok = await wait(s, { command: ['printf', '%s\\n', ...Array(8).fill(arg)] })
      expect(ok.status).toBe(200)
      expect(ok.body.stdout.length).toBe(8 * (arg.length + 1))
      const tooLong = await wait(s, { command: ['true', 'y'.repeat(MAX_COMMAND_LINE_BYTES)] })
      expect(tooLong.status).toBe(400)
      expect(tooLong.body.code).toBe('invalid_argument')
    })

    it('a staged command keeps env, workdir, stdin, the timeout kill and signal reporting', async () => {
      const big = 'q'.repeat(30_000)
      const res = await wait(s, {
        // eslint-disable-next-line no-template-curly-in-string -- shell expansions, for sh
        command: ['sh', '-c', 'cat; printf " %s %s %s %s" "$PWD" "$FOO" "${#1}" "${#PAD}"', 'sh', big],
        env: { FOO: 'bar', PAD: big },
        workdir: '/',
        stdin: 'in'
      })
      expect(res.body).toMatchObject({ exitCode: 0, stdout: 'in / bar 30000 30000' })
      const started = Date.now()
      const timed = await wait(s, { command: ['sleep', '30'], timeoutSeconds: 1, env: { PAD: big, PAD2: big } })
      expect(timed.body).toMatchObject({ exitCode: 124, timedOut: true })
      expect(Date.now() - started).toBeLessThan(15_000)
      const killed = await wait(s, { command: ['sh', '-c', 'kill -KILL $$', 'sh', big, big] })
      expect(killed.body).toMatchObject({ status: 'exited', signal: 'KILL', exitCode: null })
    })

    it('the sandbox stays usable after long lines', async () => {
      const res = await wait(s, { command: ['echo', 'after'] })
      expect(res.body.stdout).toBe('after\n')
    })
  })
}

describe('a sandbox that half-closes the relay', () => {
  const kit = createFaultKit(FAST)
  afterEach(async () => { await kit.cleanup() })

  it('ends the exec with 503 relay_unavailable, and later execs get a fresh connection', async () => {
    const g = await kit.gateway({ sshKeepaliveIntervalMs: 60_000 })
    let calls = 0
    const sshd = await kit.scripted((ctx) => {
      calls++
      if (calls === 1) {
        // ssh2's server does this on a packet it refuses: it ends its side and waits.
        (ctx.channel as unknown as { _client: { _sock: { end: () => void } } })._client._sock.end()
        return
      }
      ctx.channel.write('fresh\n')
      ctx.channel.exit(0)
      ctx.channel.close()
    })
    kit.supervisor(g, 'half', { sshTarget: `${sshd.host}:${sshd.port}` })
    await g.waitConnected('half')
    const started = Date.now()
    const first = await fetch(`${g.publicUrl}/v1/sandboxes/half/execs?wait=true`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ command: ['x'] }) })
    expect(first.status).toBe(503)
    expect(((await first.json()) as any).code).toBe('relay_unavailable')
    // Long before the (one-minute) keepalive could have noticed.
    expect(Date.now() - started).toBeLessThan(10_000)
    const second = await fetch(`${g.publicUrl}/v1/sandboxes/half/execs?wait=true`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ command: ['x'] }) })
    expect(((await second.json()) as any).stdout).toBe('fresh\n')
  })
})
