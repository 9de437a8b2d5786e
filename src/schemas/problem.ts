import { Type, type Static } from '@sinclair/typebox'
import { errorCodes, type ErrorCode } from '../errors.js'

// The codes of the table as one string enum (TypeBox's StringEnum pattern): the document then
// publishes an `enum`, so generated clients type `code` as the union, not as `string`.
export const ErrorCodeSchema = Type.Unsafe<ErrorCode>({
  type: 'string',
  enum: errorCodes,
  $id: 'ErrorCode',
  description: 'stable, machine-readable error code; clients branch on it, never on the text'
})

// What happened, for people: the same text wherever an error is reported. It is `detail` in a
// problem and in the exec record's `error`, `message` in a final `error` event (docs/api.md §3, §4).
export const ErrorTextSchema = Type.String({ description: 'what happened, for people; never branch on it (use `code`)' })

export const ProblemSchema = Type.Object({
  type: Type.String(),
  title: Type.String(),
  status: Type.Integer(),
  detail: ErrorTextSchema,
  code: Type.Ref(ErrorCodeSchema),
  execId: Type.Optional(Type.String({ description: 'the exec this error ended, when there is one' }))
}, { $id: 'Problem', description: 'RFC 9457 problem details' })
export type ProblemBody = Static<typeof ProblemSchema>

// Exec errors as stored on the exec: a problem's code, status and detail.
export const ExecErrorSchema = Type.Object({
  code: Type.Ref(ErrorCodeSchema),
  status: Type.Integer(),
  detail: ErrorTextSchema
}, { $id: 'ExecError' })

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
