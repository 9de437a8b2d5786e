import type { ServerChannel } from 'ssh2'
import { CONTROL_UNKNOWN_EXIT, KEEPER_PROTOCOL_VERSION, type ControlRequest } from '../../schemas/keeper.js'
import { ChannelOutput } from '../channel-output.js'
import { sendExitReport } from '../exit-report.js'
import type { Keeper } from './keeper.js'

// Exit status of a control request the daemon cannot parse (as a shell's usage error).
const CONTROL_INVALID_EXIT = 2

/**
 * Answers one control request other than `attach` (which makes its channel the exec's, see
 * session.ts): what it prints goes to stdout, and its exit status says how it went.
 */
export function answerControl (channel: ServerChannel, req: Exclude<ControlRequest, { op: 'attach' }> | 'invalid', keeper: Keeper): void {
  const { code, out } = run(req, keeper)
  const output = new ChannelOutput(channel)
  channel.on('error', () => {})
  channel.stderr.on('error', () => {})
  if (out !== '') output.stdout.write(out)
  output.flush(() => {
    sendExitReport(channel, { code })
  })
  // Whatever the client sends is not for anyone.
  channel.resume()
}

function run (req: Exclude<ControlRequest, { op: 'attach' }> | 'invalid', keeper: Keeper): { code: number, out: string } {
  if (req === 'invalid') return { code: CONTROL_INVALID_EXIT, out: '' }
  switch (req.op) {
    case 'list':
      return { code: 0, out: JSON.stringify({ v: KEEPER_PROTOCOL_VERSION, execs: keeper.list() }) }
    case 'status': {
      const exec = keeper.get(req.execId)
      if (exec === undefined) return { code: CONTROL_UNKNOWN_EXIT, out: '' }
      if (req.detach) exec.detach()
      return { code: 0, out: JSON.stringify(exec.status()) }
    }
    case 'signal': {
      const exec = keeper.get(req.execId)
      if (exec === undefined || exec.finished) return { code: CONTROL_UNKNOWN_EXIT, out: '' }
      exec.signal(req.signal)
      return { code: 0, out: '' }
    }
    case 'forget':
      return { code: keeper.forget(req.execId) ? 0 : CONTROL_UNKNOWN_EXIT, out: '' }
  }
}
