import type { Client, KexAlgorithm } from 'ssh2'
import type { RefusalReason } from '../refusals.js'
import { boundedText } from './bounded-text.js'
import { isSshExitStatus, isSshSignalName } from './outcome.js'

// The one place where the gateway reaches into ssh2's client, to hold a hostile sandbox SSH
// daemon to the protocol. ssh2 1.17 trusts its peer in ways a gateway cannot afford:
// - channel data is checked only for `window === 0` (and then dropped without a word): a
//   packet that overshoots drives the window negative and every later one is buffered, so a
//   daemon that ignores the window grows the gateway's memory without bound;
// - ChannelManager.get() throws for id 0xFFFFFFFF (its MAX_CHANNEL is 2^32 - 1, yet a uint32
//   can hold it); the throw leaves Protocol.parse, and the client turns it into an 'error' and
//   ends the socket: one packet with that id kills the connection and every exec on it;
// - an exit report that arrives before the exec request was answered is emitted on a channel
//   nobody listens to yet, and it blocks the real one (ssh2 takes only the first);
// - exit-signal names are taken verbatim (and prefixed with "SIG");
// - a 'hostkeys-00@openssh.com' request makes it parse and later verify as many host keys as
//   the daemon lists, work the gateway never asked for.
// Protocol's message handlers are looked up by name on every packet, so wrapping them on the
// handler object is enough. Everything here is feature-detected at install time: if ssh2's
// internals change shape, the connection fails loudly instead of running unguarded.

// ssh2's internals, as far as the guard uses them.
interface ChannelSide { id: number, window: number, packetSize: number, state: string }
interface Ssh2Channel {
  incoming: ChannelSide
  outgoing: ChannelSide
  subtype: string | undefined
  emit: (event: string | symbol, ...args: unknown[]) => boolean
}
type Handler = (p: unknown, ...args: any[]) => unknown
interface Ssh2Protocol {
  _handlers: Record<string, Handler | undefined>
  channelOpenFail: (recipient: number, reason: number, desc: string) => void
  requestFailure: () => void
}
interface Ssh2ChannelManager {
  get: (id: number) => unknown
  _cur: number
}
interface Ssh2ClientInternals { _protocol?: Ssh2Protocol, _chanMgr?: Ssh2ChannelManager }

// Every handler that takes a channel id from the daemon, plus the two requests handled here.
export const GUARDED_HANDLERS = [
  'CHANNEL_OPEN', 'CHANNEL_OPEN_CONFIRMATION', 'CHANNEL_OPEN_FAILURE', 'CHANNEL_WINDOW_ADJUST',
  'CHANNEL_DATA', 'CHANNEL_EXTENDED_DATA', 'CHANNEL_EOF', 'CHANNEL_CLOSE', 'CHANNEL_REQUEST',
  'CHANNEL_SUCCESS', 'CHANNEL_FAILURE', 'GLOBAL_REQUEST'
] as const

// Key exchanges whose cost the gateway fixes: a few ECDH scalar multiplications. Diffie-Hellman
// group exchange lets the daemon pick the modulus (ssh2 does not even check it is prime: a
// 10000-bit one costs ~1.4 s of the event loop), and the fixed groups 14-18 cost tens to
// hundreds of ms each at the daemon's chosen re-key rate. OpenSSH has offered curve25519 since
// 6.5 (2014) and the ecdh-sha2 curves since 5.7; ssh2's server (the embedded daemon) offers both.
export const GATEWAY_KEX: KexAlgorithm[] = [
  'curve25519-sha256', 'curve25519-sha256@libssh.org',
  'ecdh-sha2-nistp256', 'ecdh-sha2-nistp384', 'ecdh-sha2-nistp521'
]

// Emitted on a channel whose exec must fail for what its daemon reported, with the detail.
export const kExitRejected = Symbol('exec-gateway.exit-rejected')

// ssh2's ChannelManager throws for ids at or above this.
const MAX_CHANNEL_ID = 2 ** 32 - 1
const ADMINISTRATIVELY_PROHIBITED = 1
const REKEY_WINDOW_MS = 60_000

export interface SshGuardOptions {
  maxRekeysPerMinute: number
  maxRefusedChannelOpens: number
  // Bytes written to the relay that it has not taken yet.
  relayBacklog: () => number
  // Above this, a daemon that sends requests needing a reply and does not read the replies is
  // failed rather than buffered for.
  maxRelayBacklog: number
  // Counted and logged (at the sandbox's rate), nothing else: the packet is dropped.
  refuse: (reason: RefusalReason, message: string, fields?: Record<string, unknown>) => void
  // Ends the connection (counted and logged once, by the callee).
  fail: (reason: RefusalReason, detail: string, fields?: Record<string, unknown>) => void
  now?: () => number
}

export interface SshGuard {
  readonly rekeys: number
  readonly refusedChannelOpens: number
}

function internalsOf (client: Client): { proto: Ssh2Protocol, chanMgr: Ssh2ChannelManager } {
  const c = client as unknown as Ssh2ClientInternals
  const proto = c._protocol
  const chanMgr = c._chanMgr
  const missing: string[] = []
  if (typeof proto !== 'object' || proto === null) missing.push('client._protocol')
  else {
    if (typeof proto._handlers !== 'object' || proto._handlers === null) missing.push('_protocol._handlers')
    else for (const name of GUARDED_HANDLERS) if (typeof proto._handlers[name] !== 'function') missing.push(`_protocol._handlers.${name}`)
    if (typeof proto.channelOpenFail !== 'function') missing.push('_protocol.channelOpenFail')
    if (typeof proto.requestFailure !== 'function') missing.push('_protocol.requestFailure')
  }
  if (typeof chanMgr !== 'object' || chanMgr === null || typeof chanMgr.get !== 'function' || typeof chanMgr._cur !== 'number') missing.push('client._chanMgr (get, _cur)')
  if (missing.length > 0) {
    throw new Error(`ssh2's client internals are not the shape src/relay/ssh-guard.ts was written for (missing ${missing.join(', ')}); refusing to talk to a sandbox unguarded`)
  }
  return { proto: proto!, chanMgr: chanMgr! }
}

function isChannel (v: unknown): v is Ssh2Channel {
  return typeof v === 'object' && v !== null && typeof (v as Ssh2Channel).incoming === 'object' && typeof (v as Ssh2Channel).outgoing === 'object'
}

// Call right after client.connect(): the handlers exist from then on, and no packet is parsed
// before the next turn.
export function installSshGuard (client: Client, opts: SshGuardOptions): SshGuard {
  const { proto, chanMgr } = internalsOf(client)
  const h = proto._handlers
  const orig = Object.fromEntries(GUARDED_HANDLERS.map((n) => [n, h[n]!])) as Record<typeof GUARDED_HANDLERS[number], Handler>
  const now = opts.now ?? (() => performance.now())
  const reported = new WeakSet<object>()
  let dead = false
  let handshakes = 0
  let rekeyTimes: number[] = []
  let refusedOpens = 0

  const fail = (reason: RefusalReason, detail: string, fields?: Record<string, unknown>): void => {
    if (dead) return
    dead = true
    opts.fail(reason, detail, fields)
  }
  // What a channel id names: undefined (never opened, or closed by the daemon), a function (an
  // open the daemon has not answered), or a channel. Ids ssh2 would throw on name nothing.
  const lookup = (id: unknown): unknown => {
    if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= MAX_CHANNEL_ID) return undefined
    return chanMgr.get(id)
  }
  const openChannel = (id: unknown, kind: string): Ssh2Channel | undefined => {
    const entry = lookup(id)
    if (isChannel(entry) && entry.incoming.state !== 'closed') return entry
    opts.refuse('unknown_channel', `the sandbox SSH daemon sent ${kind} for a channel that is not open (ignored)`, { channel: typeof id === 'number' ? id : null })
    return undefined
  }
  const pendingOpen = (id: unknown, kind: string): boolean => {
    if (typeof lookup(id) === 'function') return true
    opts.refuse('unknown_channel', `the sandbox SSH daemon sent ${kind} for a channel the gateway is not opening (ignored)`, { channel: typeof id === 'number' ? id : null })
    return false
  }
  // Data may only come on an open channel before its EOF, within the window and the maximum
  // packet size the gateway granted; ssh2 then accounts for it exactly as before.
  const dataAllowed = (id: unknown, data: Buffer, kind: string): boolean => {
    const ch = openChannel(id, kind)
    if (ch === undefined) return false
    if (ch.incoming.state === 'eof') {
      opts.refuse('unknown_channel', `the sandbox SSH daemon sent ${kind} after its EOF (ignored)`, { channel: id, bytes: data.length })
      return false
    }
    const { window, packetSize } = ch.incoming
    if (data.length > window || data.length > packetSize) {
      fail('window_overrun', data.length > window
        ? `the sandbox SSH daemon sent ${data.length} bytes of ${kind} with ${window} bytes left in the SSH window the gateway granted`
        : `the sandbox SSH daemon sent ${data.length} bytes of ${kind} in one packet, over the ${packetSize}-byte maximum the gateway granted`,
      { channel: id, bytes: data.length, window })
      return false
    }
    return true
  }

  const guarded: Partial<Record<typeof GUARDED_HANDLERS[number], Handler>> = {
    // The gateway opens every channel it uses and accepts none (ssh2 would refuse these too:
    // it accepts only forwardings, X11 and agent channels that were asked for, and we ask for
    // none). Answered here so that no ssh2 path can ever accept one.
    CHANNEL_OPEN: (_p, info: { type?: unknown, sender?: unknown }) => {
      refusedOpens++
      const type = boundedText(info?.type, 64)
      if (refusedOpens > opts.maxRefusedChannelOpens) {
        fail('channel_open', `the sandbox SSH daemon tried to open ${refusedOpens} channels towards the gateway (--ssh-max-refused-channel-opens ${opts.maxRefusedChannelOpens})`, { type })
        return
      }
      opts.refuse('channel_open', 'the sandbox SSH daemon tried to open a channel towards the gateway (refused)', { type, refused: refusedOpens })
      if (typeof info?.sender === 'number') proto.channelOpenFail(info.sender, ADMINISTRATIVELY_PROHIBITED, '')
    },
    CHANNEL_OPEN_CONFIRMATION: (p, info: { recipient?: unknown }) => {
      if (pendingOpen(info?.recipient, 'an open confirmation')) orig.CHANNEL_OPEN_CONFIRMATION(p, info)
    },
    CHANNEL_OPEN_FAILURE: (p, recipient: unknown, ...rest: unknown[]) => {
      if (pendingOpen(recipient, 'an open failure')) orig.CHANNEL_OPEN_FAILURE(p, recipient, ...rest)
    },
    CHANNEL_WINDOW_ADJUST: (p, recipient: unknown, amount: unknown) => {
      if (openChannel(recipient, 'a window adjust') !== undefined) orig.CHANNEL_WINDOW_ADJUST(p, recipient, amount)
    },
    CHANNEL_DATA: (p, recipient: unknown, data: Buffer) => {
      if (dataAllowed(recipient, data, 'stdout')) orig.CHANNEL_DATA(p, recipient, data)
    },
    // Every extended data type counts against the window (RFC 4254 §5.2), even those ssh2 drops.
    CHANNEL_EXTENDED_DATA: (p, recipient: unknown, data: Buffer, type: unknown) => {
      if (dataAllowed(recipient, data, 'stderr')) orig.CHANNEL_EXTENDED_DATA(p, recipient, data, type)
    },
    CHANNEL_EOF: (p, recipient: unknown) => {
      if (openChannel(recipient, 'an EOF') !== undefined) orig.CHANNEL_EOF(p, recipient)
    },
    // A close may also answer an open (ssh2 then fails the open).
    CHANNEL_CLOSE: (p, recipient: unknown) => {
      const entry = lookup(recipient)
      if (typeof entry === 'function' || openChannel(recipient, 'a close') !== undefined) orig.CHANNEL_CLOSE(p, recipient)
    },
    CHANNEL_SUCCESS: (p, recipient: unknown) => {
      if (openChannel(recipient, 'a request success') !== undefined) orig.CHANNEL_SUCCESS(p, recipient)
    },
    CHANNEL_FAILURE: (p, recipient: unknown) => {
      if (openChannel(recipient, 'a request failure') !== undefined) orig.CHANNEL_FAILURE(p, recipient)
    },
    CHANNEL_REQUEST: (p, recipient: unknown, type: unknown, wantReply: unknown, data: unknown) => {
      if (type === 'exit-status' || type === 'exit-signal') { onExitReport(p, recipient, type, wantReply, data); return }
      if (openChannel(recipient, 'a channel request') === undefined) return
      if (wantReply === true && !relayRoom('channel requests')) return
      orig.CHANNEL_REQUEST(p, recipient, type, wantReply, data)
    },
    GLOBAL_REQUEST: (p, name: unknown, wantReply: unknown, data: unknown) => {
      if (wantReply === true && !relayRoom('global requests')) return
      if (name === 'hostkeys-00@openssh.com') { if (wantReply === true) proto.requestFailure(); return }
      orig.GLOBAL_REQUEST(p, name, wantReply, data)
    }
  }

  // A reply costs the daemon a packet and the gateway a packet; one that is never read stays
  // in the relay's buffer.
  const relayRoom = (what: string): boolean => {
    const backlog = opts.relayBacklog()
    if (backlog <= opts.maxRelayBacklog) return true
    fail('protocol_error', `the sandbox SSH daemon sends ${what} but does not read the replies (${backlog} bytes unread)`, { backlog })
    return false
  }

  // Only the first exit report of an open channel whose exec request was accepted counts, and
  // only if it is well-formed; after the gateway's own close it no longer matters.
  const onExitReport = (p: unknown, recipient: unknown, type: string, wantReply: unknown, data: unknown): void => {
    const entry = lookup(recipient)
    if (!isChannel(entry) || entry.incoming.state === 'closed') {
      const wasOpened = typeof entry === 'function' || (typeof recipient === 'number' && Number.isInteger(recipient) && recipient >= 0 && recipient <= chanMgr._cur)
      if (wasOpened) opts.refuse('bad_exit_report', `the sandbox SSH daemon sent ${type} for a channel that is not open (ignored)`, { channel: recipient })
      else opts.refuse('unknown_channel', `the sandbox SSH daemon sent ${type} for a channel that was never opened (ignored)`, { channel: typeof recipient === 'number' ? recipient : null })
      return
    }
    if (reported.has(entry)) {
      opts.refuse('duplicate_exit', `the sandbox SSH daemon sent a second exit report (${type}) for one channel (the first stands)`, { channel: recipient })
      return
    }
    if (entry.outgoing.state !== 'open' && entry.outgoing.state !== 'eof') {
      // The gateway closed the channel: its exec is over, and ssh2 only records the report.
      reported.add(entry)
      orig.CHANNEL_REQUEST(p, recipient, type, wantReply, data)
      return
    }
    if (entry.subtype === undefined) {
      opts.refuse('bad_exit_report', `the sandbox SSH daemon sent ${type} before it answered the exec request (ignored)`, { channel: recipient })
      return
    }
    reported.add(entry)
    const signal = (data as { signal?: unknown } | null | undefined)?.signal
    const detail = type === 'exit-status'
      ? (isSshExitStatus(data) ? undefined : 'the sandbox reported an exit status that is not a uint32')
      : (isSshSignalName(signal) ? undefined : 'the sandbox reported an exit signal outside the SSH grammar')
    if (detail !== undefined) {
      opts.refuse('bad_exit_report', detail, { channel: recipient, length: typeof signal === 'string' ? signal.length : null })
      entry.emit(kExitRejected, detail)
      return
    }
    orig.CHANNEL_REQUEST(p, recipient, type, wantReply, data)
  }

  for (const name of GUARDED_HANDLERS) {
    const g = guarded[name]!
    // Once the guard failed the connection, the rest of the read is not worth parsing into
    // channels: drop it.
    h[name] = (...args: [unknown, ...any[]]) => { if (!dead) g(...args) }
  }

  // ssh2 emits 'handshake' once per completed key exchange. The gateway never starts one after
  // the first (it never calls rekey()), so every later one was the daemon's.
  client.on('handshake', (negotiated: { kex?: unknown }) => {
    if (!(GATEWAY_KEX as string[]).includes(String(negotiated?.kex))) {
      fail('protocol_error', `the SSH key exchange negotiated ${boundedText(negotiated?.kex, 64)}, which the gateway does not offer`)
      return
    }
    if (++handshakes === 1) return
    const t = now()
    rekeyTimes = rekeyTimes.filter((at) => t - at < REKEY_WINDOW_MS)
    rekeyTimes.push(t)
    if (rekeyTimes.length > opts.maxRekeysPerMinute) {
      fail('rekey_rate', `the sandbox SSH daemon started ${rekeyTimes.length} key exchanges within a minute (--ssh-max-rekeys-per-minute ${opts.maxRekeysPerMinute})`)
    }
  })

  return {
    get rekeys () { return Math.max(0, handshakes - 1) },
    get refusedChannelOpens () { return refusedOpens }
  }
}
