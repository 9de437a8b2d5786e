import type { FastifyError, FastifyInstance, FastifyReply } from 'fastify'
import { GatewayError, problem, type ErrorCode, type Problem } from '../errors.js'

// The one error handler: every failure leaves the gateway as application/problem+json with a
// stable code, and 5xx details never leak internals.

export function sendProblem (reply: FastifyReply, p: Problem): FastifyReply {
  // Every 429 says when to come back (the rate limiter sets its own, exact value).
  if (p.status === 429 && !reply.hasHeader('retry-after')) reply.header('retry-after', '1')
  return reply.code(p.status).type('application/problem+json').send(p)
}

export function installErrorHandling (app: FastifyInstance, methodsOf?: (path: string) => string[]): void {
  app.setErrorHandler((err: FastifyError, request, reply) => {
    if (GatewayError.is(err)) return sendProblem(reply, err.toProblem())
    if (err.validation !== undefined) {
      const v = err.validation[0]
      const params = (v?.params ?? {}) as Record<string, unknown>
      let field = (v?.instancePath ?? '').replace(/^\//, '').replaceAll('/', '.')
      if (typeof params.missingProperty === 'string') field = field === '' ? params.missingProperty : `${field}.${params.missingProperty}`
      if (typeof params.additionalProperty === 'string') field = field === '' ? params.additionalProperty : `${field}.${params.additionalProperty}`
      const where = err.validationContext === 'body' ? '' : `${err.validationContext ?? 'request'} `
      const what = typeof params.additionalProperty === 'string' ? 'is not a known field' : (allowedValues(err.validation, v) ?? v?.message ?? 'is invalid')
      return sendProblem(reply, problem('invalid_argument', `${where}${field === '' ? 'body' : field}: ${what}`))
    }
    const code = mapFastifyCode(err)
    if (code !== undefined) return sendProblem(reply, problem(code, err.message))
    const status = err.statusCode ?? 500
    if (status >= 400 && status < 500) return sendProblem(reply, problem('invalid_argument', err.message))
    request.log.error({ err }, 'unhandled error')
    return sendProblem(reply, problem('internal', 'internal error'))
  })

  app.setNotFoundHandler((request, reply) => {
    const path = request.url.split('?')[0] ?? ''
    const allow = methodsOf?.(path) ?? []
    if (allow.length > 0) {
      // RFC 9110 §15.5.6: a 405 lists what the resource takes.
      reply.header('allow', allow.join(', '))
      return sendProblem(reply, problem('method_not_allowed', `${request.method} is not allowed on ${path}; it takes ${allow.join(', ')}`))
    }
    return sendProblem(reply, problem('not_found', `no route ${request.method} ${path}`))
  })
}

// Ajv reports a union of literals (TypeBox's Union of Literal) as one "must be equal to constant"
// per branch, and an enum without its values: the client is told the values instead.
function allowedValues (errors: NonNullable<FastifyError['validation']>, first: NonNullable<FastifyError['validation']>[number] | undefined): string | undefined {
  if (first === undefined) return undefined
  const params = first.params as Record<string, unknown>
  let values: unknown[] | undefined
  if (first.keyword === 'enum' && Array.isArray(params.allowedValues)) values = params.allowedValues
  if (first.keyword === 'const') {
    values = errors.filter((e) => e.keyword === 'const' && e.instancePath === first.instancePath).map((e) => (e.params as Record<string, unknown>).allowedValue)
  }
  if (values === undefined || values.length === 0) return undefined
  return values.length === 1 ? `must be ${JSON.stringify(values[0])}` : `must be one of ${values.map((x) => JSON.stringify(x)).join(', ')}`
}

function mapFastifyCode (err: FastifyError): ErrorCode | undefined {
  switch (err.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE': return 'payload_too_large'
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE': return 'unsupported_media_type'
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return 'invalid_argument'
  }
  if (err instanceof SyntaxError) return 'invalid_argument'
  if (err.statusCode === 413) return 'payload_too_large'
  return undefined
}
