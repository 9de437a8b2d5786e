import type { Reporter, TestModule } from 'vitest/node'

// Prints one plain closing line, "vitest: N passed, N failed, N skipped", which CI reads to
// tell a run that tested something from one that ran no test.
export default class SummaryLineReporter implements Reporter {
  onTestRunEnd (testModules: ReadonlyArray<TestModule>): void {
    let passed = 0
    let failed = 0
    let skipped = 0
    for (const mod of testModules) {
      for (const test of mod.children.allTests()) {
        const state = test.result().state
        if (state === 'passed') passed++
        else if (state === 'failed') failed++
        else skipped++
      }
      if (mod.state() === 'failed' && [...mod.children.allTests()].length === 0) failed++
    }
    process.stdout.write(`\nvitest: ${passed} passed, ${failed} failed, ${skipped} skipped\n`)
  }
}
