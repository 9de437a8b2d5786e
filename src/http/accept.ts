// Which of the event formats a request's Accept header prefers (RFC 9110 §12.5.1): each media
// type gets the q of the most specific range that matches it (type/subtype over type/* over
// */*), and the higher q wins. A tie goes to SSE only when it was named outright; with no
// Accept at all, or one that names neither, the answer is NDJSON, as curl and SDKs expect.

export type EventFormat = 'sse' | 'ndjson'

interface Range { type: string, subtype: string, q: number }

function ranges (accept: string): Range[] {
  const out: Range[] = []
  for (const part of accept.split(',')) {
    const [media, ...params] = part.trim().split(';')
    const m = /^([\w.+-]+|\*)\/([\w.+-]+|\*)$/.exec((media ?? '').trim().toLowerCase())
    if (m === null) continue
    let q = 1
    for (const p of params) {
      const qm = /^\s*q\s*=\s*([0-9.]+)\s*$/i.exec(p)
      if (qm !== null) q = Math.min(1, Math.max(0, Number(qm[1]) || 0))
    }
    out.push({ type: m[1]!, subtype: m[2]!, q })
  }
  return out
}

// The q of the most specific range matching type/subtype, and how specific it was (2 exact, 1
// type/*, 0 */*); undefined when none matches.
function quality (rs: Range[], type: string, subtype: string): { q: number, specificity: number } | undefined {
  let best: { q: number, specificity: number } | undefined
  for (const r of rs) {
    const specificity = r.type === type && r.subtype === subtype ? 2 : r.type === type && r.subtype === '*' ? 1 : r.type === '*' && r.subtype === '*' ? 0 : -1
    if (specificity < 0) continue
    if (best === undefined || specificity > best.specificity) best = { q: r.q, specificity }
  }
  return best
}

export function eventFormat (accept: string | undefined): EventFormat {
  if (accept === undefined || accept.trim() === '') return 'ndjson'
  const rs = ranges(accept)
  const sse = quality(rs, 'text', 'event-stream')
  const ndjson = quality(rs, 'application', 'x-ndjson')
  if (sse === undefined || sse.q === 0) return 'ndjson'
  if (ndjson === undefined || ndjson.q === 0) return 'sse'
  if (sse.q !== ndjson.q) return sse.q > ndjson.q ? 'sse' : 'ndjson'
  return sse.specificity === 2 && ndjson.specificity < 2 ? 'sse' : 'ndjson'
}
