import { startGateway, type TestGateway } from './gateway.js'
import { startSupervisorProcess, type SupervisorProcess } from './supervisor-process.js'
import { startFakeSupervisor, type FakeSupervisor, type FakeSupervisorOptions } from './fake-supervisor.js'
import { sandboxAccount, startOpenSshd, type OpenSshd } from './openssh.js'
import { startScriptedSshd, type ScriptedSshd, type ScriptedExecContext } from './scripted-sshd.js'
import { startTcpProxy, type TcpProxy } from './tcp-proxy.js'
import type { GatewayConfig } from '../../src/config.js'

// What fault tests start, each registered for cleanup in reverse order: call cleanup() in
// afterEach. Gateways get the suite's fast timing knobs unless a test overrides them.

// Liveness knobs a few hundred ms long, so every backstop fires within seconds.
export const FAST: Partial<GatewayConfig> = {
  sshKeepaliveIntervalMs: 300,
  sshKeepaliveCountMax: 3,
  h2PingIntervalMs: 400,
  h2PingTimeoutMs: 400,
  closeWaitMs: 500,
  sessionWaitMs: 1500,
  relayOpenTimeoutMs: 1500,
  sshReadyTimeoutMs: 2000,
  // Embedded-daemon execs are kept: a lost relay is reattached within this, then 503.
  reattachTimeoutMs: 2000
}

export interface FaultKit {
  gateway: (overrides?: Partial<GatewayConfig>) => Promise<TestGateway>
  supervisor: (g: TestGateway, sandboxId: string, extra?: { sshTarget?: string, sshUser?: string, gatewayUrl?: string }) => SupervisorProcess
  fakeSupervisor: (g: TestGateway, sandboxId: string, opts?: Omit<FakeSupervisorOptions, 'supervisorUrl' | 'token'>) => Promise<FakeSupervisor>
  openssh: (g: TestGateway) => Promise<OpenSshd>
  // A supervisor process for sandboxId, bridging to a fresh OpenSSH sshd or to its embedded
  // daemon, connected to g.
  sandbox: (g: TestGateway, sandboxId: string, daemon: 'openssh' | 'embedded') => Promise<SupervisorProcess>
  scripted: (onExec: (ctx: ScriptedExecContext) => void) => Promise<ScriptedSshd>
  proxyTo: (host: string, port: number) => Promise<TcpProxy>
  defer: (fn: () => Promise<void> | void) => void
  cleanup: () => Promise<void>
}

export function createFaultKit (defaults: Partial<GatewayConfig>): FaultKit {
  const cleanups: Array<() => Promise<void> | void> = []
  const defer = (fn: () => Promise<void> | void): void => { cleanups.push(fn) }
  const kit: FaultKit = {
    defer,
    cleanup: async () => {
      while (cleanups.length > 0) {
        try { await cleanups.pop()!() } catch { /* best effort: the next resource still goes */ }
      }
    },
    gateway: async (overrides = {}) => {
      const g = await startGateway({ ...defaults, ...overrides })
      defer(async () => { await g.close() })
      return g
    },
    supervisor: (g, sandboxId, extra = {}) => {
      const { gatewayUrl, ...rest } = extra
      const s = startSupervisorProcess({ gatewayUrl: gatewayUrl ?? g.supervisorUrl, sandboxId, token: g.token(sandboxId), ...rest })
      defer(async () => { await s.stop() })
      return s
    },
    fakeSupervisor: async (g, sandboxId, opts = {}) => {
      const f = await startFakeSupervisor({ supervisorUrl: g.supervisorUrl, token: g.token(sandboxId), ...opts })
      defer(async () => { await f.close() })
      return f
    },
    openssh: async (g) => {
      const d = await startOpenSshd({ authorizedKeys: [g.gw.identity.publicKey] })
      defer(async () => { await d.close() })
      return d
    },
    sandbox: async (g, sandboxId, daemon) => {
      let s: SupervisorProcess
      if (daemon === 'openssh') {
        const d = await kit.openssh(g)
        s = kit.supervisor(g, sandboxId, { sshTarget: `${d.host}:${d.port}`, sshUser: sandboxAccount() })
      } else {
        s = kit.supervisor(g, sandboxId)
      }
      await g.waitConnected(sandboxId)
      return s
    },
    scripted: async (onExec) => {
      const s = await startScriptedSshd({ onExec })
      defer(async () => { await s.close() })
      return s
    },
    proxyTo: async (host, port) => {
      const p = await startTcpProxy({ targetHost: host, targetPort: port })
      defer(async () => { await p.close() })
      return p
    }
  }
  return kit
}
