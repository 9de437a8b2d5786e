import { Type, type Static } from '@sinclair/typebox'

export const SandboxSchema = Type.Object({
  id: Type.String(),
  status: Type.Union([Type.Literal('connected'), Type.Literal('disconnected')]),
  connectedAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
  lastSeenAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
  activeExecs: Type.Integer({ minimum: 0 })
}, { $id: 'Sandbox' })
export type Sandbox = Static<typeof SandboxSchema>

export const SandboxListSchema = Type.Object({ sandboxes: Type.Array(Type.Ref(SandboxSchema)) }, { $id: 'SandboxList' })
export const SandboxParamsSchema = Type.Object({ sandboxId: Type.String({ minLength: 1, maxLength: 256 }) })
