// An OpenSSH ControlMaster to the run's sshd, the peer a script would use to run many commands
// cheaply: `ssh -S <sock> … true` then costs a process start and one session on a live
// connection, as the gateway's pool costs it one channel.
import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { waitFor } from '../test/helpers/wait.js'
import type { SshPeer } from './clients.js'
import { SSH } from './knobs.js'

function isSsh (pid: number): boolean {
  try { return readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'ssh' } catch { return false }
}

async function runSsh (args: string[], timeoutMs: number): Promise<{ code: number | null, stderr: string }> {
  // stdout is ignored: a backgrounded master inherits it, and a pipe would stay open with it.
  const child = spawn(SSH, args, { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr!.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-4000) })
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
  return await new Promise((resolve, reject) => {
    child.once('error', (err) => { clearTimeout(timer); reject(err) })
    // 'exit', not 'close': the master's background half keeps stderr open after its parent exits.
    child.once('exit', (code) => { clearTimeout(timer); resolve({ code, stderr }) })
  })
}

export class SshMaster {
  readonly #peer: SshPeer
  readonly socket: string
  // The backgrounded master's pid, from `-O check`: killed if `-O exit` does not end it.
  #pid: number | undefined

  private constructor (peer: SshPeer, socket: string) {
    this.#peer = peer
    this.socket = socket
  }

  // `ssh -M -S <sock> -N -o ControlPersist=yes`: it authenticates, then forks into the background
  // and the foreground process exits 0.
  static async start (peer: SshPeer, socket: string): Promise<SshMaster> {
    const m = new SshMaster(peer, socket)
    const r = await runSsh(peer.args([], m.masterOptions()), 30_000)
    if (r.code !== 0) throw new Error(`ssh ControlMaster exited ${r.code}: ${r.stderr.trim()}`)
    m.#pid = await m.check()
    if (m.#pid === undefined) throw new Error(`ssh ControlMaster on ${socket} is not running after start: ${r.stderr.trim()}`)
    return m
  }

  masterOptions (): string[] {
    return ['-M', '-S', this.socket, '-N', '-o', 'ControlPersist=yes']
  }

  // For the commands that ride on the master. ControlMaster=no: never become a master.
  clientOptions (): string[] {
    return ['-S', this.socket, '-o', 'ControlMaster=no']
  }

  // The master's pid while it runs (`-O check` says "Master running (pid=N)"); undefined if not.
  async check (): Promise<number | undefined> {
    const r = await runSsh(this.#peer.args([], ['-S', this.socket, '-O', 'check']), 10_000)
    const pid = /pid=(\d+)/.exec(r.stderr)?.[1]
    return r.code === 0 && pid !== undefined ? Number(pid) : undefined
  }

  // `-O exit`, then SIGKILL of the pid if it is still there. Idempotent.
  async close (): Promise<void> {
    const pid = this.#pid
    if (pid === undefined) return
    this.#pid = undefined
    await runSsh(this.#peer.args([], ['-S', this.socket, '-O', 'exit']), 10_000).catch(() => undefined)
    // The master exits soon after it answers; a pid still there after 2 s that is still an ssh
    // (not a reused pid) did not.
    await waitFor(() => !isSsh(pid), { timeoutMs: 2000, intervalMs: 50 }).catch(() => undefined)
    if (isSsh(pid)) { try { process.kill(pid, 'SIGKILL') } catch { /* gone */ } }
  }
}
