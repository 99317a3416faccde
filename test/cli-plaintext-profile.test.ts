import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readCredentialsFile } from "../src/sdk/credentials.js";
import { runCli } from "./cli-helpers.js";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer } from "./helpers.js";

/**
 * `tessera login --server http://host:port` (a development server started with
 * insecurePlaintext) stores a profile whose session the next commands use without --server:
 * the profile names the server with its scheme, or it would name a TLS server at that address.
 */
describe("a session opened on a plaintext server", { timeout: 120_000 }, () => {
  let ts: TestServer;
  let env: Record<string, string>;

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { server: { insecurePlaintext: true } });
    env = { HOME: mkdtempSync(join(tmpdir(), "tessera-cli-plain-")) };
  });

  afterAll(async () => {
    await ts?.close();
  });

  it("is kept with the server's scheme and serves whoami and logout without --server", async () => {
    const address = `http://127.0.0.1:${ts.server.port}`;
    const login = await runCli(
      ["--server", address, "login", "-u", "admin", "--password-stdin"],
      env,
      ADMIN_PASSWORD,
    );
    expect(login.code, login.stderr).toBe(0);
    expect(readCredentialsFile(join(env.HOME!, ".tessera", "credentials")).default?.server).toBe(address);
    const whoami = await runCli(["whoami"], env);
    expect(whoami.code, whoami.stderr).toBe(0);
    expect(whoami.stdout).toContain("admin");
    const logout = await runCli(["--output", "json", "logout"], env);
    expect(logout.code, logout.stderr).toBe(0);
    expect(JSON.parse(logout.stdout)).toMatchObject({ loggedOut: true, serverSessionEnded: true });
  });
});
