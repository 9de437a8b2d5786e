import { Type, type Static } from '@sinclair/typebox'

// GET /readyz: 'ready' once both listeners are up (and the embedded sandbox with them),
// 'starting' before, 'draining' from the first step of shutdown.
const ReadinessSchema = Type.Union([Type.Literal('ready'), Type.Literal('starting'), Type.Literal('draining')])
export type Readiness = Static<typeof ReadinessSchema>

export const ReadinessBodySchema = Type.Object({ status: ReadinessSchema })
