import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // End-to-end tests start servers, sshd and nix clients; two cores do not take many at once.
    fileParallelism: true,
    maxWorkers: 2,
    reporters: ['default'],
  },
});
