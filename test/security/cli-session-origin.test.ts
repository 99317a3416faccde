import { mkdtempSync, readFileSync } from "node:fs";
import { createSecureServer, type Http2SecureServer } from "node:http2";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { readCredentialsFile } from "../../src/sdk/credentials.js";
import { runCli } from "../cli-helpers.js";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer } from "../helpers.js";

/**
 * A `tessera login` session belongs to the server it was opened on. Pointed at another
 * server (`--server`, TESSERA_SERVER), the CLI must not hand that server the profile's
 * access token, nor its refresh token (which the client spends on TOKEN_EXPIRED, and which
 * `logout` sends to end the session). The other server here holds a certificate of the very
 * CA the profile trusts, and answers every call TOKEN_EXPIRED, as one harvesting refresh
 * tokens would.
 */
describe("the CLI keeps a profile's session to the profile's server", { timeout: 300_000 }, () => {
  let ts: TestServer;
  let other: Http2SecureServer;
  let otherAddress: string;
  let env: Record<string, string>;
  /** Every request the other server received: its headers and body, as text. */
  const seen: string[] = [];

  /** Every method of a service fails as an expired access token does on Tessera. */
  const expired = new Proxy(
    {},
    {
      get: () => () => {
        throw new ConnectError("token expired", Code.Unauthenticated, undefined, [
          { desc: ErrorInfoSchema, value: { reason: "TOKEN_EXPIRED", domain: "tessera.dev" } },
        ]);
      },
    },
  );

  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    const adapter = connectNodeAdapter({
      routes: (router: ConnectRouter) => {
        router.service(UserService, expired as never);
        router.service(TokenService, expired as never);
      },
    });
    other = createSecureServer(
      {
        allowHTTP1: true,
        cert: readFileSync(join(ts.certs.dir, "server.crt")),
        key: readFileSync(join(ts.certs.dir, "server.key")),
      },
      (req, res) => {
        const chunks: Buffer[] = [];
        // The adapter reads the body itself: a copy of each chunk is kept as it passes.
        req.on("data", (c: Buffer) => chunks.push(Buffer.from(c)));
        req.on("end", () =>
          seen.push(`${JSON.stringify(req.headers)}\n${Buffer.concat(chunks).toString("latin1")}`),
        );
        adapter(req, res);
      },
    );
    await new Promise<void>((resolve) => other.listen(0, "127.0.0.1", resolve));
    otherAddress = `127.0.0.1:${(other.address() as AddressInfo).port}`;
    env = {
      HOME: mkdtempSync(join(tmpdir(), "tessera-cli-origin-")),
      TESSERA_CERT_FOLDER: ts.certs.clientDir,
    };
    const login = await runCli(
      ["--server", `127.0.0.1:${ts.server.port}`, "login", "-u", "admin", "--password-stdin"],
      env,
      ADMIN_PASSWORD,
    );
    expect(login.code, login.stderr).toBe(0);
  });
  afterAll(async () => {
    other?.close();
    await ts?.close();
  });

  const profile = () => readCredentialsFile(join(env.HOME!, ".tessera", "credentials")).default!;

  it("sends neither the access token nor the refresh token to a server given by --server or TESSERA_SERVER", async () => {
    const { token, refresh_token: refreshToken } = profile();
    expect(refreshToken).toMatch(/^tsr_rt_/);
    const runs = [
      await runCli(["--server", otherAddress, "token", "list"], env),
      await runCli(["whoami"], { ...env, TESSERA_SERVER: otherAddress }),
      await runCli(["--server", otherAddress, "logout"], env),
    ];
    for (const request of seen) {
      expect(request).not.toContain(token!);
      expect(request).not.toContain(refreshToken!);
    }
    for (const r of runs) {
      expect(r.code, r.stderr).not.toBe(0);
      expect(r.stderr).toContain(`logged in to 127.0.0.1:${ts.server.port}`);
    }
    // The session is untouched, and still good on its own server.
    expect(profile()).toMatchObject({ token, refresh_token: refreshToken });
    const own = await runCli(["whoami", "--output", "json"], env);
    expect(own.code, own.stderr).toBe(0);
    expect(JSON.parse(own.stdout)).toMatchObject({ username: "admin" });
  });
});
