import { defineConfig } from "vitest/config";

/** The end-to-end files: each starts a real Tessera server (see the "connect" project). */
const E2E_FILES = [
  "test/admin-token.test.ts",
  "test/admission.test.ts",
  "test/cli-admin.test.ts",
  "test/cli-audit.test.ts",
  "test/cli-complete.test.ts",
  "test/cli-e2e.test.ts",
  "test/cli-plaintext-profile.test.ts",
  "test/cli-whoami.test.ts",
  "test/commit-outcome.test.ts",
  "test/connection-age.test.ts",
  "test/edge.test.ts",
  "test/examples-workflows.test.ts",
  "test/examples.test.ts",
  "test/grpc-interop.test.ts",
  "test/hot-path.test.ts",
  "test/jwt.test.ts",
  "test/lock-order.test.ts",
  "test/logging.test.ts",
  "test/metrics-serve.test.ts",
  "test/metrics.test.ts",
  "test/mtls-machine.test.ts",
  "test/mtls-reload.test.ts",
  "test/oauth-openid-client.test.ts",
  "test/oauth.test.ts",
  "test/pagination.test.ts",
  "test/revocation-hops.test.ts",
  "test/rotation-revocation-race.test.ts",
  "test/sdk-client.test.ts",
  "test/sdk-credentials.test.ts",
  "test/sdk-ergonomics.test.ts",
  "test/sdk-errors.test.ts",
  "test/sdk-refresh.test.ts",
  "test/sdk-server-cache-e2e.test.ts",
  "test/sdk-server-express.test.ts",
  "test/sdk-server-fastify.test.ts",
  "test/sdk-server-interceptor.test.ts",
  "test/sdk-server-streams.test.ts",
  "test/server-cli.test.ts",
  "test/server.e2e.test.ts",
  "test/service-lifecycle.test.ts",
  "test/shared-verification.test.ts",
  "test/shutdown-drain.test.ts",
  "test/tenant-wall.test.ts",
  "test/token-e2e.test.ts",
  "test/verification-faults.test.ts",
  "test/verification.test.ts",
  "test/watch-revocations.test.ts",
  "test/watch-revocations-aborts.test.ts",
  "test/watch-revocations-restore.test.ts",
  "test/watch-revocations-truncate.test.ts",
  "test/security/**/*.test.ts",
];

export default defineConfig({
  test: {
    // PBKDF2 at 600k iterations and real servers make some tests slow by design.
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // expect.poll's own default gives up after 1 s: on two cores shared by the suite's files,
    // a condition that holds a moment later can take longer than that to be seen. A poll
    // returns as soon as it holds; tests that bound a time say so with their own timeout.
    expect: { poll: { timeout: 10_000 } },
    // Two cores: run files in parallel but not more than the machine can hold.
    maxWorkers: 2,
    globalSetup: ["test/global-setup.ts"],
    // A file whose worker stops turning its event loop (test/watchdog.ts), or that stops
    // reporting anything at all (test/stall-reporter.ts), is ended and reported failed:
    // Vitest's own timeouts are timers in the worker, and nothing bounds a whole file.
    setupFiles: ["test/watchdog.ts"],
    reporters: ["default", "./test/stall-reporter.ts"],
    env: {
      // Servers started by tests (tessera serve, several at once) take a free metrics port each.
      TESSERA_METRICS_LISTEN: "127.0.0.1:0",
      // Hashing at normal priority without a deadline, as test/helpers.ts gives in-process
      // apps: the suite's files share two cores, and at nice 19 (or SCHED_IDLE) with a 900 ms deadline a
      // spawned server's Login would be refused busy (503) by design. The defaults are
      // tested explicitly (test/security/hash-priority.test.ts).
      TESSERA_HASH_NICE: "0",
      TESSERA_HASH_IDLE: "false",
      TESSERA_HASH_DEADLINE_MS: "0",
    },
    // `npm test` runs every project; `vitest run --project unit` (or `connect`, `multi`) runs one.
    projects: [
      {
        extends: true,
        test: { name: "unit", include: ["test/**/*.test.ts"], exclude: ["test/multi/**"] },
      },
      {
        // Every file that starts a real Tessera server (in process or `tessera serve`), on
        // connect-node's stock adapter (server.transport=connect): both transports must answer
        // every call alike (issue 19). Left out: files about the fast adapter's own internals
        // (they drive both adapters themselves), the benchmark harness, the packed tarball's
        // dependency tree, and files that start no Tessera server.
        extends: true,
        test: {
          name: "connect",
          include: E2E_FILES,
          env: { TESSERA_TRANSPORT: "connect" },
        },
      },
      {
        // Several `tessera serve` processes on one PostgreSQL schema (and Redis): slow, and
        // sensitive to the machine's load, so they get their own project and longer limits.
        extends: true,
        test: {
          name: "multi",
          include: ["test/multi/**/*.test.ts"],
          testTimeout: 240_000,
          hookTimeout: 240_000,
        },
      },
      {
        // The same instances on connect-node's stock adapter.
        extends: true,
        test: {
          name: "multi-connect",
          include: ["test/multi/**/*.test.ts"],
          testTimeout: 240_000,
          hookTimeout: 240_000,
          env: { TESSERA_TRANSPORT: "connect" },
        },
      },
    ],
  },
});
