// A reading of a gateway's memory and idle CPU with execs held (the held-execs and fleet phases):
// live memory, not the garbage of the last burst, so two full GCs through the inspector first.
import { median } from '../test/helpers/stats.js'
import { sleep } from '../test/helpers/wait.js'
import type { GatewayProcess } from '../test/helpers/gateway-process.js'
import { CPU_WINDOW_S } from './knobs.js'
import { CLK_TCK, cpuTicks, rssKiB } from './proc.js'
import type { Inspector } from './profile.js'
import { fixed, log } from './report.js'

// supRssKiB: summed over the supervisor processes given.
export interface Reading { rssKiB: number, cpuPct: number, supRssKiB: number, heapKiB: number }

// A window with no tick at all is below the clock's resolution, not zero.
export function cpuText (pct: number): string {
  return pct === 0 ? `< ${(100 / CLK_TCK / CPU_WINDOW_S).toFixed(2)} %` : `${fixed(pct)} %`
}

// Two full GCs, then RSS (median of the samples over the CPU window), CPU over that window,
// V8's heap, and the supervisors' RSS.
export async function measureGateway (inspector: Inspector, gw: GatewayProcess, supPids: readonly number[], label: string): Promise<Reading> {
  await inspector.send('HeapProfiler.collectGarbage')
  await inspector.send('HeapProfiler.collectGarbage')
  const heapKiB = (await inspector.send<{ usedSize: number }>('Runtime.getHeapUsage')).usedSize / 1024
  await sleep(1000)
  const samples: number[] = []
  const c0 = cpuTicks(gw.pid)
  const t0 = performance.now()
  for (let s = 0; s < CPU_WINDOW_S; s++) { samples.push(rssKiB(gw.pid)); await sleep(1000) }
  samples.push(rssKiB(gw.pid))
  const cpuPct = (cpuTicks(gw.pid) - c0) / CLK_TCK / ((performance.now() - t0) / 1000) * 100
  const rss = median(samples)
  const supRssKiB = supPids.reduce((a, p) => a + rssKiB(p), 0)
  log(`${label}: gateway RSS ${(rss / 1024).toFixed(1)} MiB (min ${(Math.min(...samples) / 1024).toFixed(1)}, max ${(Math.max(...samples) / 1024).toFixed(1)}), V8 heap used ${(heapKiB / 1024).toFixed(1)} MiB, CPU ${cpuText(cpuPct)} over ${CPU_WINDOW_S} s; ${supPids.length === 1 ? 'supervisor' : `${supPids.length} supervisors'`} RSS ${(supRssKiB / 1024).toFixed(1)} MiB`)
  return { rssKiB: rss, cpuPct, supRssKiB, heapKiB }
}
