import { constants as osConstants } from 'node:os'
import type { ServerChannel } from 'ssh2'

/** How the command ended, as it goes on the wire: a code, or a signal name without "SIG". */
export type ExitOutcome = { code: number } | { signal: string }

// The parts of ssh2's channel internals this module needs (lib/Channel.js, lib/protocol/Protocol.js).
interface ChannelInternals {
  outgoing: { id: number, state: string }
  _client: {
    _protocol: {
      exitStatus: (chan: number, status: number) => void
      exitSignal: (chan: number, name: string, coreDumped: boolean, msg: string) => void
    }
  }
}

/** Maps a child's ('exit', code, signal) pair to the report, stripping the "SIG" prefix. */
export function exitOutcome (code: number | null, signal: NodeJS.Signals | null): ExitOutcome {
  if (signal !== null) return { signal: signal.replace(/^SIG/, '') }
  // Node always gives one of the two; 255 is what OpenSSH reports when it has nothing better.
  return { code: code ?? 255 }
}

/** The same for an exit given as numbers (node-pty's onExit), signal 0 meaning none. */
export function exitOutcomeOfNumbers (code: number, signal: number): ExitOutcome {
  if (signal === 0) return { code }
  const signals = osConstants.signals as Record<string, number>
  const name = Object.keys(signals).find((key) => signals[key] === signal)
  // A number Node has no name for still must not look like success: the shell's 128 + N.
  return name === undefined ? { code: 128 + signal } : exitOutcome(null, name as NodeJS.Signals)
}

/**
 * Sends EOF, then exit-status or exit-signal, then close: the order OpenSSH and the ancestor
 * daemon use, so the gateway sees the same sequence from every daemon. ssh2's own
 * `ServerChannel.exit()` only sends while `outgoing.state === 'open'`, i.e. before EOF, and
 * `channel.end()` on a server channel sends EOF and close back to back; so this goes to the
 * protocol object directly. Returns false when the channel was no longer open (client gone).
 * `message` goes with an exit-signal (the keeper's timeout marker).
 */
export function sendExitReport (channel: ServerChannel, outcome: ExitOutcome, message = ''): boolean {
  const internals = channel as unknown as ChannelInternals
  if (internals.outgoing.state !== 'open') return false
  channel.eof()
  const protocol = internals._client._protocol
  const id = internals.outgoing.id
  if ('code' in outcome) {
    protocol.exitStatus(id, outcome.code >>> 0)
  } else {
    try {
      protocol.exitSignal(id, outcome.signal, false, message)
    } catch {
      // ssh2 only encodes the 13 RFC 4254 signal names and throws on others (BUS, SYS, XCPU...);
      // the shell convention 128 + N still tells the caller which signal it was.
      const number = osConstants.signals[`SIG${outcome.signal}` as NodeJS.Signals] ?? 0
      protocol.exitStatus(id, 128 + number)
    }
  }
  channel.close()
  return true
}
