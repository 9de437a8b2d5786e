// The gateways seen through the inspector (Chrome DevTools Protocol on --inspect=127.0.0.1:0):
// Node 20 refuses --cpu-prof in NODE_OPTIONS, so CPU profiles and heap snapshots are taken this
// way, and the held-execs phase forces GCs this way before it reads RSS.
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import WebSocket from 'ws'
import type { GatewayProcess } from '../test/helpers/gateway-process.js'
import { waitFor } from '../test/helpers/wait.js'
import { log } from './report.js'

interface Reply { id?: number, result?: unknown, error?: unknown, method?: string, params?: unknown }

interface ProfileNode { id: number, callFrame: { functionName: string, url: string, lineNumber: number }, children?: number[] }
interface CpuProfile { nodes: ProfileNode[], samples: number[], timeDeltas: number[] }

// One Chrome DevTools Protocol session on a gateway process.
export class Inspector {
  readonly #ws: WebSocket
  #nextId = 1
  readonly #pending = new Map<number, { resolve: (v: unknown) => void, reject: (e: Error) => void }>()
  readonly #listeners = new Map<string, (params: unknown) => void>()

  private constructor (ws: WebSocket) {
    this.#ws = ws
    ws.on('message', (data: Buffer) => {
      const msg = JSON.parse(data.toString('utf8')) as Reply
      if (typeof msg.id === 'number') {
        const p = this.#pending.get(msg.id)
        this.#pending.delete(msg.id)
        if (msg.error !== undefined) p?.reject(new Error(`${JSON.stringify(msg.error)}`))
        else p?.resolve(msg.result)
      } else if (typeof msg.method === 'string') {
        this.#listeners.get(msg.method)?.(msg.params)
      }
    })
  }

  static async attach (gw: GatewayProcess): Promise<Inspector> {
    let url: string | undefined
    await waitFor(() => {
      url = /Debugger listening on (ws:\/\/127\.0\.0\.1:\d+\/[0-9a-f-]+)/.exec(gw.output())?.[1]
      return url !== undefined
    }, { timeoutMs: 10_000, intervalMs: 50, description: 'the gateway inspector URL' })
    const ws = new WebSocket(url!)
    await new Promise<void>((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject) })
    ws.on('error', () => {})
    return new Inspector(ws)
  }

  // The result's type is what the protocol documents for this method, not checked.
  async send<T = unknown> (method: string, params: Record<string, unknown> = {}): Promise<T> {
    const id = this.#nextId++
    return await new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => { this.#pending.delete(id); reject(new Error(`inspector ${method} timed out`)) }, 120_000)
      this.#pending.set(id, { resolve: (v) => { clearTimeout(timer); resolve(v as T) }, reject: (e) => { clearTimeout(timer); reject(e) } })
      this.#ws.send(JSON.stringify({ id, method, params }))
    })
  }

  async cpuProfile<T> (dir: string, name: string, fn: () => Promise<T>): Promise<T> {
    await this.send('Profiler.enable')
    await this.send('Profiler.setSamplingInterval', { interval: 200 })
    await this.send('Profiler.start')
    try {
      return await fn()
    } finally {
      const { profile } = await this.send<{ profile: CpuProfile }>('Profiler.stop')
      writeFileSync(join(dir, `${name}.cpuprofile`), JSON.stringify(profile))
      const summary = summarizeProfile(profile)
      writeFileSync(join(dir, `${name}.top.txt`), summary)
      log(`profile ${name}: ${join(dir, `${name}.cpuprofile`)}\n${summary.split('\n').slice(0, 30).join('\n')}`)
    }
  }

  async heapSnapshot (dir: string, name: string): Promise<void> {
    const chunks: string[] = []
    this.#listeners.set('HeapProfiler.addHeapSnapshotChunk', (p) => chunks.push((p as { chunk: string }).chunk))
    await this.send('HeapProfiler.enable')
    await this.send('HeapProfiler.takeHeapSnapshot', { reportProgress: false })
    this.#listeners.delete('HeapProfiler.addHeapSnapshotChunk')
    const path = join(dir, `${name}.heapsnapshot`)
    writeFileSync(path, chunks.join(''))
    log(`heap snapshot ${name}: ${path}`)
  }

  close (): void { this.#ws.close() }
}

// Self time by function and by module, from a .cpuprofile.
function summarizeProfile (profile: CpuProfile): string {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]))
  const selfUs = new Map<number, number>()
  profile.samples.forEach((id, i) => selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0)))
  const byFn = new Map<string, number>()
  const byModule = new Map<string, number>()
  let total = 0
  let idle = 0
  for (const [id, us] of selfUs) {
    const f = byId.get(id)!.callFrame
    if (f.functionName === '(idle)') { idle += us; continue }
    total += us
    const where = f.url.replace(/^file:\/\//, '').replace(/^.*\/node_modules\//, 'node_modules/').replace(/^.*\/dist\//, 'dist/')
    const fn = `${f.functionName || '(anonymous)'} ${where}:${f.lineNumber + 1}`
    byFn.set(fn, (byFn.get(fn) ?? 0) + us)
    // A package is one module (a scoped one has two parts); native code has no URL, only a name.
    const mod = where === '' ? f.functionName : where.startsWith('node_modules/') ? where.split('/').slice(0, where.startsWith('node_modules/@') ? 3 : 2).join('/') : where
    byModule.set(mod, (byModule.get(mod) ?? 0) + us)
  }
  const top = (m: Map<string, number>, n: number): string[] => [...m.entries()].sort((a, b) => b[1] - a[1]).slice(0, n).map(([k, us]) => `  ${(us / 1000).toFixed(0).padStart(7)} ms ${(us / total * 100).toFixed(1).padStart(5)} %  ${k}`)
  return [
    `busy ${(total / 1000).toFixed(0)} ms, idle ${(idle / 1000).toFixed(0)} ms`,
    'self time by module:', ...top(byModule, 25),
    'self time by function:', ...top(byFn, 40), ''
  ].join('\n')
}

// The inspector of each gateway, attached on first use; profiles go to dir ('' = no profiling).
export class Profiler {
  readonly dir: string
  readonly #inspectors = new Map<GatewayProcess, Inspector>()

  constructor (dir: string) {
    this.dir = dir
  }

  get enabled (): boolean { return this.dir !== '' }

  async inspector (gw: GatewayProcess): Promise<Inspector> {
    let insp = this.#inspectors.get(gw)
    if (insp === undefined) { insp = await Inspector.attach(gw); this.#inspectors.set(gw, insp) }
    return insp
  }

  // Runs fn under a CPU profile of gw when profiling.
  async profiled<T> (gw: GatewayProcess, name: string, fn: () => Promise<T>): Promise<T> {
    if (!this.enabled) return await fn()
    return await (await this.inspector(gw)).cpuProfile(this.dir, name, fn)
  }

  async heapSnapshot (gw: GatewayProcess, name: string): Promise<void> {
    await (await this.inspector(gw)).heapSnapshot(this.dir, name)
  }

  close (): void {
    for (const insp of this.#inspectors.values()) insp.close()
  }
}
