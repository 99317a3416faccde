/**
 * Issue 22's downstream target in instructions: the example service (examples/workflows,
 * ListWorkflows over Connect JSON, HTTP/2 + TLS) served by a checkout, counted by valgrind's
 * callgrind per request, without the interceptor and with it (JWT checked offline, PAT from
 * the warm cache). The shared VM's timings cannot resolve the ≥ 90 % line; the ratio of
 * instructions per request can.
 *
 *   npx tsx bench/downstream-instructions.ts --root <checkout> [--cases bare,bare-header,jwt,pat]
 *     [--warmup 3000] [--requests 3000] [--out <dir>]
 *
 * Cases: `bare` (no interceptor, no Authorization header: the bench's baseline),
 * `bare-header` (no interceptor, the JWT's header sent all the same: what carrying the
 * header costs without checking it), `jwt` (the interceptor, an access token issued after
 * the watch came up: checked offline) and `pat` (the interceptor, a PAT answered from the
 * warm cache). Tessera is an in-memory router inside the served process (WatchRevocations up,
 * VerifyCredential VALID), so only the downstream's work is counted. h2load drives the
 * server (2 connections × 10 streams); the counters are zeroed after the warm-up and read
 * after the measured requests (callgrind_control), all threads of the process included.
 *
 * What runs under valgrind is bench/downstream-instructions-child.ts, bundled (it imports
 * nothing of the project but the bundle of the measured checkout).
 */
import { execFileSync, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { ensureDevCertificates } from "../src/certs/dev-ca.js";
import { runH2load } from "./h2load.js";
import { startServerProcess } from "./processes.js";

const { values: flags } = parseArgs({
  options: {
    root: { type: "string" },
    cases: { type: "string", default: "bare,bare-header,jwt,pat" },
    warmup: { type: "string", default: "3000" },
    requests: { type: "string", default: "3000" },
    out: { type: "string" },
  },
});

await parent();

async function parent(): Promise<void> {
  if (!flags.root) throw new Error("--root <checkout> is required");
  const root = resolve(flags.root);
  const work = flags.out ? resolve(flags.out) : mkdtempSync(join(tmpdir(), "tessera-downstream-"));
  mkdirSync(work, { recursive: true });
  const bin = (name: string) => join(import.meta.dirname, "..", "node_modules", ".bin", name);
  // The checkout's example service and SDK, one ESM file.
  const entry = join(work, "sdk-entry.ts");
  writeFileSync(
    entry,
    [
      `export * from ${JSON.stringify(join(root, "src/sdk/server/index.ts"))};`,
      `export { startWorkflowServer } from ${JSON.stringify(join(root, "examples/workflows/service.ts"))};`,
      `export { VerificationService, VerificationCode, VerifiedPrincipalKind } from ${JSON.stringify(join(root, "gen/tessera/v1/verification_service_pb.ts"))};`,
      `export { createRouterTransport } from "@connectrpc/connect";`,
    ].join("\n"),
  );
  const sdk = join(work, "sdk.mjs");
  const esbuild = (input: string, output: string, cwd?: string) =>
    execFileSync(
      bin("esbuild"),
      [input, "--bundle", "--platform=node", "--format=esm", `--outfile=${output}`, "--log-level=warning"],
      {
        stdio: "inherit",
        ...(cwd ? { cwd, env: { ...process.env, NODE_PATH: join(cwd, "node_modules") } } : {}),
      },
    );
  esbuild(entry, sdk, root);
  const self = join(work, "downstream-instructions-child.mjs");
  esbuild(join(import.meta.dirname, "downstream-instructions-child.ts"), self);
  const certDir = join(work, "certs");
  await ensureDevCertificates(certDir);
  const body = join(work, "body.json");
  writeFileSync(body, "{}");

  const cases = flags.cases.split(",");
  const modes = [
    ...(cases.some((c) => c.startsWith("bare")) ? ["bare"] : []),
    ...(cases.some((c) => !c.startsWith("bare")) ? ["tessera"] : []),
  ];
  for (const mode of modes) {
    let tokens: { jwt: string; pat: string } = { jwt: "", pat: "" };
    const server = await startServerProcess({
      name: `downstream-${mode}`,
      command: "valgrind",
      args: [
        "--tool=callgrind",
        `--callgrind-out-file=${join(work, "callgrind.%p")}`,
        process.execPath,
        self,
        sdk,
        mode,
        certDir,
      ],
      cwd: work,
      env: process.env,
      timeoutMs: 10 * 60_000,
      ready: (line) => {
        if (!line.startsWith("{")) return null;
        const m = JSON.parse(line) as { listening?: number; jwt: string; pat: string };
        if (m.listening === undefined) return null;
        tokens = { jwt: m.jwt, pat: m.pat };
        return `https://127.0.0.1:${m.listening}`;
      },
    });
    try {
      for (const c of cases.filter((c) => (mode === "bare") === c.startsWith("bare"))) {
        const token = c === "pat" ? tokens.pat : tokens.jwt;
        const shape = {
          url: `${server.url}/workflows.v1.WorkflowService/ListWorkflows`,
          bodyFile: body,
          workDir: work,
          connections: 2,
          streams: 10,
          headers: {
            "content-type": "application/json",
            ...(c === "bare" ? {} : { authorization: `Bearer ${token}` }),
          },
          expectStatus: 200,
        };
        await runH2load({ ...shape, requests: Number(flags.warmup) });
        execFileSync("callgrind_control", ["-z", String(server.pid)], { stdio: "ignore" });
        const load = await runH2load({ ...shape, requests: Number(flags.requests) });
        execFileSync("callgrind_control", ["-d", String(server.pid)], { stdio: "ignore" });
        const dumpOf = (f: string) => Number(f.split(".").pop());
        const dumps = readdirSync(work)
          .filter((f) => f.startsWith(`callgrind.${server.pid}.`))
          .sort((a, b) => dumpOf(a) - dumpOf(b));
        const text = readFileSync(join(work, dumps.at(-1)!), "utf8");
        const m = /^(?:totals|summary):\s+(\d+)/m.exec(text);
        if (!m) throw new Error("no totals in the callgrind dump");
        process.stdout.write(
          `${JSON.stringify({
            root,
            case: c,
            requests: Number(flags.requests),
            errors: load.errors,
            instructionsPerRequest: Math.round(Number(m[1]) / Number(flags.requests)),
          })}\n`,
        );
      }
    } finally {
      await server.stop();
      spawnSync("sh", ["-c", `rm -f ${join(work, "callgrind.*")}`]);
    }
  }
}
