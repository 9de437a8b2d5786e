import type { FastifyReply } from 'fastify'
import type { Encoding, ExecEntry } from '../execs/exec-entry.js'
import { sendProblem } from './errors-plugin.js'

// ?wait=true's answer: the result, or the exec's error as a problem naming it. One place for the
// POST route, the internal result route and cluster routing's wait for an exec that moved.
export async function sendWaitResult (entry: ExecEntry, encoding: Encoding, reply: FastifyReply): Promise<FastifyReply> {
  reply.header('location', `/v1/execs/${entry.id}`)
  const err = entry.error
  if (err !== undefined) return await sendProblem(reply, { ...err.toProblem(), execId: entry.id })
  return await reply.code(200).send(entry.toResult(encoding))
}
