// A whole-number knob from the environment (soak and bench), checked against its range.
export function intEnv (name: string, def: number, min: number, max: number): number {
  const raw = process.env[name]
  if (raw === undefined || raw === '') return def
  if (!/^\d+$/.test(raw)) throw new Error(`${name} must be a whole number, got ${JSON.stringify(raw)}`)
  const n = Number(raw)
  if (n < min || n > max) throw new Error(`${name} must be in ${min}..${max}, got ${n}`)
  return n
}
