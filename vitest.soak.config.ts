import { defineConfig } from 'vitest/config'
import type { Reporter, TestModule } from 'vitest/node'

// `npm run soak`: only the soak (soak/soak.ts), never the regular tests. Knobs come from the
// environment (SOAK_DURATION_S, SOAK_AGENTS, SOAK_SANDBOXES, SOAK_SEED, ...; see soak/README.md).

const durationS = Number(process.env.SOAK_DURATION_S ?? 120) || 120

// The soak's own verdict, "soak: N passed, N failed", as the very last line of the run, after
// vitest's summary, so CI can read it. The test hands it over in its task meta; a soak that
// died before its summary still prints a failing line.
const soakLine: Reporter = {
  onTestRunEnd (testModules: ReadonlyArray<TestModule>): void {
    let line: string | undefined
    for (const mod of testModules) {
      for (const test of mod.children.allTests()) {
        const l = (test.meta() as { soakLine?: string }).soakLine
        if (typeof l === 'string') line = l
      }
    }
    process.stdout.write(`\n${line ?? 'soak: 0 passed, 1 failed (the soak did not reach its summary; see the output above)'}\n`)
  }
}

export default defineConfig({
  test: {
    environment: 'node',
    include: ['soak/soak.ts'],
    globalSetup: ['test/global-setup.ts'],
    // The soak SIGKILLs and SIGSTOPs processes; a fork keeps that away from the runner.
    pool: 'forks',
    fileParallelism: false,
    // Progress and the summary go straight to stdout as they happen.
    disableConsoleIntercept: true,
    reporters: ['default', soakLine],
    testTimeout: (durationS + 300) * 1000,
    hookTimeout: 120_000
  }
})
