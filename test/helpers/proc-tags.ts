import { readdirSync, readFileSync } from 'node:fs'
import { EXEC_ID_ENV } from '../../src/execs/command.js'

// The sandboxes of the tests are this machine: the processes an exec started are the ones whose
// environment carries its tag (see assembleCommand).

// Pids of the processes tagged with one of these exec ids (zombies have no environment left).
export function taggedPids (ids: ReadonlySet<string>): number[] {
  const found: number[] = []
  const prefix = `${EXEC_ID_ENV}=`
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    let env: string
    try { env = readFileSync(`/proc/${name}/environ`, 'latin1') } catch { continue }
    for (const entry of env.split('\0')) {
      if (entry.startsWith(prefix) && ids.has(entry.slice(prefix.length))) { found.push(Number(name)); break }
    }
  }
  return found
}

// Pids whose command line is exactly this argv (for processes a test started without the tag).
export function pidsRunning (argv: readonly string[]): number[] {
  const want = argv.join('\0') + '\0'
  const found: number[] = []
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    try { if (readFileSync(`/proc/${name}/cmdline`, 'latin1') === want) found.push(Number(name)) } catch { /* gone */ }
  }
  return found
}
