import diagnosticsChannel from 'node:diagnostics_channel'
import { randomUUID } from 'node:crypto'
import type { RefusalReason } from './refusals.js'

// Lifecycle events of the gateway, published on node:diagnostics_channel (as undici does) so
// the core never calls its observers: metrics.ts subscribes, and so may an operator's APM
// agent. Channels are process-wide while one process may hold several gateways (the tests run
// many), so every message names the gateway that published it and a subscriber filters on it.

interface GatewayMessage { gateway: string }

export interface ExecCreatedMessage extends GatewayMessage { execId: string, sandboxId: string }
export interface ExecEndedMessage extends GatewayMessage {
  execId: string
  sandboxId: string
  status: 'exited' | 'failed'
  // The error code of a failed exec; undefined for one that exited.
  code: string | undefined
}
export interface ExecBytesMessage extends GatewayMessage { stream: 'stdout' | 'stderr' | 'stdin', bytes: number }
export interface RelayOpenedMessage extends GatewayMessage { sandboxId: string, seconds: number }
export interface SshHandshakeMessage extends GatewayMessage { sandboxId: string, seconds: number, outcome: 'ok' | 'failed' }
export interface RelayFailedMessage extends GatewayMessage { sandboxId: string, reason: string }
export interface PingRttMessage extends GatewayMessage { seconds: number }
export interface RefusalMessage extends GatewayMessage { reason: RefusalReason }

const channels = {
  execCreated: diagnosticsChannel.channel('exec-gateway:exec:created'),
  execEnded: diagnosticsChannel.channel('exec-gateway:exec:ended'),
  execBytes: diagnosticsChannel.channel('exec-gateway:exec:bytes'),
  relayOpened: diagnosticsChannel.channel('exec-gateway:relay:opened'),
  relayFailed: diagnosticsChannel.channel('exec-gateway:relay:failed'),
  sshHandshake: diagnosticsChannel.channel('exec-gateway:ssh:handshake'),
  pingRtt: diagnosticsChannel.channel('exec-gateway:supervisor:ping-rtt'),
  refusal: diagnosticsChannel.channel('exec-gateway:sandbox:refusal')
} as const

type Payload<M> = Omit<M, 'gateway'>

// One per gateway: what its parts publish through. Publishing costs one check while nobody
// subscribes, so the per-chunk byte counts cost nothing without metrics.
export class GatewayEvents {
  readonly id = randomUUID()

  execCreated (m: Payload<ExecCreatedMessage>): void { this.#publish(channels.execCreated, m) }
  execEnded (m: Payload<ExecEndedMessage>): void { this.#publish(channels.execEnded, m) }
  execBytes (m: Payload<ExecBytesMessage>): void { this.#publish(channels.execBytes, m) }
  relayOpened (m: Payload<RelayOpenedMessage>): void { this.#publish(channels.relayOpened, m) }
  relayFailed (m: Payload<RelayFailedMessage>): void { this.#publish(channels.relayFailed, m) }
  sshHandshake (m: Payload<SshHandshakeMessage>): void { this.#publish(channels.sshHandshake, m) }
  pingRtt (m: Payload<PingRttMessage>): void { this.#publish(channels.pingRtt, m) }
  refusal (m: Payload<RefusalMessage>): void { this.#publish(channels.refusal, m) }

  #publish (channel: diagnosticsChannel.Channel, m: object): void {
    if (channel.hasSubscribers) channel.publish({ gateway: this.id, ...m })
  }
}

export type GatewayHandlers = {
  [K in keyof typeof channels]?: (m: MessageOf<K>) => void
}

type MessageOf<K extends keyof typeof channels> = {
  execCreated: ExecCreatedMessage
  execEnded: ExecEndedMessage
  execBytes: ExecBytesMessage
  relayOpened: RelayOpenedMessage
  relayFailed: RelayFailedMessage
  sshHandshake: SshHandshakeMessage
  pingRtt: PingRttMessage
  refusal: RefusalMessage
}[K]

// Subscribes to one gateway's events; the returned function unsubscribes every handler.
export function subscribeGateway (gateway: string, handlers: GatewayHandlers): () => void {
  const undo: Array<() => void> = []
  for (const key of Object.keys(handlers) as Array<keyof typeof channels>) {
    const handler = handlers[key] as ((m: GatewayMessage) => void) | undefined
    if (handler === undefined) continue
    const onMessage = (m: unknown): void => { if ((m as GatewayMessage).gateway === gateway) handler(m as GatewayMessage) }
    channels[key].subscribe(onMessage)
    undo.push(() => channels[key].unsubscribe(onMessage))
  }
  return () => { for (const u of undo.splice(0)) u() }
}
