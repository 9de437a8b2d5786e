import { spawn, type ChildProcess } from 'node:child_process'
import { fileURLToPath } from 'node:url'

// A real `exec-gateway supervisor` process (from the build), so tests can SIGSTOP and SIGKILL it.

const BIN = fileURLToPath(new URL('../../bin/exec-gateway.js', import.meta.url))

export interface SupervisorProcess {
  proc: ChildProcess
  pid: number
  output: () => string
  signal: (sig: NodeJS.Signals) => void
  stop: () => Promise<void>
}

export interface SupervisorProcessOptions {
  gatewayUrl: string
  sandboxId: string
  token: string
  sshTarget?: string
  sshUser?: string
  // More `supervisor` flags, appended verbatim.
  extraArgs?: string[]
  // --log-level; default debug, which tests read when they fail. A benchmark wants the
  // production default (info): debug lines cost the embedded daemon ~5 lines of JSON per exec.
  logLevel?: string
}

export function startSupervisorProcess (opts: SupervisorProcessOptions): SupervisorProcess {
  const args = [BIN, 'supervisor', '--gateway', opts.gatewayUrl, '--sandbox-id', opts.sandboxId, '--token', opts.token, '--log-level', opts.logLevel ?? 'debug']
  if (opts.sshTarget !== undefined) args.push('--ssh-target', opts.sshTarget)
  if (opts.sshUser !== undefined) args.push('--ssh-user', opts.sshUser)
  args.push(...(opts.extraArgs ?? []))
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  const keep = (c: Buffer): void => { out = (out + c.toString()).slice(-64 * 1024) }
  proc.stdout!.on('data', keep)
  proc.stderr!.on('data', keep)
  proc.on('error', () => {})
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()))
  return {
    proc,
    pid: proc.pid!,
    output: () => out,
    signal: (sig) => { try { proc.kill(sig) } catch { /* gone */ } },
    stop: async () => {
      if (proc.exitCode !== null || proc.signalCode !== null) return
      try { proc.kill('SIGCONT') } catch { /* gone */ }
      proc.kill('SIGTERM')
      const t = setTimeout(() => proc.kill('SIGKILL'), 3000)
      await exited
      clearTimeout(t)
    }
  }
}
