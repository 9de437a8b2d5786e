import fc from 'fast-check'

// Generators of hostile input for test/fuzz/hostile-input.test.ts. Every request that the
// gateway might accept runs a harmless program: random text never becomes argv[0].

export const MiB = 1024 * 1024

// Programs that end at once whatever their arguments, stdin, tty or env: an accepted exec must
// end by itself. '' and '-x' are not found (127); ':' and 'exit' are shell-only names.
const SAFE_PROGRAMS = ['true', 'echo', ':', 'exit', '', '-x', 'no-such-program-☃'] as const

export const SHELL_META = ["'", '"', '\\', '$', '`', '$(', ')', '(', ';', '|', '&', '&&', '\n', '\r', '\t', ' ', '*', '?', '[', ']', '{', '}', '~', '-', '--', '#', '!', '<', '>', '>>', '=', '%', "'\\''", '\\\'', '${', '$@', '$*', '$0', '$$', '$((1+1))', '\\n', 'é', '😀', '\u202e', '\u00a0', '\u2028', 'a', 'Z', '0', '/'] as const

// A string of exactly `bytes` UTF-8 bytes (a lone surrogate counts 3, as Buffer.byteLength says):
// the unit repeated, then 'a' padding.
function ofBytes (unit: string, bytes: number): string {
  const size = Buffer.byteLength(unit)
  const n = Math.max(0, Math.floor(bytes / size))
  return unit.repeat(n) + 'a'.repeat(Math.max(0, bytes - n * size))
}

// Strings a few bytes either side of a limit, in 1-, 2-, 3- and 4-byte characters.
function nearLimit (limit: number): fc.Arbitrary<string> {
  return fc.record({ unit: fc.constantFrom('a', 'é', '€', '😀', '\ud800', '\0', '\n'), delta: fc.integer({ min: -2, max: 2 }) })
    .map(({ unit, delta }) => ofBytes(unit, limit + delta))
}

export const metaString = fc.string({ unit: fc.constantFrom(...SHELL_META), maxLength: 10 })

const WEIRD_SCALARS: unknown[] = [
  null, true, false, 0, -0, -1, 1, 1.5, -1.5, 0.1, 24, 80, 10000, 10001, 604800, 604801, 2 ** 31, 2 ** 32 + 1,
  2 ** 53, -(2 ** 53), 1e308, -1e308, Number.MIN_VALUE,
  '', ' ', '0', '1', 'true', 'null', '\0', 'a\0b', '\r', '\n', 'a\r\nb', '\ud800', '\udfff', 'a\udc00b', '\udfff\ud800',
  '😀', '\u2028', '\ufeff', '%00', '$(id)', '`id`', "'", '../../../etc', '__proto__', 'constructor', 'prototype',
  'TERM', 'utf8', 'base64', 'AAAA', '====', 'A===', '\t',
  [], {}, [null], [''], ['true'], [[]], { a: 1 }, { '': '' }, [1, 2, 3]
]

export const weirdString: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom(...WEIRD_SCALARS.filter((v): v is string => typeof v === 'string')),
  fc.string({ unit: 'binary', maxLength: 40 }),
  fc.string({ unit: 'grapheme', maxLength: 20 }),
  metaString,
  fc.string({ unit: fc.constantFrom('\ud800', '\udc00', 'a', '\0', '\r', '\n'), maxLength: 6 })
)

export const weirdValue: fc.Arbitrary<unknown> = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom(...WEIRD_SCALARS) },
  { weight: 3, arbitrary: weirdString },
  { weight: 2, arbitrary: fc.jsonValue({ maxDepth: 3, stringUnit: 'binary' }) },
  { weight: 1, arbitrary: fc.integer() },
  { weight: 1, arbitrary: fc.double() },
  { weight: 1, arbitrary: fc.array(weirdString, { maxLength: 5 }) },
  { weight: 1, arbitrary: fc.dictionary(weirdString, weirdString, { maxKeys: 4 }) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 2000 }).map((d) => nest(d)) }
)

function nest (depth: number): unknown {
  let v: unknown = 'leaf'
  for (let i = 0; i < depth; i++) v = i % 2 === 0 ? [v] : { a: v }
  return v
}

// Own enumerable properties only, so "__proto__" and "constructor" survive into the JSON text.
function setOwn (obj: Record<string, unknown>, key: string, value: unknown): void {
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true })
}

// argv[0] of anything the gateway could accept is one of SAFE_PROGRAMS.
function sanitizeCommand (command: unknown): unknown {
  if (!Array.isArray(command) || typeof command[0] !== 'string') return command
  if ((SAFE_PROGRAMS as readonly string[]).includes(command[0])) return command
  return ['true', ...command.slice(1)]
}

export function sanitizeBody (body: unknown): unknown {
  if (typeof body !== 'object' || body === null || Array.isArray(body) || !Object.hasOwn(body, 'command')) return body
  setOwn(body as Record<string, unknown>, 'command', sanitizeCommand((body as Record<string, unknown>).command))
  return body
}

const KNOWN_FIELDS = ['command', 'env', 'workdir', 'stdin', 'stdinBase64', 'interactive', 'tty', 'cols', 'rows', 'timeoutSeconds'] as const
const ODD_FIELDS = ['__proto__', 'constructor', 'prototype', 'toString', 'hasOwnProperty', 'Command', 'command ', '', 'id', 'status', 'exitCode', 'wait', 'encoding', 'sandboxId', '\0', '😀']

const envKey = fc.oneof(
  fc.constantFrom('A', '_', 'FOO_1', 'a1', 'LANG', '1A', 'A-B', 'A B', 'A=B', 'ÄB', '', '__proto__', 'constructor', 'A\0', 'A\n', '$A', 'EXEC_GATEWAY_EXEC_ID'),
  fc.stringMatching(/^[A-Za-z_][A-Za-z0-9_]{0,8}$/),
  weirdString
)

const validRequest = fc.record({
  command: fc.tuple(fc.constantFrom(...SAFE_PROGRAMS), fc.array(fc.oneof(metaString, fc.string({ unit: 'grapheme', maxLength: 10 })), { maxLength: 4 })).map(([p, a]) => [p, ...a]),
  env: fc.dictionary(fc.stringMatching(/^[A-Z_][A-Z0-9_]{0,6}$/).filter((k) => k !== 'PATH'), fc.string({ maxLength: 10 }).filter((s) => !/[\0\r\n]/.test(s)), { maxKeys: 3 }),
  workdir: fc.constantFrom('/', '/tmp', '.', '/nonexistent dir'),
  stdin: fc.string({ maxLength: 20 }),
  stdinBase64: fc.uint8Array({ maxLength: 20 }).map((b) => Buffer.from(b).toString('base64')),
  interactive: fc.boolean(),
  tty: fc.boolean(),
  cols: fc.integer({ min: 1, max: 300 }),
  rows: fc.integer({ min: 1, max: 100 }),
  timeoutSeconds: fc.integer({ min: 0, max: 5 })
}, { requiredKeys: ['command'] }).map((r) => {
  // A valid request never has both; the mutations may put the second one back.
  if (r.stdin !== undefined && r.stdinBase64 !== undefined) delete (r as Record<string, unknown>).stdinBase64
  if (r.interactive === true) { delete (r as Record<string, unknown>).stdin; delete (r as Record<string, unknown>).stdinBase64 }
  return r as Record<string, unknown>
})

type Mutation = (req: Record<string, unknown>) => void

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  { weight: 5, arbitrary: fc.tuple(fc.constantFrom(...KNOWN_FIELDS, ...ODD_FIELDS), weirdValue).map(([f, v]): Mutation => (r) => setOwn(r, f, f === 'command' ? sanitizeCommand(v) : v)) },
  { weight: 2, arbitrary: fc.constantFrom(...KNOWN_FIELDS).map((f): Mutation => (r) => { delete r[f] }) },
  { weight: 4, arbitrary: fc.tuple(fc.nat(5), weirdValue).map(([i, v]): Mutation => (r) => { if (Array.isArray(r.command)) r.command[Math.min(i + 1, r.command.length)] = v }) },
  { weight: 4, arbitrary: fc.tuple(envKey, weirdValue).map(([k, v]): Mutation => (r) => { const env = typeof r.env === 'object' && r.env !== null ? r.env as Record<string, unknown> : {}; setOwn(env, k, v); r.env = env }) },
  { weight: 1, arbitrary: fc.tuple(fc.constantFrom(1023, 1024, 1025, 2000), fc.constantFrom('', 'a', '-')).map(([n, a]): Mutation => (r) => { r.command = ['true', ...Array.from({ length: n - 1 }, () => a)] }) },
  { weight: 2, arbitrary: nearLimit(32768).map((s): Mutation => (r) => { r.command = ['true', s] }) },
  { weight: 1, arbitrary: nearLimit(32768).map((s): Mutation => (r) => { r.env = { V: s } }) },
  { weight: 1, arbitrary: nearLimit(4096).map((s): Mutation => (r) => { r.workdir = s }) },
  // Nine or ten args of 30000 bytes: each under its own limit, the assembled line over 262144.
  { weight: 1, arbitrary: fc.integer({ min: 9, max: 10 }).map((n): Mutation => (r) => { r.command = ['true', ...Array.from({ length: n }, () => 'x'.repeat(30000))] }) },
  { weight: 1, arbitrary: fc.constantFrom(MiB - 1, MiB, MiB + 1).map((n): Mutation => (r) => { delete r.interactive; delete r.stdinBase64; r.stdin = 'x'.repeat(n) }) },
  { weight: 1, arbitrary: fc.constantFrom(MiB, MiB + 1).map((n): Mutation => (r) => { delete r.interactive; delete r.stdin; r.stdinBase64 = Buffer.alloc(n, 7).toString('base64') }) },
  { weight: 1, arbitrary: fc.constantFrom('QQ', 'QQ=', 'Q===', 'QUJD\n', 'QUJD====', '-_-_', 'QU JD', '😀', '').map((s): Mutation => (r) => { delete r.stdin; r.stdinBase64 = s }) }
)

export const nearValidRequest: fc.Arbitrary<Record<string, unknown>> = fc.tuple(validRequest, fc.array(mutation, { maxLength: 3 }))
  .map(([req, muts]) => { const r = structuredClone(req); for (const m of muts) m(r); return r })

// JSON text the serialiser would never produce: duplicate keys, deep nesting, odd numbers and
// escapes, trailing bytes, a byte-order mark, comments.
const numberText = fc.constantFrom('1e400', '-1e400', '-0', '1.0', '1E0', '0.5', '-1', '604800', '604801', '1e-400', '00', '01', '0x10', '+1', '.5', '5.', 'Infinity', 'NaN', '9007199254740993', '1'.repeat(400), '1e2', '2e5')
const escapeText = fc.constantFrom('"\\u0000"', '"\\ud800"', '"\\udfff\\ud800"', '"\\ud83d\\ude00"', '"\\x41"', '"\\u12"', '"\\"', '"a\tb"', '"a\nb"', '"\\/"', '"\\u0061"', "'a'")
const weirdJsonText = weirdValue.map((v) => JSON.stringify(sanitizeCommand(v)) ?? 'null')

export const rawJsonText: fc.Arbitrary<string> = fc.oneof(
  weirdJsonText.map((w) => `{"command":["true"],"command":${w}}`),
  weirdJsonText.map((w) => `{"command":${w},"command":["true"]}`),
  fc.tuple(fc.constantFrom(...KNOWN_FIELDS.filter((f) => f !== 'command')), weirdJsonText, weirdJsonText).map(([f, a, b]) => `{"command":["true"],"${f}":${a},"${f}":${b}}`),
  fc.tuple(fc.constantFrom('timeoutSeconds', 'cols', 'rows'), numberText).map(([f, n]) => `{"command":["true"],"${f}":${n}}`),
  escapeText.map((e) => `{"command":["true",${e}]}`),
  escapeText.map((e) => `{"command":["true"],"env":{"A":${e}}}`),
  escapeText.map((e) => `{"command":["true"],"workdir":${e}}`),
  escapeText.map((e) => `{"command":["true"],"stdin":${e}}`),
  escapeText.map((e) => `{"command":["true"],"env":{${e}:"x"}}`),
  fc.integer({ min: 1, max: 200_000 }).map((d) => '['.repeat(d) + ']'.repeat(d)),
  fc.integer({ min: 1, max: 200_000 }).map((d) => '{"a":'.repeat(d) + '1' + '}'.repeat(d)),
  fc.integer({ min: 1, max: 100_000 }).map((d) => '{"command":["true"],"env":' + '{"A":'.repeat(d) + '"x"' + '}'.repeat(d + 1)),
  fc.integer({ min: 1, max: 100_000 }).map((d) => '{"command":["true"],"x":' + '['.repeat(d) + ']'.repeat(d) + '}'),
  fc.integer({ min: 1, max: 100_000 }).map((d) => '['.repeat(d)),
  fc.constantFrom(
    '{"command":["true"],"__proto__":{"interactive":true,"polluted":1}}',
    '{"__proto__":{"command":["true"]}}',
    '{"command":["true"],"constructor":{"prototype":{"polluted":1}}}',
    '{"command":["true"],"env":{"__proto__":{"polluted":"1"}}}',
    '{"command":["true"],"env":{"constructor":{"prototype":{"polluted":"1"}}}}',
    '{"command":["true"],"env":{"__proto__":"x"}}',
    '{"command":["true"],"env":{"constructor":"x","toString":"y","hasOwnProperty":"z"}}',
    '{"command":{"0":"true","length":1}}',
    '{"command":["true"]}garbage',
    '{"command":["true"]}{"command":["true"]}',
    '{"command":["true"]}\0',
    '{"command":["true"]',
    '{"command":["true"],}',
    '{"command":["true" "x"]}',
    '/*c*/{"command":["true"]}',
    '\ufeff{"command":["true"]}',
    ' \n\t{"command":["true"]}\r\n ',
    '{"command":["true"],"timeoutSeconds":1,"timeoutSeconds":-1}',
    '{"command":["true"],"interactive":true,"stdin":"x","interactive":false}',
    'null', 'true', '0', '""', '[]', '{}', '"{\\"command\\":[\\"true\\"]}"', '[{"command":["true"]}]', '{"command":[]}', '{"command":["true"],"env":[]}'
  )
)
