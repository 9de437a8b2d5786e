import type { FastifyError, FastifyInstance, FastifyReply } from 'fastify'
import { GatewayError, problem, type ErrorCode, type Problem } from '../errors.js'

// The one error handler: every failure leaves the gateway as application/problem+json with a
// stable code, and 5xx details never leak internals.

export function sendProblem (reply: FastifyReply, p: Problem): FastifyReply {
  // Every 429 says when to come back (the rate limiter sets its own, exact value).
  if (p.status === 429 && !reply.hasHeader('retry-after')) reply.header('retry-after', '1')
  return reply.code(p.status).type('application/problem+json').send(p)
}

export function installErrorHandling (app: FastifyInstance): void {
  app.setErrorHandler((err: FastifyError, request, reply) => {
    if (GatewayError.is(err)) return sendProblem(reply, err.toProblem())
    if (err.validation !== undefined) {
      const v = err.validation[0]
      const params = (v?.params ?? {}) as Record<string, unknown>
      let field = (v?.instancePath ?? '').replace(/^\//, '').replaceAll('/', '.')
      if (typeof params.missingProperty === 'string') field = field === '' ? params.missingProperty : `${field}.${params.missingProperty}`
      if (typeof params.additionalProperty === 'string') field = field === '' ? params.additionalProperty : `${field}.${params.additionalProperty}`
      const where = err.validationContext === 'body' ? '' : `${err.validationContext ?? 'request'} `
      const what = typeof params.additionalProperty === 'string' ? 'is not a known field' : (v?.message ?? 'is invalid')
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
    sendProblem(reply, problem('not_found', `no route ${request.method} ${request.url.split('?')[0]}`))
  })
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
