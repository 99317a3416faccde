/**
 * The served side of bench/downstream-instructions.ts (run under valgrind, bundled): the
 * example service of the measured checkout, without the interceptor (`bare`) or with it
 * (`tessera`, Tessera an in-memory router: WatchRevocations up, VerifyCredential VALID).
 * Announces `{"listening":port,"jwt":…,"pat":…}` on stdout.
 *
 *   node downstream-instructions-child.mjs <sdk bundle> bare|tessera <certDir>
 */
import { generateKeyPairSync, sign } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const b64 = (x: object) => Buffer.from(JSON.stringify(x)).toString("base64url");
const [sdkPath, mode, certDir] = process.argv.slice(2) as [string, string, string];
await child(mode, certDir, sdkPath);

async function child(mode: string, certDir: string, sdkPath: string): Promise<void> {
  // biome-ignore lint/suspicious/noExplicitAny: the bundle of whichever checkout is measured
  const sdk: any = await import(sdkPath);
  const tenant = "00000000-0000-0000-0000-00000000000a";
  const user = "00000000-0000-0000-0000-00000000000b";
  const tls = {
    cert: readFileSync(join(certDir, "server.crt")),
    key: readFileSync(join(certDir, "server.key")),
  };
  if (mode === "bare") {
    const server = await sdk.startWorkflowServer({ ...tls, tessera: false });
    process.stdout.write(`${JSON.stringify({ listening: server.port, jwt: signedToken(), pat: "" })}\n`);
    return;
  }
  const { privateKey, publicKey } = generateKeyPairSync("ed25519");
  const jwk = { ...publicKey.export({ format: "jwk" }), kid: "k1", alg: "EdDSA", use: "sig" };
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
  // The interceptor checks offline only tokens issued after its watch came up (plus 30 s of
  // skew): its clock is moved on once the watch is up, and the token issued by that clock.
  let shift = 0;
  const auth = sdk.createTesseraAuth({
    server: "https://tessera.invalid",
    transport,
    fetchJson: async () => ({ keys: [jwk] }),
    now: () => Date.now() + shift,
  });
  if (!(await auth.ready(60_000))) throw new Error("the watch did not come up");
  shift = 120_000;
  const server = await sdk.startWorkflowServer({ ...tls, tessera: auth });
  const jwt = signedToken(privateKey, Math.floor((Date.now() + shift) / 1000));
  process.stdout.write(
    `${JSON.stringify({ listening: server.port, jwt, pat: "tsr_pat_bench_credential_0123456789abcdefghi" })}\n`,
  );
  // biome-ignore lint/suspicious/noExplicitAny: the signing key of this run
  function signedToken(key?: any, iat = Math.floor(Date.now() / 1000)): string {
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
    const k = key ?? generateKeyPairSync("ed25519").privateKey;
    return `${input}.${sign(null, Buffer.from(input), k).toString("base64url")}`;
  }
}
