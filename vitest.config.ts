import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // PBKDF2 at 600k iterations and real servers make some tests slow by design.
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Two cores: run files in parallel but not more than the machine can hold.
    maxWorkers: 2,
    globalSetup: ["test/global-setup.ts"],
    // Servers started by tests (tessera serve, several at once) take a free metrics port each.
    env: { TESSERA_METRICS_LISTEN: "127.0.0.1:0" },
  },
});
