import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type CliResult, runCli } from "./cli-helpers.js";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer } from "./helpers.js";

interface ListedEvent {
  id: string;
  time: string;
  action: string;
  outcome: string;
  reason: string;
  actorKind: string;
  actorId: string;
  targetId: string;
  requestId: string;
}

/** `tessera audit list` after the README's walkthrough: log in, create a token, revoke it. */
describe("tessera audit list", () => {
  let ts: TestServer;
  let env: Record<string, string>;
  let tokenId: string;
  const tessera = (args: string[], input = "") => runCli(args, env, input);
  const json = <T>(r: CliResult): T => {
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as T;
  };

  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    env = {
      HOME: mkdtempSync(join(tmpdir(), "tessera-cli-audit-")),
      TESSERA_SERVER: `127.0.0.1:${ts.server.port}`,
      TESSERA_CERT_FOLDER: ts.certs.clientDir,
    };
    const login = await tessera(["login", "-u", "admin", "--password-stdin"], ADMIN_PASSWORD);
    expect(login.code, login.stderr).toBe(0);
    tokenId = json<{ id: string }>(
      await tessera(["token", "create", "--name", "CI", "--scopes", "cluster:read", "--output", "json"]),
    ).id;
    expect((await tessera(["token", "revoke", tokenId])).code).toBe(0);
    // Events are written in batches (every second); the walkthrough's are all in now.
    await ts.app.audit.flush();
  });
  afterAll(async () => {
    await ts.close();
  });

  it("shows the walkthrough's events, newest first, as JSON", async () => {
    const { events } = json<{ events: ListedEvent[] }>(await tessera(["audit", "list", "--output", "json"]));
    expect(events.slice(0, 3).map((e) => [e.action, e.outcome])).toEqual([
      ["tessera.v1.TokenService/RevokePersonalAccessToken", "success"],
      ["tessera.v1.TokenService/CreatePersonalAccessToken", "success"],
      ["tessera.v1.UserService/Login", "success"],
    ]);
    expect(events[0]!.targetId).toBe(tokenId);
    expect(events[0]!.actorKind).toBe("user");
    expect(new Set(events.slice(0, 3).map((e) => e.actorId)).size).toBe(1);
    // Nothing secret in the log: no token, no password.
    expect(JSON.stringify(events)).not.toMatch(/tsr_pat_|admin-password/);
  });

  it("filters by action, outcome, target and time, and prints a table", async () => {
    const revoked = json<{ events: ListedEvent[] }>(
      await tessera(["audit", "list", "--target", tokenId, "--since", "1h", "--output", "json"]),
    ).events;
    // The token's whole history, its creation included (the record names the created id).
    expect(revoked.map((e) => e.action)).toEqual([
      "tessera.v1.TokenService/RevokePersonalAccessToken",
      "tessera.v1.TokenService/CreatePersonalAccessToken",
    ]);
    const logins = json<{ events: ListedEvent[] }>(
      await tessera([
        "audit",
        "list",
        "--action",
        "UserService/Login",
        "--outcome",
        "success",
        "--output",
        "json",
      ]),
    ).events;
    expect(logins.length).toBe(1);
    expect(
      json<{ events: ListedEvent[] }>(await tessera(["audit", "list", "--until", "1h", "--output", "json"]))
        .events,
    ).toEqual([]);
    const table = await tessera(["audit", "list", "--limit", "2"]);
    expect(table.code, table.stderr).toBe(0);
    const lines = table.stdout.trim().split("\n");
    expect(lines[0]).toMatch(/^TIME\s+ACTION\s+OUTCOME\s+REASON\s+ACTOR\s+TARGET\s+REQUEST$/);
    expect(lines[1]).toMatch(
      new RegExp(`TokenService/RevokePersonalAccessToken\\s+success\\s+-\\s+user:\\S+\\s+${tokenId}`),
    );
    expect(lines).toHaveLength(3);
    expect(table.stderr).toMatch(/more events/);
    const bad = await tessera(["audit", "list", "--outcome", "maybe"]);
    expect(bad.code).toBe(2);
  });
});
