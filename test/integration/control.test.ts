import { describe, it, expect, beforeAll, afterAll } from 'vitest'
import type { TestGateway } from '../helpers/gateway.js'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import { api, execStart, readEvents, readWebSocket } from '../helpers/api.js'
import { waitFor } from '../helpers/wait.js'

// Control of a running exec: every signal name reaches the process, over REST and as a
// WebSocket frame; closing a reader detaches and never kills.

const TRAPPABLE = ['TERM', 'INT', 'HUP', 'QUIT', 'USR1', 'USR2'] as const

function trapScript (sig: string): string[] {
  return ['sh', '-c', `trap 'echo got-${sig}; exit 42' ${sig}; echo ready; while :; do sleep 0.05; done`]
}

describe.each(['embedded', 'openssh'] as const)('control through the %s daemon', (target) => {
  let sb: TestSandbox
  let g: TestGateway
  const sandbox = `control-${target}`

  beforeAll(async () => {
    sb = await startSandbox(target, sandbox)
    g = sb.g
  })

  afterAll(async () => { await sb?.close() })

  const ready = async (id: string): Promise<void> => {
    await waitFor(() => g.gw.execs.get(id)!.stdout.total > 0, { timeoutMs: 5000, intervalMs: 20 })
  }

  it.each(TRAPPABLE)('POST /signal %s reaches the process (its trap runs)', async (sig) => {
    const id = await execStart(g.publicUrl, sandbox, { command: trapScript(sig) })
    await ready(id)
    expect((await api(g.publicUrl, 'POST', `/v1/execs/${id}/signal`, { signal: sig })).status).toBe(202)
    const events = await readEvents(g.publicUrl, id)
    expect(events.filter((e) => e.type === 'stdout').map((e) => e.data).join('')).toBe(`ready\ngot-${sig}\n`)
    expect(events.at(-1)).toEqual({ type: 'exit', exitCode: 42, signal: null, timedOut: false })
  })

  it('POST /signal KILL ends the process, reported as signal KILL', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sleep', '30'] })
    await waitFor(() => g.gw.execs.get(id)!.status === 'running', { timeoutMs: 5000, intervalMs: 20 })
    expect((await api(g.publicUrl, 'POST', `/v1/execs/${id}/signal`, { signal: 'KILL' })).status).toBe(202)
    const events = await readEvents(g.publicUrl, id)
    expect(events.at(-1)).toEqual({ type: 'exit', exitCode: null, signal: 'KILL', timedOut: false })
  })

  it('a signal frame on the WebSocket reaches the process', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: trapScript('INT') })
    await ready(id)
    const res = await readWebSocket(g.publicUrl, id, { onOpen: (ws) => ws.send(JSON.stringify({ type: 'signal', signal: 'INT' })) })
    expect(res.events.at(-1)).toEqual({ type: 'exit', exitCode: 42, signal: null, timedOut: false })
  })

  it('closing the WebSocket and aborting /events detach without killing the exec', async () => {
    const id = await execStart(g.publicUrl, sandbox, { command: ['sh', '-c', 'echo start; sleep 1; echo end; exit 9'] })
    const entry = g.gw.execs.get(id)!
    await readWebSocket(g.publicUrl, id, { onOpen: (ws) => setTimeout(() => ws.close(), 200) })
    const ac = new AbortController()
    const sse = await fetch(`${g.publicUrl}/v1/execs/${id}/events`, { headers: { accept: 'text/event-stream' }, signal: ac.signal })
    expect(sse.status).toBe(200)
    ac.abort()
    await waitFor(() => entry.readers === 0, { timeoutMs: 2000, intervalMs: 20 })
    expect(entry.finished).toBe(false)
    await waitFor(() => entry.finished, { timeoutMs: 5000, intervalMs: 20 })
    expect((await api(g.publicUrl, 'GET', `/v1/execs/${id}`)).body).toMatchObject({ status: 'exited', exitCode: 9 })
    expect(entry.stdout.tail().data.toString()).toBe('start\nend\n')
  })
})
