import { describe, expect, it } from 'vitest'
import { eventFormat } from '../../src/http/accept.js'

// GET /events picks SSE or NDJSON from Accept as RFC 9110 §12.5.1 says: q-values, and the most
// specific matching range.
describe('the event format from Accept', () => {
  it.each([
    [undefined, 'ndjson'],
    ['', 'ndjson'],
    ['*/*', 'ndjson'],
    ['application/json', 'ndjson'],
    ['text/event-stream', 'sse'],
    ['TEXT/Event-Stream', 'sse'],
    ['application/x-ndjson', 'ndjson'],
    ['text/event-stream, */*', 'sse'],
    ['text/event-stream;q=0.5, application/x-ndjson', 'ndjson'],
    ['application/x-ndjson;q=0.2, text/event-stream;q=0.9', 'sse'],
    ['text/event-stream;q=0', 'ndjson'],
    ['text/*, application/x-ndjson;q=0.1', 'sse'],
    ['text/event-stream;q=0, */*', 'ndjson'],
    ['application/x-ndjson;q=0, text/event-stream;q=0.1', 'sse'],
    ['text/event-stream, application/x-ndjson', 'ndjson'],
    ['garbage, text/event-stream ; q = 0.8', 'sse']
  ] as const)('%s → %s', (accept, want) => {
    expect(eventFormat(accept)).toBe(want)
  })
})
