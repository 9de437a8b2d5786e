// The one percentile of the bench and the soak. Nearest rank, so every figure reported is a
// sample that was measured, never an interpolation between two.

// The smallest sample with at least a share p (0..1) of all samples at or below it; NaN for none.
export function percentile (values: readonly number[], p: number): number {
  if (values.length === 0) return NaN
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))]!
}

export function median (values: readonly number[]): number {
  return percentile(values, 0.5)
}
