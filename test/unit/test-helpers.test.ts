// The test helpers are themselves fault-injection machinery: if they lie, every fault test lies.
import { connect, createServer, type Server, type Socket } from 'node:net'
import ssh2 from 'ssh2'
import type { Client as SshClient, ClientChannel, ConnectConfig } from 'ssh2'
import { afterEach, describe, expect, it } from 'vitest'
import { startOpenSshd } from '../helpers/openssh.js'
import { startScriptedSshd } from '../helpers/scripted-sshd.js'
import { startTcpProxy } from '../helpers/tcp-proxy.js'
import { sleep, timed, waitFor } from '../helpers/wait.js'
import { generateEd25519KeyPair } from '../../src/ssh-keys.js'

const { Client } = ssh2

const cleanups: Array<() => unknown> = []
function onCleanup (fn: () => unknown): void {
  cleanups.push(fn)
}
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!()
})

function hostKeyVerifier (hostPublicKey: string): (key: Buffer) => boolean {
  const expected = Buffer.from(hostPublicKey.split(' ')[1]!, 'base64')
  return (key) => key.equals(expected)
}

/** Connects an ssh2 client; rejects on the first error before 'ready'. */
function sshConnect (cfg: ConnectConfig): Promise<SshClient> {
  const client = new Client()
  onCleanup(() => client.destroy())
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => reject(err)
    client.once('error', onError)
    client.once('ready', () => {
      client.off('error', onError)
      // Tests that care attach their own listener; this one keeps a late error from crashing.
      client.on('error', () => undefined)
      resolve(client)
    })
    client.connect({ readyTimeout: 10_000, ...cfg })
  })
}

interface ExecResult {
  stdout: string
  stderr: string
  code: number | null | undefined
  signal: string | undefined
}

function execAndCollect (client: SshClient, command: string): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    client.exec(command, (err, channel) => {
      if (err) {
        reject(err)
        return
      }
      let stdout = ''
      let stderr = ''
      let code: number | null | undefined
      let signal: string | undefined
      channel.on('data', (d: Buffer) => (stdout += d.toString('utf8')))
      channel.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')))
      channel.on('exit', (c: number | null, s?: string) => {
        code = c
        signal = s
      })
      channel.on('error', reject)
      channel.on('close', () => resolve({ stdout, stderr, code, signal }))
    })
  })
}

interface RecordedExec {
  channel: ClientChannel
  stdout(): string
  exitCode(): number | null | undefined
  closed(): boolean
  /** Resolves when the exit status arrives (or at once if it already did). */
  exited: Promise<number | null>
  closedP: Promise<void>
}

/**
 * Opens an exec and records its events. Listeners must be attached inside the exec callback:
 * data and exit-status can arrive in the same read as the exec reply, before an awaiting caller
 * would get a chance to listen.
 */
function openExec (client: SshClient, command: string, env?: Record<string, string>): Promise<RecordedExec> {
  return new Promise((resolve, reject) => {
    client.exec(command, env === undefined ? {} : { env }, (err, channel) => {
      if (err) {
        reject(err)
        return
      }
      let out = ''
      let code: number | null | undefined
      let closed = false
      channel.on('error', () => undefined)
      channel.on('data', (d: Buffer) => (out += d.toString('utf8')))
      const exited = new Promise<number | null>((resolve) =>
        channel.once('exit', (c: number | null) => {
          code = c
          resolve(c)
        })
      )
      const closedP = new Promise<void>((resolve) =>
        channel.once('close', () => {
          closed = true
          resolve()
        })
      )
      resolve({ channel, stdout: () => out, exitCode: () => code, closed: () => closed, exited, closedP })
    })
  })
}

/** A TCP echo server, the simplest target that shows bytes really flow through the proxy. */
async function startEcho (): Promise<{ port: number; sockets: Set<Socket> }> {
  const sockets = new Set<Socket>()
  const server: Server = createServer((sock) => {
    sock.on('error', () => undefined)
    sockets.add(sock)
    sock.once('close', () => sockets.delete(sock))
    sock.pipe(sock)
  })
  server.on('error', () => undefined)
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  onCleanup(
    () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy()
        server.close(() => resolve())
      })
  )
  const addr = server.address()
  if (addr === null || typeof addr === 'string') throw new Error('echo: no address')
  return { port: addr.port, sockets }
}

function tcpConnect (port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const sock = connect({ host: '127.0.0.1', port })
    onCleanup(() => sock.destroy())
    sock.once('error', reject)
    sock.once('connect', () => {
      sock.off('error', reject)
      sock.on('error', () => undefined)
      resolve(sock)
    })
  })
}

/** Sends `payload` and resolves with the echo once all of it came back. */
function roundTrip (sock: Socket, payload: string): Promise<string> {
  return new Promise((resolve) => {
    let got = ''
    const onData = (d: Buffer): void => {
      got += d.toString('utf8')
      if (got.length >= payload.length) {
        sock.off('data', onData)
        resolve(got)
      }
    }
    sock.on('data', onData)
    sock.write(payload)
  })
}

describe('OpenSSH sshd helper', () => {
  it('runs a real sshd that accepts an ed25519 key and reports exit status', async () => {
    const clientKey = generateEd25519KeyPair()
    const sshd = await startOpenSshd({ authorizedKeys: [clientKey.public] })
    onCleanup(() => sshd.close())
    expect(sshd.host).toBe('127.0.0.1')
    expect(sshd.hostPublicKey).toMatch(/^ssh-ed25519 [A-Za-z0-9+/=]+/)

    const client = await sshConnect({
      host: sshd.host,
      port: sshd.port,
      username: sshd.user,
      privateKey: clientKey.private,
      hostVerifier: hostKeyVerifier(sshd.hostPublicKey)
    })
    const res = await execAndCollect(client, 'echo hi; exit 5')
    expect(res, sshd.logs()).toEqual({ stdout: 'hi\n', stderr: '', code: 5, signal: undefined })
  })

  it('refuses a key that is not authorized', async () => {
    const allowed = generateEd25519KeyPair()
    const other = generateEd25519KeyPair()
    const sshd = await startOpenSshd({ authorizedKeys: [allowed.public] })
    onCleanup(() => sshd.close())
    await expect(
      sshConnect({ host: sshd.host, port: sshd.port, username: sshd.user, privateKey: other.private })
    ).rejects.toThrow(/authentication methods failed/)
  })

  it('close() stops sshd and frees the port, and is idempotent', async () => {
    const sshd = await startOpenSshd({ authorizedKeys: [generateEd25519KeyPair().public] })
    const { ms } = await timed(sshd.close())
    await sshd.close()
    expect(ms).toBeLessThan(3000)
    await expect(tcpConnect(sshd.port)).rejects.toThrow(/ECONNREFUSED/)
  })
})

describe('TCP proxy', () => {
  it('passes traffic both ways and counts connections', async () => {
    const echo = await startEcho()
    const proxy = await startTcpProxy({ targetHost: '127.0.0.1', targetPort: echo.port })
    onCleanup(() => proxy.close())
    const sock = await tcpConnect(proxy.port)
    expect(await roundTrip(sock, 'hello through the proxy')).toBe('hello through the proxy')
    expect(proxy.connectionCount()).toBe(1)
    sock.end()
    await waitFor(() => proxy.connectionCount() === 0, { timeoutMs: 2000, description: 'proxy connection gone' })
  })

  it('delay mode holds every chunk for delayMs, in order', async () => {
    const echo = await startEcho()
    const proxy = await startTcpProxy({ targetHost: '127.0.0.1', targetPort: echo.port })
    onCleanup(() => proxy.close())
    const sock = await tcpConnect(proxy.port)
    proxy.setMode('delay', 150)
    // Two hops through the proxy (out and back), each delayed.
    const { value, ms } = await timed(roundTrip(sock, 'abc'))
    expect(value).toBe('abc')
    expect(ms).toBeGreaterThanOrEqual(290)
    proxy.setMode('pass')
    const fast = await timed(roundTrip(sock, 'def'))
    expect(fast.value).toBe('def')
    // Well under one delayed hop: pass really stopped delaying.
    expect(fast.ms).toBeLessThan(150)
  })

  it('resetAll() resets both the client and the target side', async () => {
    const echo = await startEcho()
    const proxy = await startTcpProxy({ targetHost: '127.0.0.1', targetPort: echo.port })
    onCleanup(() => proxy.close())
    const sock = await tcpConnect(proxy.port)
    await roundTrip(sock, 'x')
    expect(echo.sockets.size).toBe(1)
    const [upstream] = [...echo.sockets]
    const upstreamError = new Promise<Error>((resolve) => upstream!.once('error', resolve))
    const clientError = new Promise<Error>((resolve) => sock.once('error', resolve))
    const clientClosed = new Promise<void>((resolve) => sock.once('close', () => resolve()))
    proxy.resetAll()
    expect((await clientError).message).toMatch(/ECONNRESET/)
    await clientClosed
    expect((await upstreamError).message).toMatch(/ECONNRESET/)
    await waitFor(() => proxy.connectionCount() === 0, { timeoutMs: 2000 })
  })

  it('resetAll() makes an ssh2 client through the proxy see an error and close', async () => {
    const server = await startScriptedSshd({ onExec: () => undefined })
    onCleanup(() => server.close())
    const proxy = await startTcpProxy({ targetHost: server.host, targetPort: server.port })
    onCleanup(() => proxy.close())
    const client = await sshConnect({ host: proxy.host, port: proxy.port, username: 'test' })
    const errored = new Promise<Error>((resolve) => client.once('error', resolve))
    const closed = new Promise<void>((resolve) => client.once('close', () => resolve()))
    proxy.resetAll()
    expect((await errored).message).toMatch(/ECONNRESET/)
    await closed
  })

  it('blackholeAll() leaves the connection half-open until ssh2 keepalive gives up', async () => {
    const clientKey = generateEd25519KeyPair()
    const sshd = await startOpenSshd({ authorizedKeys: [clientKey.public] })
    onCleanup(() => sshd.close())
    const proxy = await startTcpProxy({ targetHost: sshd.host, targetPort: sshd.port })
    onCleanup(() => proxy.close())
    const client = await sshConnect({
      host: proxy.host,
      port: proxy.port,
      username: sshd.user,
      privateKey: clientKey.private,
      keepaliveInterval: 200,
      keepaliveCountMax: 2
    })
    // The link works before the fault.
    expect((await execAndCollect(client, 'echo up')).stdout).toBe('up\n')

    let closedEarly = false
    client.once('close', () => (closedEarly = true))
    const errored = new Promise<Error>((resolve) => client.once('error', resolve))
    proxy.blackholeAll()
    const { value: err, ms } = await timed(errored)
    expect(err.message).toBe('Keepalive timeout')
    // 3 intervals of 200 ms (count exceeds max on the third tick), plus scheduling slack.
    expect(ms).toBeGreaterThanOrEqual(350)
    expect(ms).toBeLessThan(1500)
    // Nothing was closed by the proxy: the only way out was the client's own keepalive.
    expect(closedEarly).toBe(false)
    expect(proxy.connectionCount()).toBe(1)
  })

  it('blackhole applies to new connections and pass releases the held bytes', async () => {
    const echo = await startEcho()
    const proxy = await startTcpProxy({ targetHost: '127.0.0.1', targetPort: echo.port })
    onCleanup(() => proxy.close())
    proxy.blackholeAll()
    const sock = await tcpConnect(proxy.port)
    let got = ''
    sock.on('data', (d: Buffer) => (got += d.toString('utf8')))
    sock.write('held')
    await sleep(300)
    expect(got).toBe('')
    expect(proxy.connectionCount()).toBe(1)
    proxy.setMode('pass')
    await waitFor(() => got === 'held', { timeoutMs: 2000, description: 'held bytes delivered' })
  })

  it('close() always resolves, even with connections held in blackhole', async () => {
    const echo = await startEcho()
    const proxy = await startTcpProxy({ targetHost: '127.0.0.1', targetPort: echo.port })
    proxy.blackholeAll()
    const sock = await tcpConnect(proxy.port)
    const closed = new Promise<void>((resolve) => sock.once('close', () => resolve()))
    await waitFor(() => proxy.connectionCount() === 1, { timeoutMs: 2000 })
    const { ms } = await timed(proxy.close())
    expect(ms).toBeLessThan(1000)
    await closed
  })
})

describe('scripted ssh2 server', () => {
  it('delivers exit-status 3 without ever closing the channel', async () => {
    const server = await startScriptedSshd({
      onExec: ({ channel }) => {
        channel.write('partial\n')
        channel.exit(3)
      }
    })
    onCleanup(() => server.close())
    const client = await sshConnect({ host: server.host, port: server.port, username: 'anyone' })
    const exec = await openExec(client, 'whatever')
    expect(await exec.exited).toBe(3)
    await sleep(300)
    expect(exec.stdout()).toBe('partial\n')
    expect(exec.closed()).toBe(false)
  })

  it('can close without an exit status, and passes command, env and pty to the script', async () => {
    let seen: { command: string; env: Record<string, string>; pty: boolean } | undefined
    const server = await startScriptedSshd({
      onExec: async ({ command, channel, env, pty }) => {
        seen = { command, env, pty }
        await sleep(10)
        channel.close()
      }
    })
    onCleanup(() => server.close())
    const client = await sshConnect({ host: server.host, port: server.port, username: 'anyone' })
    const exec = await openExec(client, 'echo $FOO', { FOO: 'bar' })
    await exec.closedP
    expect(exec.exitCode()).toBeUndefined()
    expect(seen).toEqual({ command: 'echo $FOO', env: { FOO: 'bar' }, pty: false })
  })

  it('accepts a given host key and close() drops connected clients quickly', async () => {
    const hostKey = generateEd25519KeyPair()
    const server = await startScriptedSshd({ onExec: () => undefined, hostKey: hostKey.private })
    expect(server.hostPublicKey).toBe(hostKey.public.split(' ').slice(0, 2).join(' '))
    const client = await sshConnect({
      host: server.host,
      port: server.port,
      username: 'anyone',
      hostVerifier: hostKeyVerifier(server.hostPublicKey)
    })
    expect(server.connectionCount()).toBe(1)
    const clientClosed = new Promise<void>((resolve) => client.once('close', () => resolve()))
    const { ms } = await timed(server.close())
    expect(ms).toBeLessThan(2100)
    await clientClosed
  })
})

describe('wait helpers', () => {
  it('waitFor resolves once the predicate holds and names what it waited for on timeout', async () => {
    let n = 0
    await waitFor(() => ++n >= 3, { timeoutMs: 1000, intervalMs: 5 })
    expect(n).toBe(3)
    await expect(waitFor(async () => false, { timeoutMs: 50, intervalMs: 10, description: 'the impossible' })).rejects.toThrow(
      /timed out after \d+ ms \(limit 50 ms\) waiting for: the impossible/
    )
  })

  it('timed measures how long a promise takes', async () => {
    const { value, ms } = await timed(sleep(50).then(() => 'done'))
    expect(value).toBe('done')
    expect(ms).toBeGreaterThanOrEqual(45)
  })
})
