import { defineConfig } from 'vitest/config'

export default defineConfig({
  test: {
    environment: 'node',
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/global-setup.ts'],
    // Fault tests kill processes and open sockets; forks isolate them from each other and from
    // the runner better than worker threads.
    pool: 'forks',
    // The leak test forces collections to compare heaps.
    execArgv: ['--expose-gc'],
    // 2 cores, and many tests assert timing bounds (keepalives, close waits): one file at a time
    // keeps them from starving each other.
    fileParallelism: false,
    reporters: ['default', './test/reporters/summary-line.ts'],
    // `npm test` passes --coverage: a summary of src/ and routes/ as run in this process (the
    // gateways and supervisors that integration tests spawn from dist/ are not counted).
    coverage: {
      provider: 'v8',
      include: ['src/**/*.ts', 'routes/**/*.ts'],
      reporter: ['text-summary']
    },
    testTimeout: 60_000,
    hookTimeout: 60_000
  }
})
