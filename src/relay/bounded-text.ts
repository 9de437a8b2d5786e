// Strings a sandbox chose (an SSH daemon's disconnect or channel-open description, a command's
// output quoted in an error) end up in exec records, problem details and log lines. There they
// must be short, and must not carry terminal escapes, line breaks that forge log lines, or
// bidirectional overrides that make a reader see something else than what is stored.

// C0 and C1 controls, DEL, and the Unicode format characters that reorder or hide text (bidi
// embeddings, overrides and isolates; zero-width joiners and marks; the BOM).
// eslint-disable-next-line no-control-regex
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]/g
// Terminal escape sequences go whole, parameters and all (CSI, OSC, and the two-byte ones).
// eslint-disable-next-line no-control-regex
const ESCAPE = /(?:\u001b\[|\u009b)[0-?]*[ -/]*[@-~]?|(?:\u001b\]|\u009d)[^\u0007\u001b\u009c]*(?:\u0007|\u001b\\|\u009c)?|\u001b[ -~]?/g
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g

const DEFAULT_TEXT_MAX = 200

// At most `max` characters of `s` (UTF-16 units, never splitting a pair), each unsafe one
// replaced by a space (so words stay apart) and runs of them collapsed; what was cut is said
// with its length, so a reader knows the text is not whole. Non-strings are shown by type.
export function boundedText (s: unknown, max: number = DEFAULT_TEXT_MAX): string {
  if (typeof s !== 'string') return s === undefined || s === null ? '' : `(${typeof s})`
  // Only the head can be shown: a 35 KB description is not scanned whole.
  const head = s.length > max * 2 + 16 ? s.slice(0, max * 2 + 16) : s
  let clean = head.replace(ESCAPE, ' ').replace(UNSAFE, ' ').replace(LONE_SURROGATE, '\ufffd').replace(/ {2,}/g, ' ').trim()
  const cut = s.length - head.length
  if (clean.length <= max && cut === 0) return clean
  let end = Math.min(max, clean.length)
  // Never end on the first half of a surrogate pair.
  if (end > 0 && /[\ud800-\udbff]/.test(clean[end - 1]!)) end--
  clean = clean.slice(0, end)
  return `${clean}… (${s.length} characters)`
}
