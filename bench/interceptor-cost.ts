/**
 * Issue 22's downstream interceptor, per call, without a server around it: the Connect
 * interceptor of the SDK (src/sdk/server/) admitting ListWorkflows of the example service,
 * counted in instructions by valgrind's callgrind (the shared VM's timings are too noisy
 * for a few per cent). Tessera is an in-memory router transport whose WatchRevocations
 * stays up and whose VerifyCredential answers VALID; the JWKS is a local Ed25519 key.
 *
 *   npx tsx bench/interceptor-cost.ts --root <checkout> [--calls 20000,60000] [--out <dir>]
 *
 * Cases: `none` (the same loop through a pass-through interceptor: the harness, with the
 * JWT's header), `none-pat` (the harness with the PAT's header),
 * `jwt-offline` (an access token issued after the watch came up: admitted offline),
 * `jwt-covered` (issued before it: Tessera's answer, cached) and `pat` (from the warm cache).
 * Each case runs in its own `node` under callgrind twice, with two numbers of calls; the
 * difference divided by the difference in calls is the steady-state cost of one call (start-up,
 * imports and JIT warm-up cancel out). The checkout's SDK is bundled with esbuild first.
 *
 * The child mode (`--child <case> <calls>`) is what runs under valgrind.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { generateKeyPairSync, sign } from "node:crypto";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";

const { values: flags, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    root: { type: "string" },
    calls: { type: "string", default: "20000,60000" },
    cases: { type: "string", default: "none,jwt-offline,jwt-covered,pat" },
    out: { type: "string" },
    child: { type: "boolean", default: false },
    sdk: { type: "string" },
  },
});

const b64 = (x: object) => Buffer.from(JSON.stringify(x)).toString("base64url");

if (flags.child) await child(positionals[0]!, Number(positionals[1]), flags.sdk!);
else parent();

function parent(): void {
  if (!flags.root) throw new Error("--root <checkout> is required");
  const root = resolve(flags.root);
  const work = flags.out ? resolve(flags.out) : mkdtempSync(join(tmpdir(), "tessera-interceptor-"));
  mkdirSync(work, { recursive: true });
  // The checkout's SDK (interceptor, core, generated code of the example), one ESM file.
  const entry = join(work, "sdk-entry.ts");
  writeFileSync(
    entry,
    [
      `export * from ${JSON.stringify(join(root, "src/sdk/server/index.ts"))};`,
      `export { WorkflowService } from ${JSON.stringify(join(root, "examples/workflows/gen/workflows/v1/workflow_service_pb.ts"))};`,
      `export { VerificationService, VerificationCode, VerifiedPrincipalKind } from ${JSON.stringify(join(root, "gen/tessera/v1/verification_service_pb.ts"))};`,
      `export { createRouterTransport, createContextValues } from "@connectrpc/connect";`,
    ].join("\n"),
  );
  const sdk = join(work, "sdk.mjs");
  execFileSync(
    join(import.meta.dirname, "..", "node_modules", ".bin", "esbuild"),
    [entry, "--bundle", "--platform=node", "--format=esm", `--outfile=${sdk}`, "--log-level=warning"],
    // Bare imports of the entry (in `work`) resolve in the checkout's node_modules.
    { stdio: "inherit", cwd: root, env: { ...process.env, NODE_PATH: join(root, "node_modules") } },
  );
  const self = join(work, "interceptor-cost.mjs");
  execFileSync(
    join(import.meta.dirname, "..", "node_modules", ".bin", "esbuild"),
    [
      import.meta.filename,
      "--bundle",
      "--platform=node",
      "--format=esm",
      `--outfile=${self}`,
      "--log-level=warning",
    ],
    { stdio: "inherit" },
  );
  const [low, high] = flags.calls.split(",").map(Number) as [number, number];
  for (const c of flags.cases.split(",")) {
    const count = (n: number) => {
      const r = spawnSync(
        "valgrind",
        [
          "--tool=callgrind",
          "--callgrind-out-file=/dev/null",
          process.execPath,
          self,
          "--child",
          "--sdk",
          sdk,
          c,
          String(n),
        ],
        { encoding: "utf8" },
      );
      const m = /Collected : (\d+)/.exec(r.stderr);
      if (r.status !== 0 || !m) throw new Error(`${c} ${n}: ${r.stderr.slice(-2000)}`);
      return Number(m[1]);
    };
    const a = count(low);
    const b = count(high);
    process.stdout.write(
      `${JSON.stringify({ case: c, calls: [low, high], instructions: [a, b], perCall: Math.round((b - a) / (high - low)) })}\n`,
    );
  }
}

async function child(kind: string, calls: number, sdkPath: string): Promise<void> {
  // biome-ignore lint/suspicious/noExplicitAny: the bundle of whichever checkout is measured
  const sdk: any = await import(sdkPath);
  const { privateKey, publicKey } = generateKeyPairSync("ed25519");
  const jwk = { ...publicKey.export({ format: "jwk" }), kid: "k1", alg: "EdDSA", use: "sig" };
  const tenant = "00000000-0000-0000-0000-00000000000a";
  const user = "00000000-0000-0000-0000-00000000000b";
  const signed = (iat: number) => {
    const input = `${b64({ alg: "EdDSA", typ: "at+jwt", kid: "k1" })}.${b64({
      iss: "tessera",
      aud: "tessera",
      sub: user,
      tid: tenant,
      scope: "workflows:read workflows:run",
      pk: "user",
      iat,
      exp: iat + 3600,
      jti: "00000000-0000-0000-0000-00000000000c",
      sid: "00000000-0000-0000-0000-00000000000d",
    })}`;
    return `${input}.${sign(null, Buffer.from(input), privateKey).toString("base64url")}`;
  };
  let clock = Date.now();
  const covered = signed(Math.floor(clock / 1000) - 60);
  const transport = sdk.createRouterTransport(
    // biome-ignore lint/suspicious/noExplicitAny: the router of the bundle
    (router: any) =>
      router.service(sdk.VerificationService, {
        verifyCredential: () => ({
          valid: true,
          code: sdk.VerificationCode.VALID,
          principalId: user,
          principalKind: sdk.VerifiedPrincipalKind.USER,
          tenantId: tenant,
          scopes: ["workflows:read"],
          credentialKind: "pat",
          credentialId: "00000000-0000-0000-0000-00000000000e",
        }),
        async *watchRevocations() {
          yield { cursor: "c", heartbeatSeconds: 86_400 };
          await new Promise(() => undefined);
        },
      }),
  );
  const auth = sdk.createTesseraAuth({
    server: "https://tessera.invalid",
    transport,
    fetchJson: async () => ({ keys: [jwk] }),
    now: () => clock,
  });
  if (!(await auth.ready(5000))) throw new Error("the watch did not come up");
  clock += 120_000; // past the watch's coverage start (30 s of skew)
  const offline = signed(Math.floor(clock / 1000));
  const token = {
    "jwt-offline": offline,
    "jwt-covered": covered,
    pat: "tsr_pat_bench_credential",
    none: offline,
    "none-pat": "tsr_pat_bench_credential",
  }[kind];
  if (token === undefined) throw new Error(`unknown case ${kind}`);
  const interceptor =
    // biome-ignore lint/suspicious/noExplicitAny: a pass-through of the same shape
    kind.startsWith("none") ? (next: any) => (req: any) => next(req) : sdk.createTesseraAuthInterceptor(auth);
  const response = { message: {} };
  const call = interceptor(async () => response);
  const method = sdk.WorkflowService.method.listWorkflows;
  for (let i = 0; i < calls; i++) {
    const req = {
      method,
      header: new Headers({ authorization: `Bearer ${token}`, "content-type": "application/json" }),
      contextValues: sdk.createContextValues(),
    };
    await call(req);
  }
  const stats = auth.stats();
  const expected = { "jwt-offline": "offlineJwts", "jwt-covered": "cacheHits", pat: "cacheHits" }[kind];
  if (expected && stats[expected] < calls - 1)
    throw new Error(`not the path meant: ${JSON.stringify(stats)}`);
  auth.close();
  process.exit(0);
}
