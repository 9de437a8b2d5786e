import { describe, it, expect, beforeAll, afterAll } from 'vitest'
import type { TestGateway } from '../helpers/gateway.js'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import { api, execStart, execWait, outputOf, readEvents, readWebSocket } from '../helpers/api.js'
import { sleep, waitFor } from '../helpers/wait.js'

// The whole path, client → gateway → supervisor process → SSH daemon → process, against the
// embedded ssh2 daemon and against Debian's OpenSSH sshd.

function alive (pid: number): boolean {
  try { process.kill(pid, 0); return true } catch { return false }
}

const targets = ['embedded', 'openssh'] as const

describe.each(targets)('exec through a supervisor to the %s SSH daemon', (target) => {
  let sb: TestSandbox
  let g: TestGateway
  const sandbox = `sbx-${target}`

  beforeAll(async () => {
    sb = await startSandbox(target, sandbox)
    g = sb.g
  })

  afterAll(async () => { await sb?.close() })

  it('reports the exit code with stdout and stderr kept apart', async () => {
    const r = await execWait(g.publicUrl, sandbox, { command: ['sh', '-c', 'echo out; echo err >&2; exit 7'] })
    expect(r.status).toBe(200)
    expect(r.body).toMatchObject({ status: 'exited', exitCode: 7, signal: null, timedOut: false, error: null, stdout: 'out\n', stderr: 'err\n', stdoutBytes: 4, stderrBytes: 4 })
    expect(r.headers.get('location')).toBe(`/v1/execs/${r.body.id}`)
  })

  it('delivers argv byte for byte through the quoting', async () => {
    const args = ["it's", '$(id)', '`id`', '', 'two\nlines', 'ünïcødé 😀', '"quoted"', '\\back', '*', '-n', 'a=b', ';', '$HOME', "'"]
    const r = await execWait(g.publicUrl, sandbox, { command: ['printf', '[%s]', ...args] })
    expect(r.body.exitCode).toBe(0)
    expect(r.body.stdout).toBe(args.map((a) => `[${a}]`).join(''))
  })

  it('sends stdin then EOF, applies env and workdir', async () => {
    const text = 'line one\nline two ü\n'.repeat(1000)
    const r1 = await execWait(g.publicUrl, sandbox, { command: ['cat'], stdin: text })
    expect(r1.body.stdout).toBe(text)
    const bytes = Buffer.from(Array.from({ length: 256 }, (_, i) => i))
    const r2 = await execWait(g.publicUrl, sandbox, { command: ['cat'], stdinBase64: bytes.toString('base64') }, '&encoding=base64')
    expect(Buffer.from(r2.body.stdout, 'base64').equals(bytes)).toBe(true)
    const r3 = await execWait(g.publicUrl, sandbox, { command: ['sh', '-c', 'echo "$FOO|$BAR|$(pwd)"'], env: { FOO: "a b 'c' $x", BAR: 'ü' }, workdir: '/tmp' })
    expect(r3.body.stdout).toBe("a b 'c' $x|ü|/tmp\n")
  })

  it('reports a process killed by a signal as signal KILL, not an exit code', async () => {
    const r = await execWait(g.publicUrl, sandbox, { command: ['sh', '-c', 'kill -9 $$'] })
    expect(r.status).toBe(200)
    expect(r.body).toMatchObject({ status: 'exited', exitCode: null, signal: 'KILL' })
  })

  it('kills the process tree on timeout and ends with 124, timedOut', async () => {
    const started = Date.now()
    const r = await execWait(g.publicUrl, sandbox, { command: ['sh', '-c', 'sleep 30 & echo $$ $!; wait'], timeoutSeconds: 1 })
    const ms = Date.now() - started
    expect(r.status).toBe(200)
    expect(r.body).toMatchObject({ status: 'exited', exitCode: 124, timedOut: true, signal: null })
    expect(ms).toBeLessThan(5000)
    const pids = r.body.stdout.trim().split(' ').map(Number)
    expect(pids).toHaveLength(2)
    await waitFor(() => pids.every((p: number) => !alive(p)), { timeoutMs: 2000, intervalMs: 50 })
  })

  it('delivers a signal to the command (trap runs) and refuses signals after the end', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', "trap 'echo trapped; exit 42' TERM; echo ready; while :; do sleep 0.1; done"] })
    await waitFor(async () => (await api(g.publicUrl, 'GET', `/v1/execs/${id}`)).body.stdoutBytes > 0, { timeoutMs: 5000, intervalMs: 50 })
    const s = await api(g.publicUrl, 'POST', `/v1/execs/${id}/signal`, { signal: 'TERM' })
    expect(s.status).toBe(202)
    const events = await readEvents(g.publicUrl, id)
    expect(events.at(-1)).toEqual({ type: 'exit', exitCode: 42, signal: null, timedOut: false })
    expect(outputOf(events, 'stdout')).toBe('ready\ntrapped\n')
    const again = await api(g.publicUrl, 'POST', `/v1/execs/${id}/signal`, { signal: 'TERM' })
    expect(again.status).toBe(409)
    expect(again.body.code).toBe('exec_finished')
  })

  it('DELETE kills a running exec and forgets it', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'echo $$; exec sleep 60'] })
    await waitFor(async () => (await api(g.publicUrl, 'GET', `/v1/execs/${id}`)).body.stdoutBytes > 0, { timeoutMs: 5000, intervalMs: 50 })
    const pid = Number(g.gw.execs.get(id)!.stdout.tail().data.toString().trim())
    expect(alive(pid)).toBe(true)
    const d = await api(g.publicUrl, 'DELETE', `/v1/execs/${id}`)
    expect(d.status).toBe(204)
    expect((await api(g.publicUrl, 'GET', `/v1/execs/${id}`)).status).toBe(404)
    await waitFor(() => !alive(pid), { timeoutMs: 2000, intervalMs: 50 })
  })

  it('gives the same outcome in ?wait=true, WebSocket, SSE, NDJSON and GET', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.05; done; exit 5'] })
    const [ws, sse, nd] = await Promise.all([
      readWebSocket(g.publicUrl, id),
      readEvents(g.publicUrl, id, 'text/event-stream'),
      readEvents(g.publicUrl, id, 'application/x-ndjson')
    ])
    const final = { type: 'exit', exitCode: 5, signal: null, timedOut: false }
    for (const events of [ws.events, sse, nd]) {
      expect(events.at(-1)).toEqual(final)
      expect(events.filter((e) => e.type === 'exit' || e.type === 'error')).toHaveLength(1)
      expect(outputOf(events, 'stdout')).toBe('o1\no2\no3\n')
      expect(outputOf(events, 'stderr')).toBe('e1\ne2\ne3\n')
    }
    expect(ws.closeCode).toBe(1000)
    const got = await api(g.publicUrl, 'GET', `/v1/execs/${id}`)
    expect(got.body).toMatchObject({ status: 'exited', exitCode: 5, signal: null, timedOut: false, error: null, stdoutBytes: 9, stderrBytes: 9 })
    const waited = await execWait(g.publicUrl, sandbox, { command: ['sh', '-c', 'for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.05; done; exit 5'] })
    expect(waited.body).toMatchObject({ status: 'exited', exitCode: 5, signal: null, timedOut: false, stdout: 'o1\no2\no3\n', stderr: 'e1\ne2\ne3\n' })
  })

  it('replays the whole output to a late reader, and from an offset', async () => {
    const r = await execWait(g.publicUrl, sandbox, { command: ['sh', '-c', 'printf 0123456789'] })
    const all = await readEvents(g.publicUrl, r.body.id)
    expect(outputOf(all, 'stdout')).toBe('0123456789')
    const rest = await readEvents(g.publicUrl, r.body.id, 'application/x-ndjson', '?stdoutOffset=4')
    expect(rest[0]).toMatchObject({ type: 'stdout', offset: 4 })
    expect(outputOf(rest, 'stdout')).toBe('456789')
  })

  it('passes interactive stdin frames and EOF over the WebSocket', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['cat'], interactive: true })
    const res = await readWebSocket(g.publicUrl, id, {
      onOpen: (ws) => {
        ws.send(JSON.stringify({ type: 'stdin', data: 'hello ' }))
        ws.send(Buffer.concat([Buffer.from([0]), Buffer.from('world\n')]), { binary: true })
        setTimeout(() => ws.send(JSON.stringify({ type: 'eof' })), 100)
      }
    })
    expect(outputOf(res.events, 'stdout')).toBe('hello world\n')
    expect(res.events.at(-1)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
  })

  it('runs under a pseudo-terminal with the requested size', async () => {
    const r = await execWait(g.publicUrl, sandbox, { command: ['sh', '-c', 'stty size; tty >/dev/null && echo is-a-tty; echo to-stderr >&2'], tty: true, cols: 120, rows: 40 })
    expect(r.status).toBe(200)
    expect(r.body.exitCode).toBe(0)
    // Under a tty stdout and stderr merge, and the line discipline turns \n into \r\n.
    expect(r.body.stdout.replaceAll('\r\n', '\n')).toBe('40 120\nis-a-tty\nto-stderr\n')
    expect(r.body.stderr).toBe('')
  })

  it('resizes the pseudo-terminal from the WebSocket', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'stty size; read x; stty size'], tty: true, interactive: true, cols: 120, rows: 40 })
    const res = await readWebSocket(g.publicUrl, id, {
      onOpen: (ws) => {
        // Only once the first size is out, so the resize cannot overtake it.
        let seen = ''
        let sent = false
        ws.on('message', (data, isBinary) => {
          if (isBinary || sent) return
          const event = JSON.parse(data.toString())
          if (event.type === 'stdout') seen += event.data
          if (!seen.includes('40 120')) return
          sent = true
          ws.send(JSON.stringify({ type: 'resize', cols: 100, rows: 30 }))
          ws.send(JSON.stringify({ type: 'stdin', data: 'go\n' }))
        })
      }
    })
    const out = outputOf(res.events, 'stdout').replaceAll('\r\n', '\n')
    expect(out).toMatch(/^40 120\n/)
    expect(out.indexOf('30 100\n')).toBeGreaterThan(out.indexOf('40 120\n'))
    expect(outputOf(res.events, 'stderr')).toBe('')
    expect(res.events.at(-1)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
  })

  it('a resize on an exec without a tty is refused (1008) as stdin on a non-interactive one is; the exec goes on', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'sleep 0.5; echo done'], interactive: true })
    const res = await readWebSocket(g.publicUrl, id, { onOpen: (ws) => { ws.send(JSON.stringify({ type: 'resize', cols: 100, rows: 30 })) } })
    expect(res.closeCode).toBe(1008)
    expect(res.closeReason).toBe('resize frames need an exec created with tty: true')
    const done = await readEvents(g.publicUrl, id)
    expect(done.at(-1)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
    expect(outputOf(done, 'stdout')).toBe('done\n')
  })

  it('lists execs and shows the sandbox as connected', async () => {
    const list = await api(g.publicUrl, 'GET', `/v1/execs?sandboxId=${sandbox}&status=exited`)
    expect(list.status).toBe(200)
    expect(list.body.execs.length).toBeGreaterThan(0)
    expect(list.body.execs.every((e: any) => e.sandboxId === sandbox && e.status === 'exited')).toBe(true)
    const s = await api(g.publicUrl, 'GET', `/v1/sandboxes/${sandbox}`)
    expect(s.body).toMatchObject({ id: sandbox, status: 'connected', activeExecs: 0 })
    await sleep(0)
  })
})
