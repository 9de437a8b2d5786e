import { existsSync } from 'node:fs'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { chromium, type Browser } from 'playwright-core'
import { api, execStart } from '../helpers/api.js'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'

// Chromium's own EventSource against a real gateway: it reconnects by itself whenever a response
// ends (the gateway ends it after the final event), so without a way to say "done" it replays
// the final event every few seconds, forever. The final event's id ends in "-end", and the
// reconnect that sends it back gets 204, which closes an EventSource for good.
// EventSource cannot send Authorization: against a gateway with --api-token, a read token in the
// URL (?access_token=, minted with the bearer token) is how a page follows an exec.

const CHROMIUM = '/usr/bin/chromium'
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync']
// Chromium's default reconnection time is 3 s: two of them would have shown a loop.
const WATCH_MS = 7000
const API_TOKEN = 'es-api-token'

interface Seen { stdout: string, stderr: string, exits: unknown[], opens: number, errors: number, readyState: number, lastId: string }

// An EventSource on `url` in the page, watched for WATCH_MS.
async function watch (page: import('playwright-core').Page, url: string): Promise<Seen> {
  return await page.evaluate(async ({ url, watchMs }) => {
    const out = { stdout: '', stderr: '', exits: [] as unknown[], opens: 0, errors: 0, readyState: -1, lastId: '' }
    const es = new EventSource(url)
    es.onopen = () => { out.opens++ }
    es.onerror = () => { out.errors++ }
    es.addEventListener('stdout', (e) => { out.stdout += JSON.parse((e as MessageEvent).data).data })
    es.addEventListener('stderr', (e) => { out.stderr += JSON.parse((e as MessageEvent).data).data })
    es.addEventListener('exit', (e) => { out.exits.push(JSON.parse((e as MessageEvent).data)); out.lastId = (e as MessageEvent).lastEventId })
    await new Promise((resolve) => setTimeout(resolve, watchMs))
    out.readyState = es.readyState
    es.close()
    return out
  }, { url, watchMs: WATCH_MS })
}

describe('EventSource in Chromium', () => {
  let browser: Browser | undefined
  let sb: TestSandbox | undefined
  let guarded: TestSandbox | undefined

  beforeAll(async () => {
    if (!existsSync(CHROMIUM)) {
      throw new Error(`${CHROMIUM} is missing: these tests drive a real Chromium. Install it with \`apt-get install -y chromium\` (Debian/Ubuntu; test/global-setup.ts does it when run as root), then run the tests again.`)
    }
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS })
    sb = await startSandbox('embedded', 'es-box')
    guarded = await startSandbox('embedded', 'es-token-box', { apiTokens: [API_TOKEN] })
  })

  afterAll(async () => {
    await browser?.close()
    await sb?.close()
    await guarded?.close()
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

  describe('with --api-token', () => {
    async function startExec (): Promise<string> {
      const res = await api(guarded!.g.publicUrl, 'POST', `/v1/sandboxes/${guarded!.id}/execs`, { command: ['sh', '-c', 'echo one; sleep 0.5; echo two >&2; sleep 0.5; exit 4'] }, { authorization: `Bearer ${API_TOKEN}` })
      expect(res.status).toBe(201)
      return res.body.id as string
    }

    it('a read token in the URL gets every event and the final one once, then stops: its -end id gets 204', async () => {
      const id = await startExec()
      const minted = await api(guarded!.g.publicUrl, 'POST', `/v1/execs/${id}/read-token`, undefined, { authorization: `Bearer ${API_TOKEN}` })
      expect(minted.status).toBe(201)
      const context = await browser!.newContext()
      try {
        const page = await context.newPage()
        const statuses: number[] = []
        page.on('response', (r) => { if (r.url().includes(`/v1/execs/${id}/events`)) statuses.push(r.status()) })
        await page.goto(`${guarded!.g.publicUrl}/healthz`)
        const seen = await watch(page, minted.body.eventsUrl)
        expect(seen.stdout).toBe('one\n')
        expect(seen.stderr).toBe('two\n')
        expect(seen.exits).toEqual([{ type: 'exit', exitCode: 4, signal: null, timedOut: false }])
        expect(seen.lastId).toMatch(/-end$/)
        expect(seen.readyState).toBe(2)
        expect(seen.opens).toBe(1)
        // The stream, then the reconnect with Last-Event-ID <…-end> (same URL, same token): 204.
        expect(statuses).toEqual([200, 204])
      } finally {
        await context.close()
      }
    }, 30_000)

    it('without a token it is refused once (401), and the EventSource gives up instead of retrying', async () => {
      const id = await startExec()
      const context = await browser!.newContext()
      try {
        const page = await context.newPage()
        const statuses: number[] = []
        page.on('response', (r) => { if (r.url().includes(`/v1/execs/${id}/events`)) statuses.push(r.status()) })
        await page.goto(`${guarded!.g.publicUrl}/healthz`)
        for (const url of [`/v1/execs/${id}/events`, `/v1/execs/${id}/events?access_token=egr1.9999999999.AAAA`]) {
          const seen = await watch(page, url)
          expect(seen, url).toMatchObject({ stdout: '', exits: [], opens: 0, errors: 1, readyState: 2 })
        }
        expect(statuses).toEqual([401, 401])
      } finally {
        await context.close()
      }
    }, 30_000)
  })
})
