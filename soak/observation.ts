// What one exec came to, as the soak saw it, and the problems found on the way.
import { CLUSTER } from './knobs.js'
import type { Mode, Shape } from './plans.js'

// lost: a gateway restart took the exec with it (the restarted gateway does not know it).
type Outcome = 'exit' | 'error' | 'lost' | 'hung' | 'broken'
export interface Observation {
  key: string
  sandbox: string
  shape: Shape
  mode: Mode
  script: string
  wantExit: number
  sleepMs: number
  boundMs: number
  t0: number
  tEnd: number
  outcome: Outcome
  httpStatus?: number
  exitCode?: number | null
  code?: string
  detail?: string
  execId?: string
  startedAt?: number
  // Reader reconnects after a gateway restart cut it off, and relay lost/restored events seen.
  reconnects: number
  relayEvents: number
  // Output bytes received and checked, plus stdin bytes sent.
  bytes: number
  problems: string[]
  notes: string[]
  gatewayView?: string
}
export const observations: Observation[] = []

// Cluster mode: a drained replica ends what it cannot move (OpenSSH execs past the grace) with
// 503 shutting_down.
export const HONEST_503 = new Set(['relay_unavailable', 'sandbox_unavailable', ...(CLUSTER ? ['shutting_down'] : [])])
const HONEST_OTHER: Record<string, number> = { ssh_failed: 502, relay_open_timeout: 504, too_many_requests: 429 }
export const codeStatus = (code: string): number | undefined => HONEST_503.has(code) ? 503 : HONEST_OTHER[code]
const MAX_PROBLEMS = 12

export function problem (obs: Observation, why: string): void {
  if (obs.problems.length < MAX_PROBLEMS) obs.problems.push(why)
  else if (obs.problems.length === MAX_PROBLEMS) obs.problems.push('… (more problems not shown)')
}
