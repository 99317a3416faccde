import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { fetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { type MetricsServer, startMetricsServer } from "../src/metrics.js";
import { DATABASES, startTestServer, type TestServer, withHeaders } from "./helpers.js";

/** The value of one `tessera_auth_attempts_total` failure sample of `credential`, 0 when absent. */
function failures(text: string, credential: string): number {
  const prefix = `tessera_auth_attempts_total{credential="${credential}",outcome="failure",reason="TOKEN_INVALID"} `;
  const line = text.split("\n").find((l) => l.startsWith(prefix));
  return line === undefined ? 0 : Number(line.slice(prefix.length));
}

/**
 * The credential kind a refused bearer token is counted under, with nested configured
 * prefixes (a PAT's `acme_`, an API key's `acme_key_`): the longest prefix decides, as it
 * does for the verifiers, so an API key is not counted as a PAT. Through a real server over
 * TLS and its /metrics.
 */
describe.each(DATABASES)("metrics labels of nested token prefixes on $name", (db) => {
  let ts: TestServer;
  let metrics: MetricsServer;

  beforeAll(async () => {
    ts = await startTestServer(db, {
      auth: { tokens: { patPrefix: "acme_", apiKeyPrefix: "acme_key_", machinePrefix: "acme_key_m_" } },
      metrics: { listen: "127.0.0.1:0" },
    });
    metrics = await startMetricsServer(ts.app.metrics!, "127.0.0.1:0", ts.app.logger);
  }, 120_000);

  afterAll(async () => {
    await metrics?.close();
    await ts?.close();
  });

  const scrape = async () => (await fetch(metrics.url)).text();

  async function refused(token: string): Promise<void> {
    const users = createClient(UserService, withHeaders(ts.connect(), { authorization: `Bearer ${token}` }));
    const err = await users.getCurrentUser({}).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ConnectError);
    expect((err as ConnectError).code).toBe(Code.Unauthenticated);
  }

  it("counts a refused token under the kind of the longest prefix it starts with", async () => {
    const before = await scrape();
    await refused("acme_key_m_notatoken");
    await refused("acme_key_notatoken");
    await refused("acme_key_notatoken2");
    await refused("acme_notatoken");
    const after = await scrape();
    expect(failures(after, "machine_token") - failures(before, "machine_token")).toBe(1);
    expect(failures(after, "api_key") - failures(before, "api_key")).toBe(2);
    expect(failures(after, "pat") - failures(before, "pat")).toBe(1);
  });
});
