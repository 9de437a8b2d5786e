import { existsSync } from 'node:fs'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { chromium, type Browser } from 'playwright-core'
import { execStart } from '../helpers/api.js'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'

// Chromium's own EventSource against a real gateway: it reconnects by itself whenever a response
// ends (the gateway ends it after the final event), so without a way to say "done" it replays
// the final event every few seconds, forever. The final event's id ends in "-end", and the
// reconnect that sends it back gets 204, which closes an EventSource for good.

const CHROMIUM = '/usr/bin/chromium'
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync']
// Chromium's default reconnection time is 3 s: two of them would have shown a loop.
const WATCH_MS = 7000

describe('EventSource in Chromium', () => {
  let browser: Browser | undefined
  let sb: TestSandbox | undefined

  beforeAll(async () => {
    if (!existsSync(CHROMIUM)) {
      throw new Error(`${CHROMIUM} is missing: these tests drive a real Chromium. Install it with \`apt-get install -y chromium\` (Debian/Ubuntu; test/global-setup.ts does it when run as root), then run the tests again.`)
    }
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS })
    sb = await startSandbox('embedded', 'es-box')
  })

  afterAll(async () => {
    await browser?.close()
    await sb?.close()
  })

  it('gets every byte and the final event once, then stops: no reconnect loop after the end', async () => {
    const id = await execStart(sb!.g.publicUrl, sb!.id, { command: ['sh', '-c', 'echo one; sleep 0.5; echo two >&2; sleep 0.5; exit 4'] })
    const context = await browser!.newContext()
    try {
      const page = await context.newPage()
      let requests = 0
      page.on('request', (r) => { if (r.url().includes(`/v1/execs/${id}/events`)) requests++ })
      // Any same-origin page will do; /healthz has no script of its own.
      await page.goto(`${sb!.g.publicUrl}/healthz`)
      const seen = await page.evaluate(async ({ id, watchMs }) => {
        const out = { stdout: '', stderr: '', exits: [] as unknown[], opens: 0, readyState: -1 }
        const es = new EventSource(`/v1/execs/${id}/events`)
        es.onopen = () => { out.opens++ }
        es.addEventListener('stdout', (e) => { out.stdout += JSON.parse((e as MessageEvent).data).data })
        es.addEventListener('stderr', (e) => { out.stderr += JSON.parse((e as MessageEvent).data).data })
        es.addEventListener('exit', (e) => { out.exits.push(JSON.parse((e as MessageEvent).data)) })
        await new Promise((resolve) => setTimeout(resolve, watchMs))
        out.readyState = es.readyState
        es.close()
        return out
      }, { id, watchMs: WATCH_MS })
      expect(seen.stdout).toBe('one\n')
      expect(seen.stderr).toBe('two\n')
      expect(seen.exits).toEqual([{ type: 'exit', exitCode: 4, signal: null, timedOut: false }])
      // Closed by the 204, not waiting to reconnect (CONNECTING = 0).
      expect(seen.readyState).toBe(2)
      expect(seen.opens).toBe(1)
      // The stream, and the one reconnect that was told to stop.
      expect(requests).toBe(2)
    } finally {
      await context.close()
    }
  }, 30_000)
})
