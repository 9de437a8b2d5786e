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
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
})
