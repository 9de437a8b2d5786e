import { connect, type Socket } from 'node:net'
import { randomUUID } from 'node:crypto'
import type { ServerChannel } from 'ssh2'
import { pino } from 'pino'
import { GatewayEvents } from '../../src/diagnostics.js'
import { ExecEntry } from '../../src/execs/exec-entry.js'
import { ExecRun } from '../../src/execs/exec-run.js'
import type { ValidExec } from '../../src/execs/validate.js'
import { Refusals } from '../../src/refusals.js'
import { SessionRegistry, type SupervisorSession } from '../../src/relay/sessions.js'
import { SshPool } from '../../src/relay/ssh-pool.js'
import { TreeSignals } from '../../src/relay/tree-signals.js'
import { killScript, type SignalName } from '../../src/execs/command.js'
import {
  CONTROL_UNKNOWN_EXIT, decodeKeepMeta, KEEP_ENV, KEEPER_PROTOCOL_VERSION, parseControlLine,
  TIMEOUT_EXIT_MESSAGE, type KeepMeta, type KeptStatus
} from '../../src/schemas/keeper.js'
import { generateEd25519KeyPair } from '../../src/ssh-keys.js'
import { startScriptedSshd, type ScriptedSshd } from '../helpers/scripted-sshd.js'

// A real gateway side (registry, pool, ssh2 client, ExecRun) against a real ssh2 server that
// plays a keeper daemon by the protocol in src/schemas/keeper.ts, with a scripted command: it
// echoes its stdin to stdout (like `cat`), and the test makes it print and exit. Relays are TCP
// connections to that server, opened when the registry asks the one fake supervisor session;
// a test cuts them to lose the relay the way a reset does.

export const silent = pino({ level: process.env.REATTACH_RIG_LOG ?? 'silent' })

class KeptModel {
  readonly meta: KeepMeta
  out = Buffer.alloc(0)
  stdin: Buffer[] = []
  stdinEof = false
  channel: ServerChannel | undefined
  exit: { code: number } | { signal: string, message: string } | undefined
  // While deaf, stdin that reaches the daemon is dropped as if it had never arrived (bytes in
  // flight when the relay dies).
  deaf = false
  readonly startedAt = new Date().toISOString()
  attaches = 0
  signals: string[] = []

  constructor (meta: KeepMeta) { this.meta = meta }

  get stdinReceived (): number { return this.stdin.reduce((n, b) => n + b.length, 0) }

  produce (data: Buffer): void {
    this.out = Buffer.concat([this.out, data])
    const ch = this.channel
    if (ch !== undefined) try { ch.write(data) } catch { /* gone */ }
  }

  attach (ch: ServerChannel, from: number): void {
    const old = this.channel
    this.channel = ch
    if (old !== undefined) try { old.close() } catch { /* gone */ }
    this.attaches++
    ch.on('data', (b: Buffer) => {
      if (this.channel !== ch || this.deaf) return
      this.stdin.push(Buffer.from(b))
      this.produce(b)
    })
    // ssh2 ends the stream on the client's EOF and also when the connection drops; only the
    // first is an EOF of the command's stdin.
    ch.on('end', () => {
      const state = (ch as unknown as { incoming?: { state?: string } }).incoming?.state
      if (this.channel === ch && !this.deaf && state === 'eof') this.stdinEof = true
    })
    ch.on('close', () => { if (this.channel === ch) this.channel = undefined })
    if (from < this.out.length) ch.write(this.out.subarray(from))
    if (this.exit !== undefined) this.#report(ch)
  }

  finish (exit: NonNullable<KeptModel['exit']>): void {
    this.exit = exit
    if (this.channel !== undefined) this.#report(this.channel)
  }

  status (): KeptStatus {
    const exit = this.exit === undefined ? undefined : 'code' in this.exit ? { code: this.exit.code } : { signal: this.exit.signal }
    return {
      meta: this.meta,
      state: this.exit === undefined ? 'running' : 'exited',
      startedAt: this.startedAt,
      ...(exit === undefined ? {} : { exit, endedAt: new Date().toISOString() }),
      timedOut: this.exit !== undefined && 'message' in this.exit,
      stdout: { base: 0, end: this.out.length },
      stderr: { base: 0, end: 0 },
      stdinReceived: this.stdinReceived,
      stdinEof: this.stdinEof,
      attached: this.channel !== undefined
    }
  }

  // Like the real daemon, the exit report only once every byte went out: ssh2 queues channel
  // data behind the window, but sends an exit request at once.
  #report (ch: ServerChannel): void {
    if (ch.writableLength > 0) { setTimeout(() => { if (this.channel === ch) this.#report(ch) }, 5); return }
    const e = this.exit!
    try {
      if ('code' in e) ch.exit(e.code)
      else ch.exit(e.signal, false, e.message)
      ch.end()
      ch.close()
    } catch { /* gone */ }
  }
}

export interface Rig {
  sshd: ScriptedSshd
  registry: SessionRegistry
  pool: SshPool
  kept: Map<string, KeptModel>
  envSeen: Array<Record<string, string>>
  // Answers an exec request before the keeper does, when it returns true (hostile daemons).
  intercept: ((command: string, channel: ServerChannel) => boolean) | undefined
  // Destroys every relay socket open now.
  cut: () => void
  // The supervisor session goes away (and relays are cut); `back` registers a new one.
  disconnect: () => void
  connect: () => void
  relays: () => number
  start: (spec: Partial<ValidExec>, opts?: { reattachTimeoutMs?: number }) => { entry: ExecEntry, run: ExecRun, done: ReturnType<ExecRun['run']> }
  close: () => Promise<void>
}

export async function startRig (opts: { keepsExecs?: boolean, keepaliveIntervalMs?: number } = {}): Promise<Rig> {
  const kept = new Map<string, KeptModel>()
  const envSeen: Array<Record<string, string>> = []
  const sshd = await startScriptedSshd({
    onExec: ({ command, channel, env }) => {
      envSeen.push(env)
      if (rig.intercept?.(command, channel) === true) return
      const req = parseControlLine(command)
      if (req === undefined) {
        const meta = env[KEEP_ENV] === undefined ? undefined : decodeKeepMeta(env[KEEP_ENV])
        if (meta === undefined) {
          // Not kept: an OpenSSH-like daemon running `cat` for the life of its channel.
          channel.on('data', (b: Buffer) => channel.write(b))
          return
        }
        const m = new KeptModel(meta)
        kept.set(meta.execId, m)
        m.attach(channel, 0)
        return
      }
      const answer = (code: number, out = ''): void => {
        if (out !== '') channel.write(out)
        channel.exit(code)
        channel.end()
        channel.close()
      }
      if (req === 'invalid') { answer(2); return }
      const m = 'execId' in req ? kept.get(req.execId) : undefined
      switch (req.op) {
        case 'list':
          answer(0, JSON.stringify({ v: KEEPER_PROTOCOL_VERSION, execs: [...kept.values()].map((k) => k.status()) }))
          return
        case 'status':
          if (m === undefined) { answer(CONTROL_UNKNOWN_EXIT); return }
          if (req.detach) m.channel = undefined
          answer(0, JSON.stringify(m.status()))
          return
        case 'attach':
          if (m === undefined) { channel.close(); return }
          m.attach(channel, req.stdoutOffset)
          return
        case 'signal':
          if (m === undefined || m.exit !== undefined) { answer(CONTROL_UNKNOWN_EXIT); return }
          m.signals.push(req.signal)
          if (req.signal === 'KILL') m.finish({ signal: 'KILL', message: 'killed' })
          answer(0)
          return
        case 'forget':
          if (m === undefined) { answer(CONTROL_UNKNOWN_EXIT); return }
          kept.delete(req.execId)
          answer(0)
      }
    }
  })
  const events = new GatewayEvents()
  const registry = new SessionRegistry({ sessionWaitMs: 10_000, relayOpenTimeoutMs: 5000, maxPendingRelaysPerSandbox: 8, logger: silent })
  const refusals = new Refusals({ logger: silent, events, linesPerMinute: 10 })
  const interval = opts.keepaliveIntervalMs ?? 1000
  const pool = new SshPool({
    registry,
    privateKey: generateEd25519KeyPair().private,
    keepaliveIntervalMs: interval,
    keepaliveCountMax: 2,
    readyTimeoutMs: 5000,
    pooling: true,
    channelsPerConnection: 4,
    idleCloseMs: 1000,
    logger: silent,
    refusals,
    maxOpensPerSandbox: 8,
    maxRekeysPerMinute: 10,
    maxRefusedChannelOpens: 10,
    events
  })
  const sockets = new Set<Socket>()
  let session: SupervisorSession | undefined
  const connectSession = (): void => {
    const s: SupervisorSession = {
      id: randomUUID(),
      sandboxId: 'sb',
      connectedAt: new Date(),
      send: (msg) => {
        if (msg.type !== 'relay' || session !== s) return true
        const sock = connect(sshd.port, sshd.host)
        sock.on('error', () => undefined)
        sockets.add(sock)
        sock.once('close', () => sockets.delete(sock))
        sock.once('connect', () => { if (!registry.claimRelay(msg.relayId, 'sb', sock)) sock.destroy() })
        return true
      },
      close: () => {}
    }
    session = s
    registry.register(s, { sshHostKey: sshd.hostPublicKey, sshUser: 'u', keepsExecs: opts.keepsExecs ?? true })
  }
  connectSession()
  const cut = (): void => { for (const s of [...sockets]) s.destroy() }
  const runs: ExecRun[] = []
  const rig: Rig = {
    sshd,
    registry,
    pool,
    kept,
    envSeen,
    cut,
    disconnect: () => { if (session !== undefined) registry.unregister(session); session = undefined; cut() },
    connect: connectSession,
    relays: () => sockets.size,
    start: (spec, o = {}) => {
      const full: ValidExec = { command: ['cat'], env: {}, workdir: undefined, stdin: undefined, interactive: false, tty: false, cols: 80, rows: 24, timeoutSeconds: 0, ...spec }
      const entry = new ExecEntry(`e-${randomUUID().slice(0, 8)}`, 'sb', full, 16 * 1024 * 1024)
      const run = new ExecRun(entry, { pool, treeSignals: treeSignals(), closeWaitMs: 200, logger: silent, events, reattachTimeoutMs: o.reattachTimeoutMs ?? 5000 })
      runs.push(run)
      return { entry, run, done: run.run() }
    },
    close: async () => {
      for (const r of runs) r.abort(new (await import('../../src/errors.js')).GatewayError('shutting_down', 'test over'))
      pool.close()
      registry.close()
      cut()
      await sshd.close()
    },
    intercept: undefined
  }
  return rig
}

export function stdoutOf (entry: ExecEntry): Buffer {
  return Buffer.concat(entry.stdout.readFrom(0).chunks.map((c) => c.data))
}

export { TIMEOUT_EXIT_MESSAGE }

// The process scans of unkept execs, as the manager makes them.
export function treeSignals (): TreeSignals {
  return new TreeSignals({ script: (signal) => killScript(signal as SignalName), boundMs: 5000, windowMs: 5, maxBatch: 4096 })
}
