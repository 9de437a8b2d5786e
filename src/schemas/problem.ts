import { Type, type Static } from '@sinclair/typebox'
import { errorTable, type ErrorCode } from '../errors.js'

export const ErrorCodeSchema = Type.Union(Object.keys(errorTable).map((c) => Type.Literal(c)), { $id: 'ErrorCode', description: 'stable, machine-readable error code' })

export const ProblemSchema = Type.Object({
  type: Type.String(),
  title: Type.String(),
  status: Type.Integer(),
  detail: Type.String(),
  code: Type.String({ description: 'stable, machine-readable error code (see ErrorCode)' }),
  execId: Type.Optional(Type.String({ description: 'the exec this error ended, when there is one' }))
}, { $id: 'Problem', description: 'RFC 9457 problem details' })
export type ProblemBody = Static<typeof ProblemSchema>

// Exec errors as stored on the exec and sent in final `error` events.
export const ExecErrorSchema = Type.Object({
  code: Type.String(),
  status: Type.Integer(),
  detail: Type.String()
}, { $id: 'ExecError' })
export type ExecErrorBody = Static<typeof ExecErrorSchema>

// Response entry for every problem status a route can return, with the media type it really has.
// In the document, src/http/openapi.ts replaces it with named codes for the statuses that
// plugins produce (400, 401, 403, 413, 415, 500); a handler's own statuses use problemResponse.
export const ProblemResponse = {
  description: 'RFC 9457 problem details; `code` is the stable, machine-readable part',
  content: { 'application/problem+json': { schema: Type.Ref(ProblemSchema) } }
}

// Marks a response entry built by problemResponse, with the codes it names.
export const kProblemCodes = Symbol('exec-gateway.problemCodes')

// The same, naming the codes a route can return with that status: clients branch on `code`, so
// the document says which ones to expect where.
export function problemResponse (codes: readonly ErrorCode[], why: string, headers?: Record<string, { description: string, type: string }>) {
  return {
    description: `${codes.map((c) => `\`${c}\``).join(', ')}: ${why}`,
    ...(headers === undefined ? {} : { headers }),
    content: { 'application/problem+json': { schema: Type.Ref(ProblemSchema) } },
    [kProblemCodes]: codes
  }
}
