import WebSocket from 'ws'
import { api, outputOf, readEvents } from '../helpers/api.js'
import { waitFor } from '../helpers/wait.js'

// Two execs that run on the gateway while the fuzzers throw garbage at it, to show that other
// execs are unaffected:
// - an interactive `cat` fed a numbered line every 50 ms over its own WebSocket, whose echo must
//   come back complete and in order, then end with the true exit status after EOF;
// - a ticker printing 0, 1, 2, ... every 100 ms with no reader attached, that must account for
//   every number when it is finally signalled, and report the exit status its trap chose.

export interface Canary {
  // Everything sent so far has been echoed, both execs are still running, the ticker advances.
  check: () => Promise<void>
  // Ends both and checks their complete output and exit status.
  finish: () => Promise<void>
}

const ECHO_EXIT = 7
const TICKER_EXIT = 3

export async function startCanary (baseUrl: string, sandboxId: string): Promise<Canary> {
  const create = async (req: Record<string, unknown>): Promise<string> => {
    const r = await api(baseUrl, 'POST', `/v1/sandboxes/${sandboxId}/execs`, req)
    if (r.status !== 201) throw new Error(`canary exec refused: ${r.status} ${r.text}`)
    return r.body.id as string
  }
  const echoId = await create({ command: ['sh', '-c', `cat; exit ${ECHO_EXIT}`], interactive: true })
  const tickerId = await create({ command: ['sh', '-c', `trap 'echo bye; exit ${TICKER_EXIT}' TERM; i=0; while :; do echo $i; i=$((i+1)); sleep 0.1; done`] })

  const ws = new WebSocket(`${baseUrl.replace(/^http/, 'ws')}/v1/execs/${echoId}/stream`)
  const events: any[] = []
  let received = ''
  let closed: { code: number, reason: string } | undefined
  const closedP = new Promise<void>((resolve) => ws.on('close', (code, reason) => { closed = { code, reason: reason.toString() }; resolve() }))
  ws.on('message', (data, isBinary) => {
    if (isBinary) throw new Error('canary: unexpected binary frame')
    const ev = JSON.parse(data.toString())
    events.push(ev)
    if (ev.type === 'stdout') received += ev.data
  })
  ws.on('error', () => {})
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve())
    ws.once('unexpected-response', (_req, res) => reject(new Error(`canary websocket refused: ${res.statusCode}`)))
    ws.once('error', reject)
  })

  let sent = ''
  let n = 0
  const timer = setInterval(() => {
    if (ws.readyState !== ws.OPEN) return
    const line = `canary ${n++} ünï 😀 '$x' \\ "q"\n`
    sent += line
    ws.send(JSON.stringify({ type: 'stdin', data: line }))
  }, 50)

  let lastTicks = -1
  const status = async (id: string): Promise<any> => (await api(baseUrl, 'GET', `/v1/execs/${id}`)).body

  return {
    check: async () => {
      if (closed !== undefined) throw new Error(`canary websocket closed early: ${closed.code} ${closed.reason}`)
      const expected = sent
      await waitFor(() => received.startsWith(expected), { timeoutMs: 10_000, intervalMs: 10, description: `canary echo of ${expected.length} chars (got ${received.length})` })
      if (!received.startsWith(expected)) throw new Error('canary echo diverged')
      const echo = await status(echoId)
      const ticker = await status(tickerId)
      if (echo.status !== 'running' || ticker.status !== 'running') throw new Error(`canary execs not running: ${echo.status} ${ticker.status}`)
      // The ticker prints every 100 ms: it must have moved since the last check.
      await waitFor(async () => (await status(tickerId)).stdoutBytes > lastTicks, { timeoutMs: 5000, intervalMs: 20, description: 'canary ticker advances' })
      lastTicks = (await status(tickerId)).stdoutBytes
    },
    finish: async () => {
      clearInterval(timer)
      if (closed !== undefined) throw new Error(`canary websocket closed early: ${closed.code} ${closed.reason}`)
      ws.send(JSON.stringify({ type: 'eof' }))
      await closedP
      const end = closed as { code: number, reason: string } | undefined
      if (end?.code !== 1000) throw new Error(`canary websocket closed with ${end?.code} ${end?.reason}`)
      if (received !== sent) throw new Error(`canary echo differs: sent ${sent.length} chars, got ${received.length}`)
      const last = events.at(-1)
      if (JSON.stringify(last) !== JSON.stringify({ type: 'exit', exitCode: ECHO_EXIT, signal: null, timedOut: false })) throw new Error(`canary echo ended with ${JSON.stringify(last)}`)
      if (events.filter((e) => e.type === 'exit' || e.type === 'error').length !== 1) throw new Error('canary echo: more than one final event')
      const echo = await status(echoId)
      if (echo.status !== 'exited' || echo.exitCode !== ECHO_EXIT || echo.stdoutBytes !== Buffer.byteLength(sent)) throw new Error(`canary echo record: ${JSON.stringify(echo)}`)

      const sig = await api(baseUrl, 'POST', `/v1/execs/${tickerId}/signal`, { signal: 'TERM' })
      if (sig.status !== 202) throw new Error(`canary ticker signal: ${sig.status} ${sig.text}`)
      const tickerEvents = await readEvents(baseUrl, tickerId)
      const lines = outputOf(tickerEvents, 'stdout').split('\n')
      if (lines.pop() !== '' || lines.pop() !== 'bye') throw new Error(`canary ticker output does not end with bye: ${JSON.stringify(lines.slice(-3))}`)
      if (lines.length < 2 || lines.some((l, i) => l !== String(i))) throw new Error(`canary ticker lost or reordered lines (${lines.length} lines)`)
      const final = tickerEvents.at(-1)
      if (JSON.stringify(final) !== JSON.stringify({ type: 'exit', exitCode: TICKER_EXIT, signal: null, timedOut: false })) throw new Error(`canary ticker ended with ${JSON.stringify(final)}`)
    }
  }
}
