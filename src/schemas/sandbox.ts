import { Type, type Static } from '@sinclair/typebox'

// The one sandbox-id rule: tokens are only signed for ids that match it, so no other id can
// ever connect; the public routes check the same rule.
export const SANDBOX_ID_MAX_CHARS = 128
export const SANDBOX_ID_PATTERN = new RegExp(`^[A-Za-z0-9][A-Za-z0-9._-]{0,${SANDBOX_ID_MAX_CHARS - 1}}$`)
export const SANDBOX_ID_RULE = `1-${SANDBOX_ID_MAX_CHARS} of A-Z a-z 0-9 . _ - starting with a letter or digit`

const SandboxIdSchema = Type.String({ minLength: 1, maxLength: SANDBOX_ID_MAX_CHARS, pattern: SANDBOX_ID_PATTERN.source, description: SANDBOX_ID_RULE })

export const SandboxSchema = Type.Object({
  id: Type.String(),
  status: Type.Union([Type.Literal('connected'), Type.Literal('disconnected')]),
  connectedAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
  lastSeenAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
  activeExecs: Type.Integer({ minimum: 0 })
}, { $id: 'Sandbox' })
export type Sandbox = Static<typeof SandboxSchema>

export const SandboxListSchema = Type.Object({ sandboxes: Type.Array(Type.Ref(SandboxSchema)) })
export const SandboxParamsSchema = Type.Object({ sandboxId: SandboxIdSchema })
