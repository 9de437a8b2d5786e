import { startGateway, type TestGateway } from './gateway.js'
import { startSupervisorProcess, type SupervisorProcess } from './supervisor-process.js'
import { sandboxAccount, startOpenSshd, type OpenSshd } from './openssh.js'
import type { GatewayConfig } from '../../src/config.js'

// A gateway with one connected sandbox whose supervisor process bridges to the embedded ssh2
// daemon or to a real OpenSSH sshd: the setup every end-to-end suite runs against both daemons.

export type Daemon = 'embedded' | 'openssh'

export interface TestSandbox {
  g: TestGateway
  id: string
  sshd: OpenSshd | undefined
  sup: SupervisorProcess
  close: () => Promise<void>
}

export async function startSandbox (daemon: Daemon, id: string, overrides: Partial<GatewayConfig> = {}): Promise<TestSandbox> {
  const g = await startGateway(overrides)
  let sshd: OpenSshd | undefined
  try {
    if (daemon === 'openssh') sshd = await startOpenSshd({ authorizedKeys: [g.gw.identity.publicKey] })
  } catch (err) {
    await g.close()
    throw err
  }
  const sup = startSupervisorProcess({
    gatewayUrl: g.supervisorUrl,
    sandboxId: id,
    token: g.token(id),
    ...(sshd === undefined ? {} : { sshTarget: `${sshd.host}:${sshd.port}`, sshUser: sandboxAccount() })
  })
  const close = async (): Promise<void> => {
    await sup.stop()
    await g.close()
    await sshd?.close()
  }
  try {
    await g.waitConnected(id)
  } catch (err) {
    await close()
    throw err
  }
  return { g, id, sshd, sup, close }
}
