// decodeClientFrame checks WebSocket client frames with the schemas the OpenAPI document
// publishes: every frame the contract allows is taken as sent, everything else is refused with
// the reason a client reads in the 1008 close.
import { describe, expect, it } from 'vitest'
import { MAX_TERMINAL_SIZE, SIGNALS } from '../../src/schemas/exec.js'
import { decodeClientFrame } from '../../src/schemas/frames.js'

const refusal = (text: string): string => {
  const d = decodeClientFrame(text)
  if (d.ok) throw new Error(`${text} was accepted`)
  return d.why
}

describe('decodeClientFrame', () => {
  it('takes every frame docs/api.md §4 names, extra fields ignored', () => {
    const frames = [
      { type: 'stdin', data: 'hello\n' },
      { type: 'stdin', data: '' },
      { type: 'eof' },
      { type: 'resize', cols: 1, rows: MAX_TERMINAL_SIZE },
      ...SIGNALS.map((signal) => ({ type: 'signal', signal }))
    ]
    for (const f of frames) expect(decodeClientFrame(JSON.stringify({ ...f, extra: 1 }))).toEqual({ ok: true, frame: { ...f, extra: 1 } })
    // 80.0 is the integer 80 once parsed.
    expect(decodeClientFrame('{"type":"resize","cols":80.0,"rows":24}').ok).toBe(true)
  })

  it('refuses what is not a JSON object with a known "type"', () => {
    for (const text of ['', ' ', 'null', '[]', '"eof"', '1', '{', '{"type":"stdin","data":"x"']) {
      expect(refusal(text), text).toBe('frames must be JSON objects with a "type"')
    }
    for (const text of ['{}', '{"type":1}', '{"type":"nonsense"}', '{"type":"constructor"}', '{"type":"__proto__"}', '{"__proto__":{"type":"eof"}}', '{"type":"EOF"}']) {
      expect(refusal(text), text).toBe('unknown frame type; use stdin, eof, resize or signal')
    }
  })

  it('names the rule a known frame breaks', () => {
    for (const text of ['{"type":"stdin"}', '{"type":"stdin","data":1}', '{"type":"stdin","data":null}', '{"type":"stdin","data":["x"]}']) {
      expect(refusal(text), text).toBe('stdin frames need a string "data"')
    }
    for (const [cols, rows] of [[0, 24], [80, 0], [MAX_TERMINAL_SIZE + 1, 24], [80, 1.5], ['80', 24], [null, 24], [-1, 24], ['1e400', 1]]) {
      const text = `{"type":"resize","cols":${cols === '1e400' ? '1e400' : JSON.stringify(cols)},"rows":${JSON.stringify(rows)}}`
      expect(refusal(text), text).toBe(`resize needs integer cols and rows in 1..${MAX_TERMINAL_SIZE}`)
    }
    expect(refusal('{"type":"resize","cols":80}')).toMatch(/^resize needs/)
    for (const signal of ['SIGTERM', 'term', 'KILL ', '', 'STOP', '9', 'TERM\u0000', 9, null]) {
      expect(refusal(JSON.stringify({ type: 'signal', signal })), String(signal)).toBe(`signal must be one of ${SIGNALS.join(', ')}`)
    }
  })

  it('keeps a refusal within a close frame\'s reason (123 bytes)', () => {
    for (const text of ['x', '{"type":"x"}', '{"type":"stdin"}', '{"type":"resize"}', '{"type":"signal"}']) {
      expect(Buffer.byteLength(refusal(text)), text).toBeLessThanOrEqual(123)
    }
  })
})
