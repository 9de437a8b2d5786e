import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { existsSync, mkdirSync } from 'node:fs'
import { dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { chromium, type Browser, type BrowserContext, type Page, type Request } from 'playwright-core'
import { startSandbox, type TestSandbox } from '../helpers/sandbox.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { startTcpProxy, type TcpProxy } from '../helpers/tcp-proxy.js'
import { api, execStart, execWait } from '../helpers/api.js'

// The dashboard in a real headless Chromium, against a real gateway, real supervisor processes
// and the embedded SSH daemon: what a user sees, down to the bytes in the xterm.js terminal.

const CHROMIUM = '/usr/bin/chromium'
// Root needs --no-sandbox; the rest keep Chromium off the network, which is closed here.
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync']
const SCREENSHOT = fileURLToPath(new URL('../../docs/dashboard.png', import.meta.url))
const TOKEN = 'secret-token'
const WAIT = { timeout: 20_000, polling: 50 }

interface DashboardWindow { dashboard: { terminalText: () => Promise<string>, textNow: () => string } }

describe('dashboard', () => {
  let browser: Browser | undefined
  let sb: TestSandbox | undefined
  let locked: TestSandbox | undefined
  let doomed: SupervisorProcess | undefined
  let proxy: TcpProxy | undefined
  const contexts: BrowserContext[] = []
  // Uncaught exceptions in the page fail the test that caused them.
  let pageErrors: string[] = []

  beforeAll(async () => {
    if (!existsSync(CHROMIUM)) {
      throw new Error(`${CHROMIUM} is missing: the dashboard tests drive a real Chromium. Install it with \`apt-get install -y chromium\` (Debian/Ubuntu; test/global-setup.ts does it when run as root), then run the tests again.`)
    }
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS })
    // A short session wait, so an exec on a sandbox whose supervisor died fails within the test.
    sb = await startSandbox('embedded', 'box', { sessionWaitMs: 1000, reattachTimeoutMs: 2000 })
  })

  afterAll(async () => {
    for (const c of contexts) await c.close().catch(() => undefined)
    await browser?.close()
    await proxy?.close()
    await doomed?.stop()
    await locked?.close()
    await sb?.close()
  })

  afterEach(() => {
    const errors = pageErrors
    pageErrors = []
    expect(errors).toEqual([])
  })

  // A fresh profile per test: nothing (a saved token, say) leaks from one test into another.
  // fakeClock: the page's timers run on a clock the test can move (it ticks on by itself too).
  async function openDashboard (url: string, opts: { fakeClock?: boolean } = {}): Promise<Page> {
    const context = await browser!.newContext({ viewport: { width: 1280, height: 760 } })
    contexts.push(context)
    const page = await context.newPage()
    page.on('pageerror', (err) => pageErrors.push(String(err)))
    if (opts.fakeClock === true) await page.clock.install()
    await page.goto(url + '/')
    await page.locator('#terminal .xterm').waitFor()
    return page
  }

  async function chooseSandbox (page: Page, id: string): Promise<void> {
    const row = page.locator(`[data-testid="sandbox"][data-sandbox-id="${id}"]`)
    await row.waitFor()
    await row.locator('input[type="radio"]').check()
  }

  async function run (page: Page, command: string, opts: { tty?: boolean } = {}): Promise<void> {
    await page.getByLabel('Command', { exact: true }).fill(command)
    await page.getByLabel('tty', { exact: true }).setChecked(opts.tty ?? false)
    await page.getByRole('button', { name: 'Run', exact: true }).click()
  }

  async function postOf (page: Page, sandboxId: string): Promise<Request> {
    return await page.waitForRequest((r) => r.method() === 'POST' && r.url().endsWith(`/v1/sandboxes/${sandboxId}/execs`))
  }

  async function statusIs (page: Page, text: string): Promise<void> {
    await page.waitForFunction((t) => document.getElementById('exec-status')?.textContent === t, text, WAIT)
  }

  async function terminalText (page: Page): Promise<string> {
    return await page.evaluate(async () => await (window as unknown as DashboardWindow).dashboard.terminalText())
  }

  async function statusText (page: Page): Promise<string> {
    return await page.locator('#exec-status').innerText()
  }

  it('runs a shell line on the chosen sandbox and shows its output live, then exit 7', async () => {
    const page = await openDashboard(sb!.g.publicUrl)
    const row = page.locator('[data-testid="sandbox"][data-sandbox-id="box"]')
    await row.waitFor()
    expect(await row.getAttribute('data-status')).toBe('connected')
    expect(await row.locator('.active').innerText()).toBe('0 active')
    await chooseSandbox(page, 'box')

    const [posted] = await Promise.all([postOf(page, 'box'), run(page, 'for i in 1 2 3; do echo line$i; sleep 0.5; done; exit 7')])
    expect(posted.postDataJSON()).toMatchObject({ command: ['sh', '-c', 'for i in 1 2 3; do echo line$i; sleep 0.5; done; exit 7'], tty: false })

    // Read in the page at the moment line1 is in the terminal: the exec must still be running.
    const atLine1 = await page.waitForFunction(() => {
      const text = (window as unknown as DashboardWindow).dashboard.textNow()
      return text.includes('line1') ? { text, status: document.getElementById('exec-status')!.textContent } : false
    }, undefined, WAIT)
    const seen = await atLine1.jsonValue() as { text: string, status: string }
    expect(seen.status).toBe('running')
    expect(seen.text).not.toContain('line3')

    await statusIs(page, 'exit 7')
    expect((await terminalText(page)).split('\n')).toEqual(['line1', 'line2', 'line3'])
    expect(await page.locator('#error').isHidden()).toBe(true)
    const execId = await page.locator('#exec-id').innerText()
    await page.locator(`[data-testid="recent-exec"][data-exec-id="${execId}"]`).waitFor()

    mkdirSync(dirname(SCREENSHOT), { recursive: true })
    await page.screenshot({ path: SCREENSHOT })
  })

  it('runs a tty exec in the xterm.js terminal, with keystrokes as stdin', async () => {
    const page = await openDashboard(sb!.g.publicUrl)
    await chooseSandbox(page, 'box')

    const [posted] = await Promise.all([postOf(page, 'box'), run(page, 'tty; stty size', { tty: true })])
    const body = posted.postDataJSON() as { tty: boolean, interactive: boolean, cols: number, rows: number }
    expect(body).toMatchObject({ tty: true, interactive: true })
    expect(body.cols).toBeGreaterThan(20)
    expect(body.rows).toBeGreaterThan(5)
    await statusIs(page, 'exit 0')
    // What xterm.js rendered on screen, not only what it parsed.
    const rendered = await page.locator('#terminal .xterm-rows').innerText()
    expect(rendered).toMatch(/\/dev\/pts\/\d+/)
    expect(rendered).toContain(`${body.rows} ${body.cols}`)

    await run(page, 'printf "name? "; read -r name; echo "hello, $name"', { tty: true })
    await page.waitForFunction(() => (window as unknown as DashboardWindow).dashboard.textNow().includes('name?'), undefined, WAIT)
    await page.locator('#terminal').click()
    await page.keyboard.type('dashboard')
    await page.keyboard.press('Enter')
    await statusIs(page, 'exit 0')
    expect(await terminalText(page)).toContain('hello, dashboard')
  })

  it('reconnects after the connection is cut mid-exec and shows every line exactly once', async () => {
    const port = Number(new URL(sb!.g.publicUrl).port)
    proxy = await startTcpProxy({ targetHost: '127.0.0.1', targetPort: port })
    const page = await openDashboard(`http://${proxy.host}:${proxy.port}`)
    const sockets: string[] = []
    page.on('websocket', (ws) => sockets.push(ws.url()))
    await chooseSandbox(page, 'box')

    await run(page, 'for i in $(seq 1 40); do echo n$i; sleep 0.1; done')
    await page.waitForFunction(() => /(^|\n)n8(\n|$)/.test((window as unknown as DashboardWindow).dashboard.textNow()), undefined, WAIT)
    proxy.resetAll()
    expect(await statusText(page)).toBe('running')

    await statusIs(page, 'exit 0')
    const lines = (await terminalText(page)).split('\n')
    expect(lines).toEqual(Array.from({ length: 40 }, (_, i) => `n${i + 1}`))
    expect(Number(await page.locator('#connection').getAttribute('data-reconnects'))).toBeGreaterThanOrEqual(1)
    // The socket after the cut resumed from the bytes already shown, not from the start.
    expect(sockets.length).toBeGreaterThanOrEqual(2)
    const resumed = new URL(sockets[sockets.length - 1]!).searchParams
    expect(Number(resumed.get('stdoutOffset'))).toBeGreaterThanOrEqual('n1\n'.length * 8)
    expect(resumed.get('stderrOffset')).toBe('0')
  })

  it('with --api-token: shows the 401 until a token is saved, then runs with it', async () => {
    locked = await startSandbox('embedded', 'locked', { apiTokens: [TOKEN] })
    const base = locked.g.publicUrl
    // The page and xterm.js are readable without a token; the API and unknown paths are not.
    for (const path of ['/', '/app.js', '/style.css', '/favicon.svg', '/dashboard/config', '/assets/xterm/lib/xterm.mjs', '/assets/xterm/css/xterm.css', '/assets/xterm-addon-fit/lib/addon-fit.mjs']) {
      expect((await fetch(base + path)).status, path).toBe(200)
    }
    expect((await fetch(`${base}/v1/sandboxes`)).status).toBe(401)
    expect((await fetch(`${base}/v1/no-such-route`)).status).toBe(401)
    expect((await fetch(`${base}/assets/xterm/package.json`)).status).not.toBe(200)
    const openapi = await (await fetch(`${base}/openapi.json`)).json() as { paths: Record<string, unknown> }
    expect(Object.keys(openapi.paths).filter((p) => ['/', '/index.html', '/app.js', '/style.css', '/favicon.svg'].includes(p) || p.startsWith('/assets/') || p.startsWith('/dashboard'))).toEqual([])

    const page = await openDashboard(base)
    const error = page.locator('#error')
    await error.waitFor()
    expect(await error.innerText()).toContain('401 unauthenticated')
    expect(await page.locator('[data-testid="sandbox"]').count()).toBe(0)

    await page.getByLabel('API token').fill(TOKEN)
    await page.getByRole('button', { name: 'Save token' }).click()
    await chooseSandbox(page, 'locked')
    expect(await error.isHidden()).toBe(true)
    await run(page, 'echo authorized')
    await statusIs(page, 'exit 0')
    expect(await terminalText(page)).toBe('authorized')

    // Kept across reloads; forgetting it makes the next request fail with the problem shown.
    await page.reload()
    expect(await page.getByLabel('API token').inputValue()).toBe(TOKEN)
    await chooseSandbox(page, 'locked')
    await page.getByRole('button', { name: 'Forget' }).click()
    await error.waitFor()
    await run(page, 'echo refused')
    await statusIs(page, '401 unauthenticated')
    expect(await error.innerText()).toMatch(/^run: 401 unauthenticated: .*bearer token/)
  })

  it('reopens a recent exec from the list with its output from the start and its status', async () => {
    const page = await openDashboard(sb!.g.publicUrl)
    await chooseSandbox(page, 'box')
    await run(page, 'echo reopen-me; echo to-stderr >&2; exit 3')
    await statusIs(page, 'exit 3')
    const first = await page.locator('#exec-id').innerText()
    await run(page, 'echo something-else')
    await statusIs(page, 'exit 0')
    expect(await terminalText(page)).toBe('something-else')

    const sockets: string[] = []
    page.on('websocket', (ws) => sockets.push(ws.url()))
    const item = page.locator(`[data-testid="recent-exec"][data-exec-id="${first}"]`)
    expect(await item.locator('.badge').innerText()).toBe('exit 3')
    await item.click()
    await statusIs(page, 'exit 3')
    expect(await page.locator('#exec-id').innerText()).toBe(first)
    const text = await terminalText(page)
    expect(text).toContain('reopen-me')
    expect(text).toContain('to-stderr')
    expect(text).not.toContain('something-else')
    const attach = new URL(sockets[0]!).searchParams
    expect([attach.get('stdoutOffset'), attach.get('stderrOffset')]).toEqual(['0', '0'])
  })

  it('shows signal KILL from the Kill button, 503 relay_unavailable when the supervisor dies mid-exec, then 503 sandbox_unavailable', async () => {
    doomed = startSupervisorProcess({ gatewayUrl: sb!.g.supervisorUrl, sandboxId: 'doomed', token: sb!.g.token('doomed') })
    await sb!.g.waitConnected('doomed')
    const page = await openDashboard(sb!.g.publicUrl)
    // The Kill button's outcome first, on the healthy sandbox: a signal is an outcome, not an error.
    await chooseSandbox(page, 'box')
    await run(page, 'echo waiting; sleep 30')
    await page.waitForFunction(() => (window as unknown as DashboardWindow).dashboard.textNow().includes('waiting'), undefined, WAIT)
    await page.getByRole('button', { name: 'Kill', exact: true }).click()
    await statusIs(page, 'signal KILL')
    expect(await page.locator('#error').isHidden()).toBe(true)

    await chooseSandbox(page, 'doomed')
    await run(page, 'echo started; sleep 30')
    await page.waitForFunction(() => (window as unknown as DashboardWindow).dashboard.textNow().includes('started'), undefined, WAIT)
    expect(await statusText(page)).toBe('running')

    doomed.signal('SIGKILL')
    // The embedded daemon keeps its execs: the gateway first tries to reattach, and says so.
    await page.waitForFunction(() => document.getElementById('connection')?.textContent === 'reconnecting to the sandbox…', undefined, WAIT)
    await statusIs(page, '503 relay_unavailable')
    expect(await page.locator('#error').innerText()).toMatch(/503 relay_unavailable: \S/)
    // The output that arrived before the failure stays on screen.
    expect(await terminalText(page)).toBe('started')
    await page.waitForFunction(() => document.querySelector('[data-sandbox-id="doomed"]')?.getAttribute('data-status') === 'disconnected', undefined, WAIT)

    await run(page, 'echo never')
    await statusIs(page, '503 sandbox_unavailable')
    expect(await page.locator('#error').innerText()).toContain('503 sandbox_unavailable')
    expect(await terminalText(page)).toBe('')
  })

  it('has a favicon, and loads without a failed request', async () => {
    const res = await fetch(`${sb!.g.publicUrl}/favicon.svg`)
    expect(res.status).toBe(200)
    expect(res.headers.get('content-type')).toMatch(/^image\/svg\+xml/)
    expect(await res.text()).toMatch(/^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/)

    const failed: string[] = []
    const context = await browser!.newContext()
    contexts.push(context)
    const page = await context.newPage()
    page.on('response', (r) => { if (r.status() >= 400) failed.push(`${r.status()} ${r.url()}`) })
    page.on('requestfailed', (r) => failed.push(`${r.failure()?.errorText ?? 'failed'} ${r.url()}`))
    const [icon] = await Promise.all([
      page.waitForResponse((r) => new URL(r.url()).pathname === '/favicon.svg'),
      page.goto(sb!.g.publicUrl + '/')
    ])
    // What the browser itself fetched for the tab's icon.
    expect(icon.status()).toBe(200)
    expect(icon.headers()['content-type']).toMatch(/^image\/svg\+xml/)
    await page.locator('[data-testid="sandbox"]').first().waitFor()
    expect(failed).toEqual([])
  })

  it('shows stderr in red, cut at character boundaries, and a tty exec\'s output as the pty wrote it', async () => {
    const page = await openDashboard(sb!.g.publicUrl)
    await chooseSandbox(page, 'box')
    // € (e2 82 ac) is split across two stderr chunks; é (c3 a9) across two stdout chunks with
    // stderr between them, so each half waits for its own stream's next chunk.
    await run(page, String.raw`echo out; echo err >&2; printf '\342\202' >&2; sleep 0.3; printf '\254 euro\n' >&2; ` +
      String.raw`printf '\303'; sleep 0.3; printf x >&2; sleep 0.3; printf '\251\n'`)
    await statusIs(page, 'exit 0')
    expect((await terminalText(page)).split('\n')).toEqual(['out', 'err', '€ euro', 'xé'])
    // What xterm.js rendered: per row, its runs of text and whether each is red (palette 1).
    const rows = async (): Promise<Array<Array<[string, boolean]>>> => await page.locator('#terminal .xterm-rows > div').evaluateAll((divs) =>
      divs.map((d) => [...d.querySelectorAll('span')].filter((s) => s.textContent!.trim() !== '')
        .map((s) => [s.textContent!.trim(), s.classList.contains('xterm-fg-1')] as [string, boolean]))
        .filter((r) => r.length > 0))
    await expect.poll(rows, { timeout: 5000 }).toEqual([[['out', false]], [['err', true]], [['€ euro', true]], [['x', true], ['é', false]]])

    // A pty merges stderr into its output: nothing to tell apart, nothing recoloured.
    await run(page, 'echo tty-out; echo tty-err >&2; exit 4', { tty: true })
    await statusIs(page, 'exit 4')
    expect((await terminalText(page)).split('\n')).toEqual(['tty-out', 'tty-err'])
    await expect.poll(rows, { timeout: 5000 }).toEqual([[['tty-out', false]], [['tty-err', false]]])
  })

  it('shows how long each exec has been running, then how long it ran, in the exec bar and the recent list', async () => {
    const page = await openDashboard(sb!.g.publicUrl)
    await chooseSandbox(page, 'box')
    await run(page, 'sleep 4')
    const id = (await (await page.waitForFunction(() => /^ex_/.exec(document.getElementById('exec-id')?.textContent ?? '')?.input, undefined, WAIT)).jsonValue()) as string
    const bar = page.locator('#exec-duration')
    const listed = page.locator(`[data-testid="recent-exec"][data-exec-id="${id}"] .duration`)
    // Counting up in whole seconds while it runs (from the first poll that has its startedAt).
    const seconds = async (): Promise<number> => {
      const h = await page.waitForFunction(() => /^\d s$/.exec(document.getElementById('exec-duration')?.textContent ?? '')?.[0], undefined, WAIT)
      return parseInt(await h.jsonValue() as string)
    }
    const first = await seconds()
    expect(await bar.getAttribute('data-running')).toBe('true')
    await expect.poll(async () => await listed.textContent(), { timeout: 5000 }).toMatch(/^\d s$/)
    await page.waitForFunction((s) => document.getElementById('exec-duration')?.textContent === `${s + 1} s`, first, WAIT)

    await statusIs(page, 'exit 0')
    const record = (await api(sb!.g.publicUrl, 'GET', `/v1/execs/${id}`)).body as { startedAt: string, endedAt: string }
    const ms = Date.parse(record.endedAt) - Date.parse(record.startedAt)
    // The gateway stamps startedAt once the command has been launched, so a 4 s sleep may end a
    // little under 4 s after it.
    expect(ms).toBeGreaterThanOrEqual(3800)
    const expected = `${(Math.floor(ms / 100) / 10).toFixed(1)} s`
    // From the record's startedAt and endedAt, once the poll after the exit has read them.
    await expect.poll(async () => await bar.getAttribute('data-ended-at'), { timeout: 5000 }).toBe(record.endedAt)
    expect(await bar.getAttribute('data-started-at')).toBe(record.startedAt)
    expect(await bar.getAttribute('data-running')).toBe('false')
    expect(await bar.textContent()).toBe(expected)
    await expect.poll(async () => await listed.textContent(), { timeout: 5000 }).toBe(expected)
    // Stopped: the next ticks leave it as it is.
    await page.waitForTimeout(1200)
    expect(await bar.textContent()).toBe(expected)
  })

  it('filters the recent execs by status: all, active, exited, failed', async () => {
    const fx = await startSandbox('embedded', 'fbox', { sessionWaitMs: 300 })
    const gone = startSupervisorProcess({ gatewayUrl: fx.g.supervisorUrl, sandboxId: 'fgone', token: fx.g.token('fgone') })
    try {
      await fx.g.waitConnected('fgone')
      await gone.stop()
      const base = fx.g.publicUrl
      const sandboxes = async (): Promise<unknown> => (await api(base, 'GET', '/v1/sandboxes')).body.sandboxes.find((x: { id: string }) => x.id === 'fgone')?.status
      await expect.poll(sandboxes, { timeout: 10_000 }).toBe('disconnected')
      const ok = (await execWait(base, 'fbox', { command: ['true'] })).body.id as string
      const three = (await execWait(base, 'fbox', { command: ['sh', '-c', 'exit 3'] })).body.id as string
      // No supervisor within --session-wait-ms: the exec fails with sandbox_unavailable.
      const failed = await execStart(base, 'fgone', { command: ['true'] })
      await expect.poll(async () => (await api(base, 'GET', `/v1/execs/${failed}`)).body.status, { timeout: 10_000 }).toBe('failed')
      const running = await execStart(base, 'fbox', { command: ['sleep', '30'] })

      const page = await openDashboard(base)
      const shown = async (): Promise<string[]> => await page.locator('[data-testid="recent-exec"]').evaluateAll((bs) => bs.map((b) => (b as HTMLElement).dataset.execId!))
      const filter = page.getByLabel('show')
      await expect.poll(shown, { timeout: 10_000 }).toEqual([running, failed, three, ok])
      await filter.selectOption('active')
      expect(await shown()).toEqual([running])
      await filter.selectOption('exited')
      expect(await shown()).toEqual([three, ok])
      await filter.selectOption('failed')
      expect(await shown()).toEqual([failed])
      expect(await page.locator(`[data-exec-id="${failed}"] .badge`).innerText()).toBe('503 sandbox_unavailable')

      // The filter holds across polls: the killed exec leaves "active" and joins "exited".
      await filter.selectOption('active')
      await api(base, 'POST', `/v1/execs/${running}/signal`, { signal: 'KILL' })
      await page.locator('#no-recent').waitFor()
      expect(await page.locator('#no-recent').innerText()).toBe('None active.')
      expect(await shown()).toEqual([])
      await filter.selectOption('exited')
      expect(await shown()).toEqual([running, three, ok])
      await filter.selectOption('all')
      expect(await shown()).toEqual([running, failed, three, ok])
    } finally {
      await gone.stop()
      await fx.close()
    }
  })

  it('takes the gateway\'s announced heartbeat interval: silent for 50 s is alive at 60 s heartbeats, dead after 3 × 60 s', async () => {
    const slow = await startSandbox('embedded', 'slow', { heartbeatIntervalMs: 60_000 })
    try {
      expect((await api(slow.g.publicUrl, 'GET', '/dashboard/config')).body).toEqual({ heartbeatIntervalMs: 60_000 })
      const page = await openDashboard(slow.g.publicUrl, { fakeClock: true })
      await page.waitForFunction(() => document.getElementById('connection')?.dataset.silenceMs === '180000', undefined, WAIT)
      const sockets: string[] = []
      page.on('websocket', (ws) => sockets.push(ws.url()))
      await chooseSandbox(page, 'slow')
      await run(page, 'echo quiet; sleep 60')
      await page.waitForFunction(() => (window as unknown as DashboardWindow).dashboard.textNow() === 'quiet', undefined, WAIT)
      const connection = page.locator('#connection')
      await page.waitForFunction(() => document.getElementById('connection')?.dataset.state === 'open', undefined, WAIT)

      // A laptop lid shut for 50 s: past the old fixed 45 s, so that used to reconnect (and, at a
      // 60 s interval, every 45 s from then on); now the stream is left alone.
      await page.clock.fastForward(50_000)
      expect(await connection.getAttribute('data-state')).toBe('open')
      expect(await connection.getAttribute('data-reconnects')).toBe('0')
      expect(sockets).toHaveLength(1)

      // 185 s without a frame: three heartbeats missed, the link is taken for dead and resumed.
      await page.clock.fastForward(135_000)
      await page.waitForFunction(() => document.getElementById('connection')?.dataset.reconnects === '1', undefined, WAIT)
      await page.waitForFunction(() => document.getElementById('connection')?.dataset.state === 'open', undefined, WAIT)
      expect(sockets).toHaveLength(2)
      expect(new URL(sockets[1]!).searchParams.get('stdoutOffset')).toBe(String('quiet\n'.length))
      await page.getByRole('button', { name: 'Kill', exact: true }).click()
      await statusIs(page, 'signal KILL')
      expect(await terminalText(page)).toBe('quiet')
    } finally {
      await slow.close()
    }
  })

  it('never takes a stream for dead sooner than 45 s, however short the announced interval', async () => {
    const fast = await startSandbox('embedded', 'fast', { heartbeatIntervalMs: 200 })
    try {
      expect((await api(fast.g.publicUrl, 'GET', '/dashboard/config')).body).toEqual({ heartbeatIntervalMs: 200 })
      const page = await openDashboard(fast.g.publicUrl)
      await page.waitForFunction(() => document.getElementById('connection')?.dataset.heartbeatMs === '200', undefined, WAIT)
      expect(await page.locator('#connection').getAttribute('data-silence-ms')).toBe('45000')
      await chooseSandbox(page, 'fast')
      await run(page, 'sleep 1.5; echo after-heartbeats')
      await statusIs(page, 'exit 0')
      expect(await terminalText(page)).toBe('after-heartbeats')
      expect(await page.locator('#connection').getAttribute('data-reconnects')).toBe('0')
    } finally {
      await fast.close()
    }
  })
})
