// The built CLI (bin/exec-gateway.js → dist/), as an operator runs it.
import { spawn, spawnSync, type ChildProcess, type SpawnSyncReturns } from 'node:child_process'
import { mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import WebSocket from 'ws'
import { loadDataDir } from '../../src/data-dir.js'
import { serveFlags } from '../../src/config.js'
import { verifySupervisorToken } from '../../src/tokens.js'

const BIN = fileURLToPath(new URL('../../bin/exec-gateway.js', import.meta.url))
const ROOT = fileURLToPath(new URL('../..', import.meta.url))

// The environment without any EXEC_GATEWAY_* variable, so only the flags given here count.
function cleanEnv (extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {}
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('EXEC_GATEWAY_')) env[k] = v
  return { ...env, ...extra }
}

function cli (args: string[], env: NodeJS.ProcessEnv = cleanEnv()): SpawnSyncReturns<string> {
  const res = spawnSync(process.execPath, [BIN, ...args], { cwd: ROOT, env, encoding: 'utf8', timeout: 30_000 })
  if (res.error !== undefined) throw res.error
  return res
}

const tmpDirs: string[] = []
function tmpDir (): string {
  const d = mkdtempSync(join(tmpdir(), 'egw-cli-'))
  tmpDirs.push(d)
  return d
}
afterAll(() => {
  for (const d of tmpDirs) rmSync(d, { recursive: true, force: true })
})

describe('public-key and token', () => {
  it('public-key prints one ssh-ed25519 line, stable across runs', () => {
    const dataDir = join(tmpDir(), 'data') // created by the CLI
    const a = cli(['public-key', '--data-dir', dataDir])
    expect(a.stderr).toBe('')
    expect(a.status).toBe(0)
    expect(a.stdout).toMatch(/^ssh-ed25519 AAAA[A-Za-z0-9+/]+={0,2}( \S+)?\n$/)
    expect(a.stdout.split('\n')).toHaveLength(2)
    const b = cli(['public-key', `--data-dir=${dataDir}`])
    expect(b.status).toBe(0)
    expect(b.stdout).toBe(a.stdout)
    // The same key the library derives from that directory.
    expect(a.stdout.trim()).toBe(loadDataDir(dataDir).publicKey)
  })

  it('the data dir is created private: files 0600, directory not group/world accessible', () => {
    const dataDir = join(tmpDir(), 'data')
    expect(cli(['public-key', '--data-dir', dataDir]).status).toBe(0)
    const files = readdirSync(dataDir)
    expect(files.length).toBeGreaterThanOrEqual(2)
    for (const f of files) {
      const mode = statSync(join(dataDir, f)).mode & 0o777
      expect(mode.toString(8), f).toBe('600')
    }
    expect(statSync(dataDir).mode & 0o077).toBe(0)
  })

  it('the data dir can come from EXEC_GATEWAY_DATA_DIR', () => {
    const dataDir = join(tmpDir(), 'from-env')
    const res = cli(['public-key'], cleanEnv({ EXEC_GATEWAY_DATA_DIR: dataDir }))
    expect(res.status).toBe(0)
    expect(res.stdout.trim()).toBe(loadDataDir(dataDir).publicKey)
  })

  it('token prints an egw1 token that verifies with the data dir secret', () => {
    const dataDir = join(tmpDir(), 'data')
    const res = cli(['token', 'sbx-1', '--data-dir', dataDir])
    expect(res.stderr).toBe('')
    expect(res.status).toBe(0)
    expect(res.stdout).toMatch(/^egw1\.[^\s]+\n$/)
    const token = res.stdout.trim()
    const { tokenSecret } = loadDataDir(dataDir)
    expect(verifySupervisorToken([tokenSecret], token)).toEqual({ ok: true, sandboxId: 'sbx-1' })
    // A different data dir has a different secret.
    const other = loadDataDir(join(tmpDir(), 'other'))
    expect(verifySupervisorToken([other.tokenSecret], token).ok).toBe(false)
  })

  it('token --ttl-s makes an expiring token', () => {
    const dataDir = join(tmpDir(), 'data')
    const res = cli(['token', 'sbx-2', '--ttl-s', '60', '--data-dir', dataDir])
    expect(res.status).toBe(0)
    const { tokenSecret } = loadDataDir(dataDir)
    const now = Math.floor(Date.now() / 1000)
    expect(verifySupervisorToken([tokenSecret], res.stdout.trim(), now)).toEqual({ ok: true, sandboxId: 'sbx-2' })
    expect(verifySupervisorToken([tokenSecret], res.stdout.trim(), now + 3600)).toEqual({ ok: false, reason: 'token expired' })
  })

  it("token 'bad id!' fails with a message and prints no token", () => {
    const res = cli(['token', 'bad id!', '--data-dir', join(tmpDir(), 'data')])
    expect(res.status).not.toBe(0)
    expect(res.stdout).toBe('')
    expect(res.stderr).toMatch(/sandbox id/)
  })

  it('token without a sandbox id fails with its usage', () => {
    const res = cli(['token', '--data-dir', join(tmpDir(), 'data')])
    expect(res.status).toBe(2)
    expect(res.stderr).toMatch(/usage: exec-gateway token/)
  })
})

describe('usage errors and help', () => {
  it('serve --listen 0.0.0.0:0 without a token exits 2 naming --api-token', () => {
    const res = cli(['serve', '--listen', '0.0.0.0:0', '--supervisor-listen', '127.0.0.1:0', '--data-dir', join(tmpDir(), 'data')])
    expect(res.status).toBe(2)
    expect(res.stderr).toMatch(/--api-token/)
    expect(res.stdout).toBe('')
  })

  it('the same refusal when the address comes from the environment', () => {
    const res = cli(['serve', '--supervisor-listen', '127.0.0.1:0'], cleanEnv({ EXEC_GATEWAY_LISTEN: '0.0.0.0:0', EXEC_GATEWAY_DATA_DIR: join(tmpDir(), 'data') }))
    expect(res.status).toBe(2)
    expect(res.stderr).toMatch(/--api-token/)
  })

  it('bad flag values exit 2 with a message naming the flag', () => {
    const res = cli(['serve', '--close-wait-ms', 'soon'])
    expect(res.status).toBe(2)
    expect(res.stderr).toMatch(/--close-wait-ms/)
    const unknown = cli(['serve', '--bogus'])
    expect(unknown.status).toBe(2)
    expect(unknown.stderr).toMatch(/--bogus/)
  })

  it('--help lists the commands', () => {
    const res = cli(['--help'])
    expect(res.status).toBe(0)
    for (const c of ['serve', 'supervisor', 'token', 'rotate-token-secret', 'public-key']) expect(res.stdout).toContain(c)
  })

  it('serve --help lists every flag with its EXEC_GATEWAY_* variable', () => {
    const res = cli(['serve', '--help'])
    expect(res.status).toBe(0)
    for (const f of serveFlags) {
      expect(res.stdout, f.name).toContain(`--${f.name}`)
      expect(res.stdout, f.name).toContain('EXEC_GATEWAY_' + f.name.replaceAll('-', '_').toUpperCase())
    }
    // The contract's own names, spelled out.
    for (const v of ['EXEC_GATEWAY_LISTEN', 'EXEC_GATEWAY_API_TOKEN', 'EXEC_GATEWAY_SSH_KEEPALIVE_COUNT_MAX', 'EXEC_GATEWAY_EXEC_TTL_S']) {
      expect(res.stdout).toContain(v)
    }
  })

  it('supervisor --help and token --help list their flags', () => {
    const sup = cli(['supervisor', '--help'])
    expect(sup.status).toBe(0)
    for (const f of ['--gateway', '--sandbox-id', '--token', '--ssh-target', '--ssh-user', '--ssh-host-key', '--ca']) expect(sup.stdout).toContain(f)
    expect(sup.stdout).toContain('EXEC_GATEWAY_SANDBOX_ID')
    const tok = cli(['token', '--help'])
    expect(tok.status).toBe(0)
    expect(tok.stdout).toContain('--data-dir')
    expect(tok.stdout).toContain('EXEC_GATEWAY_DATA_DIR')
    const rot = cli(['rotate-token-secret', '--help'])
    expect(rot.status).toBe(0)
    for (const f of ['--data-dir', '--retire']) expect(rot.stdout).toContain(f)
  })

  it('an unknown command exits 2', () => {
    const res = cli(['frobnicate'])
    expect(res.status).toBe(2)
    expect(res.stderr).toMatch(/frobnicate/)
  })

  it('supervisor without --sandbox-id or --token exits 2', () => {
    const res = cli(['supervisor'])
    expect(res.status).toBe(2)
    expect(res.stderr).toMatch(/--sandbox-id/)
  })

  it('supervisor --ssh-user "" (an unset $USER) or a name with spaces exits 2 at start, saying so', () => {
    const base = ['supervisor', '--sandbox-id', 'sbx-u', '--token', 'egw1.x', '--gateway', 'http://127.0.0.1:1']
    const empty = cli([...base, '--ssh-user', ''])
    expect(empty.status).toBe(2)
    expect(empty.stderr).toMatch(/--ssh-user must be an account name.*""/)
    expect(empty.stderr).toMatch(/USER unset/)
    const spaced = cli([...base, '--ssh-user', 'a b'])
    expect(spaced.status).toBe(2)
    expect(spaced.stderr).toMatch(/--ssh-user must be an account name/)
  })
})

// ---- a real serve process ---------------------------------------------------------------------

interface ServeProcess {
  proc: ChildProcess
  publicUrl: string
  supervisorUrl: string
  output: () => string
  exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
}

const running: ChildProcess[] = []
afterEach(async () => {
  for (const p of running.splice(0)) {
    if (p.exitCode === null && p.signalCode === null) {
      const gone = new Promise((resolve) => p.once('exit', resolve))
      p.kill('SIGKILL')
      await gone
    }
  }
})

async function startServe (extra: string[] = []): Promise<ServeProcess> {
  const dataDir = join(tmpDir(), 'data')
  const proc = spawn(process.execPath, [
    BIN, 'serve', '--local-sandbox', '--listen', '127.0.0.1:0', '--supervisor-listen', '127.0.0.1:0', '--data-dir', dataDir, ...extra
  ], { cwd: ROOT, env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] })
  running.push(proc)
  proc.on('error', () => undefined)
  let out = ''
  let err = ''
  proc.stderr!.on('data', (c: Buffer) => { err += c.toString() })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })))
  const listening = await new Promise<Record<string, unknown>>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no "listening" line within 20 s; stdout: ${out} stderr: ${err}`)), 20_000)
    proc.stdout!.on('data', (c: Buffer) => {
      out += c.toString()
      for (const line of out.split('\n')) {
        if (line.trim() === '') continue
        let msg: Record<string, unknown>
        try { msg = JSON.parse(line) } catch { continue }
        if (msg.msg === 'listening') { clearTimeout(timer); resolve(msg) }
      }
    })
    void exited.then((e) => { clearTimeout(timer); reject(new Error(`serve exited early ${JSON.stringify(e)}; stdout: ${out} stderr: ${err}`)) })
  })
  expect(typeof listening.publicUrl).toBe('string')
  expect(typeof listening.supervisorUrl).toBe('string')
  return { proc, publicUrl: listening.publicUrl as string, supervisorUrl: listening.supervisorUrl as string, output: () => out + err, exited }
}

async function exitWithin (p: ServeProcess, ms: number): Promise<{ code: number | null, signal: NodeJS.Signals | null } | 'timeout'> {
  let timer: NodeJS.Timeout | undefined
  const r = await Promise.race([p.exited, new Promise<'timeout'>((resolve) => { timer = setTimeout(() => resolve('timeout'), ms) })])
  clearTimeout(timer)
  return r
}

describe('serve --local-sandbox', () => {
  it('announces its URLs, runs an exec on sandbox local at once, and exits 0 on SIGTERM', async () => {
    const p = await startServe()
    expect(p.publicUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/)
    expect(p.supervisorUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/)
    expect(new URL(p.publicUrl).port).not.toBe('0')

    const res = await fetch(`${p.publicUrl}/v1/sandboxes/local/execs?wait=true`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ command: ['echo', 'hi'] })
    })
    const body = await res.json() as Record<string, unknown>
    expect(res.status, JSON.stringify(body)).toBe(200)
    expect(body).toMatchObject({ status: 'exited', exitCode: 0, signal: null, timedOut: false, stdout: 'hi\n', stderr: '', sandboxId: 'local' })

    const sandboxes = await (await fetch(`${p.publicUrl}/v1/sandboxes`)).json() as { sandboxes: Array<{ id: string, status: string }> }
    expect(sandboxes.sandboxes.map((s) => [s.id, s.status])).toContainEqual(['local', 'connected'])

    const started = Date.now()
    p.proc.kill('SIGTERM')
    const result = await exitWithin(p, 5000)
    expect(result, p.output().slice(-2000)).toEqual({ code: 0, signal: null })
    expect(Date.now() - started).toBeLessThan(5000)
  })

  it('exits 0 within 5 s on SIGTERM even after a refused WebSocket upgrade', async () => {
    const p = await startServe(['--shutdown-grace-ms', '1000'])
    const ws = new WebSocket(`${p.publicUrl.replace(/^http/, 'ws')}/v1/execs/nope/stream`, { origin: 'http://evil.example' })
    const status = await new Promise<number | string>((resolve) => {
      ws.on('unexpected-response', (_req, res) => { res.resume(); resolve(res.statusCode ?? 0) })
      ws.on('open', () => resolve('open'))
      ws.on('error', (e) => resolve(e.message))
    })
    ws.terminate()
    expect(status).toBe(403)
    p.proc.kill('SIGTERM')
    const result = await exitWithin(p, 5000)
    expect(result, p.output().slice(-2000)).toEqual({ code: 0, signal: null })
  })
})
