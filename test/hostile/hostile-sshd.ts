// A hostile sandbox SSH daemon: ssh2's Server, with its internals (`_protocol`) used to send
// what ssh2 itself would never send: data beyond the window, exit reports for any channel id,
// exit-signal names outside the grammar, channel opens, descriptions of any length, re-keys
// at will. A real supervisor process reaches it with `--ssh-target 127.0.0.1:PORT`, so the
// gateway under test meets it exactly as it would meet a compromised sandbox.
//
// Execs the attack does not claim run for real under /bin/sh (output, exit status, signals),
// like a sandbox that behaves until it does not.
import { spawn } from 'node:child_process'
import { createRequire } from 'node:module'
import { createServer, type Socket } from 'node:net'
import ssh2 from 'ssh2'
import type { Connection, ServerChannel, ServerConfig } from 'ssh2'
import { generateEd25519KeyPair } from '../../src/ssh-keys.js'
import { startSupervisorProcess, type SupervisorProcess } from '../helpers/supervisor-process.js'
import { waitFor } from '../helpers/wait.js'
import type { HostileWorld } from './harness.js'

const { Server } = ssh2
// ssh2's own packet sender: queues during a key exchange, encrypts otherwise.
const { sendPacket } = createRequire(import.meta.url)('ssh2/lib/protocol/utils.js') as { sendPacket: (proto: unknown, packet: Buffer) => void }

const MSG = { DISCONNECT: 1, CHANNEL_OPEN: 90, CHANNEL_OPEN_CONFIRMATION: 91, CHANNEL_OPEN_FAILURE: 92, CHANNEL_WINDOW_ADJUST: 93, CHANNEL_DATA: 94, CHANNEL_EXTENDED_DATA: 95, CHANNEL_EOF: 96, CHANNEL_CLOSE: 97, CHANNEL_REQUEST: 98, CHANNEL_SUCCESS: 99, CHANNEL_FAILURE: 100 } as const

// SSH wire encoding: enough for the packets an attack builds by hand.
export const wire = {
  u32: (n: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32BE(n >>> 0); return b },
  str: (s: string | Buffer): Buffer => { const b = typeof s === 'string' ? Buffer.from(s) : s; return Buffer.concat([wire.u32(b.length), b]) },
  bool: (v: boolean): Buffer => Buffer.from([v ? 1 : 0]),
  msg: (type: number, ...parts: Buffer[]): Buffer => Buffer.concat([Buffer.from([type]), ...parts])
}

export interface HostileConn {
  conn: Connection
  sock: Socket
  // The gateway's ids of the session channels open on this connection, oldest first.
  gatewayChannels: () => number[]
  // One packet, as built; ssh2 frames, encrypts and (during a key exchange) queues it.
  raw: (payload: Buffer) => void
  // Channel data that ignores the SSH window (ssh2's own channelData does not look at it).
  channelData: (id: number, data: Buffer) => void
  exitStatus: (id: number, code: number) => void
  exitSignal: (id: number, name: string, coreDumped?: boolean, message?: string) => void
  channelOpen: (type: string, sender: number, extra?: Buffer) => void
  openFailure: (recipient: number, reason: number, description: string) => void
  disconnect: (reason: number, description: string) => void
  // Resolves once the TCP socket has room again (or is gone): floods wait on it, so the
  // daemon's own memory stays small while it overruns the gateway's window.
  drained: () => Promise<void>
}

export interface HostileExec {
  command: string
  channel: ServerChannel
  // The gateway's id of this channel (the recipient of what the daemon sends on it).
  id: number
  conn: HostileConn
  // Runs the command for real and reports its end; resolves when the channel is closed.
  honest: () => Promise<void>
}

export interface HostileSshdOptions {
  // An attack claims an exec by returning anything but 'honest'.
  onExec?: (x: HostileExec) => 'honest' | void | Promise<void>
  // Each connection, once the gateway has authenticated.
  onReady?: (c: HostileConn) => void
  // A session open from the gateway, before ssh2 sees it; return true to take it over.
  onSessionOpen?: (c: HostileConn, sender: number) => boolean
  // In the exec request, before it is answered.
  beforeExecReply?: (c: HostileConn, id: number, command: string) => void
  algorithms?: ServerConfig['algorithms']
}

export interface HostileSshd {
  port: number
  target: string
  // The gateway's KEXINIT key exchange lists, and what each handshake negotiated.
  kexOffers: string[][]
  negotiatedKex: string[]
  // Channel open failures the gateway sent back, by the daemon's sender id.
  openFailuresReceived: number[]
  // Names of the global requests the gateway sent.
  globalRequestsReceived: string[]
  connectionCount: () => number
  close: () => Promise<void>
}

export async function startHostileSshd (opts: HostileSshdOptions = {}): Promise<HostileSshd> {
  const kexOffers: string[][] = []
  const negotiatedKex: string[] = []
  const openFailuresReceived: number[] = []
  const globalRequestsReceived: string[] = []
  const sockets = new Set<Socket>()
  const children = new Set<ReturnType<typeof spawn>>()
  const server = new Server({
    hostKeys: [generateEd25519KeyPair().private],
    ...(opts.algorithms === undefined ? {} : { algorithms: opts.algorithms }),
    // The only place ssh2 says what the client offered.
    debug: (line: string) => {
      const m = /Handshake: \(remote\) KEX method: (.*)$/.exec(line)
      if (m !== null) kexOffers.push(m[1]!.split(','))
    }
  })
  server.on('error', () => undefined)
  server.on('connection', (conn: Connection) => {
    const { _sock: sock, _protocol: proto } = conn as unknown as { _sock: Socket, _protocol: any }
    const open: number[] = []
    const raw = (payload: Buffer): void => {
      if (sock.destroyed) return
      const w = proto._packetRW.write
      const start = w.allocStart
      const packet = w.alloc(payload.length)
      packet.set(payload, start)
      sendPacket(proto, w.finalize(packet))
    }
    const hc: HostileConn = {
      conn,
      sock,
      gatewayChannels: () => [...open],
      raw,
      channelData: (id, data) => raw(wire.msg(MSG.CHANNEL_DATA, wire.u32(id), wire.str(data))),
      exitStatus: (id, code) => raw(wire.msg(MSG.CHANNEL_REQUEST, wire.u32(id), wire.str('exit-status'), wire.bool(false), wire.u32(code))),
      exitSignal: (id, name, coreDumped = false, message = '') => raw(wire.msg(MSG.CHANNEL_REQUEST, wire.u32(id), wire.str('exit-signal'), wire.bool(false), wire.str(name), wire.bool(coreDumped), wire.str(message), wire.str(''))),
      channelOpen: (type, sender, extra = Buffer.alloc(0)) => raw(wire.msg(MSG.CHANNEL_OPEN, wire.str(type), wire.u32(sender), wire.u32(2 * 1024 * 1024), wire.u32(32 * 1024), extra)),
      openFailure: (recipient, reason, description) => raw(wire.msg(MSG.CHANNEL_OPEN_FAILURE, wire.u32(recipient), wire.u32(reason), wire.str(description), wire.str(''))),
      disconnect: (reason, description) => raw(wire.msg(MSG.DISCONNECT, wire.u32(reason), wire.str(description), wire.str(''))),
      drained: async () => {
        if (sock.destroyed || !sock.writableNeedDrain) return
        await new Promise<void>((resolve) => {
          const done = (): void => { sock.off('drain', done); sock.off('close', done); resolve() }
          sock.on('drain', done)
          sock.on('close', done)
        })
      }
    }
    conn.on('error', () => undefined)
    conn.on('handshake', (negotiated: { kex: string }) => { negotiatedKex.push(negotiated.kex) })
    conn.on('authentication', (ctx) => {
      if (ctx.method === 'publickey' || ctx.method === 'none') ctx.accept()
      else ctx.reject(['publickey', 'none'])
    })
    const h = proto._handlers
    const origOpen = h.CHANNEL_OPEN
    h.CHANNEL_OPEN = (p: unknown, info: { type: string, sender: number }) => {
      if (info.type === 'session' && opts.onSessionOpen?.(hc, info.sender) === true) return
      origOpen(p, info)
    }
    const origGlobal = h.GLOBAL_REQUEST
    h.GLOBAL_REQUEST = (p: unknown, name: string, ...rest: unknown[]) => {
      globalRequestsReceived.push(name)
      origGlobal(p, name, ...rest)
    }
    const origFailure = h.CHANNEL_OPEN_FAILURE
    h.CHANNEL_OPEN_FAILURE = (p: unknown, recipient: number, ...rest: unknown[]) => {
      openFailuresReceived.push(recipient)
      origFailure(p, recipient, ...rest)
    }
    conn.on('ready', () => {
      opts.onReady?.(hc)
      conn.on('session', (accept) => {
        const session = accept()
        const id = (session as unknown as { _chanInfo: { outgoing: { id: number } } })._chanInfo.outgoing.id
        open.push(id)
        let run: ReturnType<typeof spawn> | undefined
        session.on('error', () => undefined)
        session.on('env', (ok) => ok?.())
        session.on('pty', (ok) => ok?.())
        session.on('window-change', (ok) => ok?.())
        session.on('signal', (ok, _no, info) => { ok?.(); try { run?.kill(`SIG${info.name}` as NodeJS.Signals) } catch { /* gone */ } })
        session.on('close', () => { open.splice(open.indexOf(id), 1); try { run?.kill('SIGKILL') } catch { /* gone */ } })
        session.on('exec', (accept, _reject, info) => {
          opts.beforeExecReply?.(hc, id, info.command)
          const channel = accept()
          channel.on('error', () => undefined)
          channel.stderr.on('error', () => undefined)
          const honest = async (): Promise<void> => {
            const child = run = spawn('/bin/sh', ['-c', info.command], { stdio: ['pipe', 'pipe', 'pipe'] })
            children.add(child)
            child.on('error', () => undefined)
            child.stdin.on('error', () => undefined)
            channel.pipe(child.stdin)
            child.stdout.pipe(channel, { end: false })
            child.stderr.pipe(channel.stderr, { end: false })
            await new Promise<void>((resolve) => {
              child.once('close', (code, signal) => {
                children.delete(child)
                try {
                  if (signal !== null) channel.exit(signal.replace(/^SIG/, ''), false, '')
                  else channel.exit(code ?? 255)
                  channel.end()
                } catch { /* the gateway went away */ }
                resolve()
              })
            })
          }
          const x: HostileExec = { command: info.command, channel, id, conn: hc, honest }
          const claimed = opts.onExec === undefined ? 'honest' : opts.onExec(x)
          if (claimed === 'honest') void honest()
          else if (claimed instanceof Promise) claimed.catch((err: unknown) => { console.error('hostile sshd: attack failed:', err) })
        })
      })
    })
  })

  const tcp = createServer((sock) => {
    sock.on('error', () => undefined)
    sock.setNoDelay(true)
    sockets.add(sock)
    sock.once('close', () => sockets.delete(sock))
    server.injectSocket(sock)
  })
  tcp.on('error', () => undefined)
  await new Promise<void>((resolve, reject) => {
    tcp.once('error', reject)
    tcp.listen(0, '127.0.0.1', () => { tcp.off('error', reject); resolve() })
  })
  const port = (tcp.address() as { port: number }).port
  let closing: Promise<void> | undefined
  return {
    port,
    target: `127.0.0.1:${port}`,
    kexOffers,
    negotiatedKex,
    openFailuresReceived,
    globalRequestsReceived,
    connectionCount: () => sockets.size,
    close: async () => {
      closing ??= new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 2000)
        for (const c of children) { try { c.kill('SIGKILL') } catch { /* gone */ } }
        for (const s of sockets) s.destroy()
        tcp.close(() => { clearTimeout(t); resolve() })
      })
      await closing
    }
  }
}

// A hostile sandbox beside the harness's honest one: the daemon above, reached through a real
// supervisor process, exactly as a compromised sandbox's would be.
export interface HostileSandbox {
  id: string
  sshd: HostileSshd
  sup: SupervisorProcess
  // POST ?wait=true, bounded; status and body (ExecResult or problem).
  exec: (command: string[], boundMs?: number) => Promise<{ status: number, body: any, ms: number }>
  stop: () => Promise<void>
}

const EXEC_BOUND_MS = 20_000

// The harness's steady load and an attack loop together pass the default 1200 exec creations
// per minute from one address within a file's few minutes; the limit is not what these test.
export const NO_RATE_LIMIT = ['--exec-rate-limit-per-minute', '0']

export async function startHostileSandbox (world: HostileWorld, id: string, opts: HostileSshdOptions = {}): Promise<HostileSandbox> {
  const sshd = await startHostileSshd(opts)
  const sup = startSupervisorProcess({ gatewayUrl: world.supervisorUrl, sandboxId: id, token: world.token(id), sshTarget: sshd.target, sshUser: 'hostile' })
  const stop = async (): Promise<void> => { await sup.stop(); await sshd.close() }
  const exec = async (command: string[], boundMs = EXEC_BOUND_MS): Promise<{ status: number, body: any, ms: number }> => {
    const start = performance.now()
    const res = await fetch(`${world.publicUrl}/v1/sandboxes/${id}/execs?wait=true`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ command }),
      signal: AbortSignal.timeout(boundMs)
    })
    return { status: res.status, body: await res.json(), ms: performance.now() - start }
  }
  try {
    await waitFor(async () => {
      const res = await fetch(`${world.publicUrl}/v1/sandboxes/${id}`)
      return res.status === 200 && (await res.json() as { status: string }).status === 'connected'
    }, { timeoutMs: 15_000, intervalMs: 100, description: `the hostile sandbox ${id} to connect` })
  } catch (err) {
    await stop()
    throw err
  }
  return { id, sshd, sup, exec, stop }
}

// Read from the harness, where the supervisor attacks read it too.
export { refusalCounts } from './harness.js'

// What no sandbox string that reached a record or a log may contain: C0/C1 controls, bidi overrides.
// eslint-disable-next-line no-control-regex -- matching control characters is its job
export const UNSAFE_TEXT = /[\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/
