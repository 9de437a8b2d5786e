import { defineConfig } from 'vitest/config'

// `npm run bench`: only the benchmark (bench/bench.ts), never the regular tests. It starts real
// gateway, supervisor and sshd processes and measures them side by side with an OpenSSH client;
// results go to stdout and bench/RESULTS.md. Knobs: see bench/README.md.

export default defineConfig({
  test: {
    environment: 'node',
    include: ['bench/bench.ts'],
    globalSetup: ['test/global-setup.ts'],
    // The bench spawns and kills processes; a fork keeps that away from the runner.
    pool: 'forks',
    // One file, and nothing else may compete for the 2 cores while it measures.
    fileParallelism: false,
    // The table and progress go straight to stdout as they happen.
    disableConsoleIntercept: true,
    testTimeout: 600_000,
    hookTimeout: 180_000,
    teardownTimeout: 60_000
  }
})
