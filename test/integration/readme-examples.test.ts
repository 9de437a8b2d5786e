import { spawn } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { chromium, type Browser } from 'playwright-core'
import { startGateway, type TestGateway } from '../helpers/gateway.js'

// The README's client examples, run as written against a real gateway with its embedded sandbox
// `local`: each block follows a `<!-- tested: <kind> ... -->` line. Only the gateway's address
// is swapped in (the examples say 127.0.0.1:8080; Python reads EXEC_GATEWAY_URL).

const ROOT = fileURLToPath(new URL('../..', import.meta.url))
const README = readFileSync(new URL('../../README.md', import.meta.url), 'utf8')
const CHROMIUM = '/usr/bin/chromium'
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync']

function example (kind: string): string {
  const m = new RegExp(`<!-- tested: ${kind}\\b[^>]*-->\\n\`\`\`[a-z]+\\n([\\s\\S]*?)\\n\`\`\`\\n`).exec(README)
  if (m === null) throw new Error(`README.md has no block marked <!-- tested: ${kind} -->`)
  return m[1]!
}

function run (cmd: string, args: string[], input: string, env: NodeJS.ProcessEnv = process.env): Promise<{ code: number | null, stdout: string, stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { cwd: ROOT, env, stdio: ['pipe', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    p.stdout.on('data', (c: Buffer) => { stdout += c.toString() })
    p.stderr.on('data', (c: Buffer) => { stderr += c.toString() })
    const timer = setTimeout(() => { p.kill('SIGKILL'); reject(new Error(`${cmd} did not finish within 20 s: ${stdout}${stderr}`)) }, 20_000)
    p.on('error', reject)
    p.on('close', (code) => { clearTimeout(timer); resolve({ code, stdout, stderr }) })
    p.stdin.end(input)
  })
}

describe('the README\'s client examples', () => {
  let g: TestGateway
  let browser: Browser | undefined
  beforeAll(async () => {
    g = await startGateway({ localSandbox: true })
    await g.waitConnected('local')
  })
  afterAll(async () => {
    await browser?.close()
    await g?.close()
  })

  it('Node.js: the interactive cat over the WebSocket', async () => {
    const host = new URL(g.publicUrl).host
    const code = example('node').replaceAll('127.0.0.1:8080', host) + '\nws.on(\'close\', () => process.exit(0))\n'
    const r = await run(process.execPath, ['--input-type=module'], code)
    expect(r.stderr).toBe('')
    expect(r.code).toBe(0)
    const events = r.stdout.trim().split('\n').map((l) => JSON.parse(l))
    expect(events.filter((e) => e.type === 'stdout').map((e) => e.data).join('')).toBe('hello\n')
    expect(events.at(-1)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
  })

  it('browser: the same in Chromium, from a page of the gateway\'s origin', async () => {
    if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: install it with \`apt-get install -y chromium\` (test/global-setup.ts does it when run as root)`)
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS })
    const page = await (await browser.newContext()).newPage()
    const logged: string[] = []
    page.on('console', (m) => { logged.push(m.text()) })
    await page.goto(`${g.publicUrl}/healthz`)
    await page.evaluate(`(async () => {\n${example('browser')}\n})()`)
    const deadline = Date.now() + 10_000
    while (!logged.some((l) => l.includes('"type":"exit"')) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50))
    const events = logged.filter((l) => l.startsWith('{')).map((l) => JSON.parse(l))
    expect(events.filter((e) => e.type === 'stdout').map((e) => e.data).join('')).toBe('hello\n')
    expect(events.at(-1)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
  })

  it('browser: EventSource with a read token, against a gateway with --api-token', async () => {
    if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: install it with \`apt-get install -y chromium\` (test/global-setup.ts does it when run as root)`)
    browser ??= await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS })
    const guarded = await startGateway({ localSandbox: true, apiTokens: ['readme-token'] })
    try {
      await guarded.waitConnected('local')
      const created = await fetch(`${guarded.publicUrl}/v1/sandboxes/local/execs`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: 'Bearer readme-token' },
        body: JSON.stringify({ command: ['echo', 'hello'] })
      })
      const { id } = await created.json() as { id: string }
      const page = await (await browser.newContext()).newPage()
      const logged: string[] = []
      // The page's own console.log only: Chromium reports its favicon request's 401 there too.
      page.on('console', (m) => { if (m.type() === 'log') logged.push(m.text()) })
      await page.goto(`${guarded.publicUrl}/healthz`)
      // The example's free names: the exec and the API token the page holds.
      await page.evaluate(`(async () => {\nconst id = ${JSON.stringify(id)}; const token = 'readme-token'\n${example('eventsource-read-token')}\n})()`)
      const deadline = Date.now() + 10_000
      while (!logged.some((l) => l.includes('"type":"exit"')) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50))
      expect(logged[0]).toBe('hello\n')
      expect(JSON.parse(logged.at(-1)!)).toEqual({ type: 'exit', exitCode: 0, signal: null, timedOut: false })
    } finally {
      await guarded.close()
    }
  })

  it('Python: run and wait, then follow the events as NDJSON, standard library only', async () => {
    const r = await run('python3', ['-'], example('python'), { ...process.env, EXEC_GATEWAY_URL: g.publicUrl })
    expect(r.stderr).toBe('')
    expect(r.code).toBe(0)
    expect(r.stdout).toBe("200 3 'hello\\n' 'oops\\n'\n1\n2\n3\n{'type': 'exit', 'exitCode': 0, 'signal': None, 'timedOut': False}\n")
  })
})
