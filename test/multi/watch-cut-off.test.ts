import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { DbProxy } from "../db-proxy.js";
import { clientFor, dropSchema, type TestDatabase } from "../helpers.js";
import { short } from "../machine-fixtures.js";
import { Watcher } from "../watch-fixtures.js";
import { type Instances, startInstances, stopInstances } from "./fixtures.js";

/**
 * A WatchRevocations stream served by an instance cut off from PostgreSQL without a reset
 * (packets dropped): the revocations committed through another instance never reach it, so
 * its stream must stop vouching for its cursor as soon as it can no longer tell, and end,
 * so that the client's cache of VerifyCredential answers (which it keeps while the stream
 * is up) is emptied. Before, the stream stayed open and silent until its next heartbeat
 * was due (10 s), and the feed, taking the keepalive's timeout for "every commit was read
 * until now", could even send that heartbeat with a cursor before the missed revocation.
 */

const BARRIER_MS = 400;
const schema = `t_${Date.now().toString(36)}_wcut`;
let proxy: DbProxy;
let m: Instances;

beforeAll(async () => {
  proxy = await DbProxy.start();
  const viaProxy = proxy.url(schema);
  const direct: TestDatabase = {
    name: "postgres",
    url: () => viaProxy.replace(`127.0.0.1:${proxy.port}`, "127.0.0.1:5432"),
  };
  // A (in this process) reaches PostgreSQL directly; B, a `tessera serve`, through the proxy.
  m = await startInstances(direct, { database: { barrierTimeoutMs: BARRIER_MS } }, viaProxy, {
    TESSERA_STATE_BARRIER_TIMEOUT_MS: String(BARRIER_MS),
    TESSERA_WATCH_HEARTBEAT_SECONDS: "10",
  });
}, 120_000);

afterAll(async () => {
  proxy?.restore();
  await stopInstances(m);
  await proxy?.close();
  await dropSchema(`postgres://postgres@127.0.0.1:5432/test?schema=${schema}`);
});

describe("WatchRevocations on an instance cut off from PostgreSQL without a reset", () => {
  it("ends the stream (Unavailable) within the barrier's bound and a keepalive, never heartbeating past a revocation it missed", async () => {
    const pat = await clientFor(TokenService, m.ta, m.root).createPersonalAccessToken({
      name: `w-${short()}`,
    });
    const onB = Watcher.open(m.tb, m.verifier);
    await onB.first();
    // The cut comes 6.5 s into the heartbeat period: B's keepalive gives up (2 s) before the
    // next heartbeat is due (10 s), while the catch-up read it starts then still waits.
    await new Promise((r) => setTimeout(r, 6_500));
    const heard = onB.messages.length;
    proxy.freeze();
    const revokedAt = performance.now();
    await clientFor(TokenService, m.ta, m.root).revokePersonalAccessToken({ id: pat.id });
    const returned = Date.now();
    // A's write returned after giving up on B's acknowledgement: from then on, B's stream may
    // not vouch for a cursor (no heartbeat), and it ends soon after, so the client's cache goes.
    const ended = await onB.end(8_000);
    const endedAt = Date.now();
    console.log(`stream on B ended ${endedAt - returned} ms after the revocation on A returned`);
    proxy.restore();
    expect(onB.messages.slice(heard).filter((m) => m.at >= revokedAt)).toEqual([]);
    expect(ended).toBeInstanceOf(ConnectError);
    expect((ended as ConnectError).code).toBe(Code.Unavailable);
    // Within 3 s of the last answer of B's listening session (before the freeze), with slack for load.
    expect(endedAt - returned).toBeLessThan(5_000);
  }, 60_000);
});
