import { join } from "node:path";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { VerificationCode, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import type { App } from "../../src/app.js";
import { createTesseraAuth, type TesseraAuth } from "../../src/sdk/server/index.js";
import type { NotificationHandler } from "../../src/storage/pg-notify.js";
import { DbProxy } from "../db-proxy.js";
import {
  clientFor,
  dropSchema,
  sharedInstances,
  startTestServer,
  type TestServer,
  withHeaders,
} from "../helpers.js";
import { adminLogin, short, verifierMachine } from "../machine-fixtures.js";
import { Watcher } from "../watch-fixtures.js";

/**
 * VerifyCredential answers never lag a revocation the caller has already heard of. A
 * downstream service follows WatchRevocations through instance A and verifies through
 * instance B (one address, a load balancer). A personal access token is revoked; A's feed
 * delivers the event and the SDK drops the answer it kept; the next call is verified by B,
 * whose own notification of the revocation is still on the way (held here: B's listening
 * session delivers nothing to B's caches until released). Before, B answered VALID from the
 * row it kept and the SDK cached that: a revoked token accepted until the next event. Now the
 * SDK sends the cursor of the last events it applied (`min_revocation_position`), and B,
 * behind it, reads the feed's newest id and empties its cache before answering: REVOKED.
 * Over TLS, two instances on one PostgreSQL schema (SQLite, one instance, below).
 */

/** A barrier that outlasts the test: the revocation's write waits for B, whose notifications are held. */
const config = { database: { barrierTimeoutMs: 30_000 } };

/** Hold every notification B's listening session receives until the returned function is called. */
function holdNotifications(app: App): () => void {
  const handlers = (app.notifier as unknown as { handlers: Map<string, Set<NotificationHandler>> }).handlers;
  const queue: (() => void)[] = [];
  let holding = true;
  const restore: (() => void)[] = [];
  for (const set of handlers.values()) {
    const fns = [...set];
    const gate: NotificationHandler = (payload, pid) => {
      const deliver = () => {
        for (const fn of fns) fn(payload, pid);
      };
      if (holding) queue.push(deliver);
      else deliver();
    };
    set.clear();
    set.add(gate);
    restore.push(() => {
      set.delete(gate);
      for (const fn of fns) set.add(fn);
    });
  }
  return () => {
    holding = false;
    for (const deliver of queue.splice(0)) deliver();
    for (const fn of restore) fn();
  };
}

/** Unary calls (VerifyCredential) to `unary`, streams (WatchRevocations) to `stream`: a load balancer's choice. */
function split(unary: Transport, stream: Transport): Transport {
  return { unary: unary.unary.bind(unary), stream: stream.stream.bind(stream) };
}

describe("a downstream watching one instance and verifying through another (postgres)", () => {
  const servers = sharedInstances("postgres", [config, config]);
  let a: TestServer;
  let b: TestServer;
  let root: string;
  let verifier: string;
  const cores: TesseraAuth[] = [];
  const releases: (() => void)[] = [];

  beforeAll(async () => {
    [a, b] = servers as [TestServer, TestServer];
    root = await adminLogin(a.connect());
    verifier = await verifierMachine(a.connect(), root);
  });
  afterEach(() => {
    for (const release of releases.splice(0)) release();
    for (const c of cores.splice(0)) c.close();
  });
  afterAll(() => {
    for (const c of cores.splice(0)) c.close();
  });

  async function pat(): Promise<{ id: string; token: string }> {
    const res = await clientFor(TokenService, a.connect(), root).createPersonalAccessToken({
      name: `behind-${short()}`,
    });
    return { id: res.id, token: res.token };
  }

  it("refuses a personal access token whose revocation the watch delivered before B heard of it, and caches nothing", async () => {
    const { id, token } = await pat();
    const auth = createTesseraAuth({
      server: a.server.url,
      caFile: join(a.certs.dir, "ca.crt"),
      credential: verifier,
      transport: split(b.connect(), a.connect()),
    });
    cores.push(auth);
    expect(await auth.ready(10_000)).toBe(true);
    // Verified by B: its state cache keeps the token's row, the SDK the answer.
    expect((await auth.authenticate(`Bearer ${token}`)).kind).toBe("user");

    const release = holdNotifications(b.app);
    releases.push(release);
    const events = auth.stats().watch!.events;
    // Revoked through A; its write waits for B's acknowledgement (held), its event does not.
    const revoked = clientFor(TokenService, a.connect(), root).revokePersonalAccessToken({ id });
    await expect.poll(() => auth.stats().watch!.events).toBeGreaterThan(events);
    expect(auth.stats().cacheSize).toBe(0);

    const calls = auth.stats().verifyCalls;
    await expect(auth.authenticate(`Bearer ${token}`)).rejects.toMatchObject({ reason: "TOKEN_REVOKED" });
    expect(auth.stats().verifyCalls).toBe(calls + 1);
    // Nothing positive was kept: the next call is asked again, and refused again.
    await expect(auth.authenticate(`Bearer ${token}`)).rejects.toMatchObject({ reason: "TOKEN_REVOKED" });
    expect(auth.stats().cacheSize).toBe(0);

    release();
    await revoked;
  });

  it("answers VerifyCredential on B as of the cursor a watcher of A was sent, B's notifications held", async () => {
    const { id, token } = await pat();
    const onB = createClient(
      VerificationService,
      withHeaders(b.connect(), { authorization: `Bearer ${verifier}` }),
    );
    expect((await onB.verifyCredential({ credential: token })).code).toBe(VerificationCode.VALID);
    const watcher = Watcher.open(a.connect(), verifier);
    await watcher.first();

    const release = holdNotifications(b.app);
    releases.push(release);
    const revoked = clientFor(TokenService, a.connect(), root).revokePersonalAccessToken({ id });
    await watcher.until(() => watcher.events.some((e) => e.endsWith(`:${id}`)));
    const cursor = watcher.cursor;
    const answer = await onB.verifyCredential({ credential: token, minRevocationPosition: cursor });
    expect(VerificationCode[answer.code]).toBe("REVOKED");
    // The same cursor again: B has applied it, answered without reading the feed.
    expect(
      VerificationCode[
        (await onB.verifyCredential({ credential: token, minRevocationPosition: cursor })).code
      ],
    ).toBe("REVOKED");
    watcher.close();
    release();
    await revoked;
  });

  it("refuses a min_revocation_position this deployment did not issue as INVALID_ARGUMENT", async () => {
    const { token } = await pat();
    const onB = createClient(
      VerificationService,
      withHeaders(b.connect(), { authorization: `Bearer ${verifier}` }),
    );
    const err = await onB
      .verifyCredential({ credential: token, minRevocationPosition: "A".repeat(59) })
      .then(() => undefined, ConnectError.from);
    expect(err?.code).toBe(Code.InvalidArgument);
  });
});

describe("min_revocation_position on one SQLite instance", () => {
  const servers = sharedInstances("sqlite", [{}]);

  it("answers as of the cursor: VALID before the revocation, REVOKED after", async () => {
    const [one] = servers as [TestServer];
    const root = await adminLogin(one.connect());
    const verifier = await verifierMachine(one.connect(), root);
    const { id, token } = await clientFor(TokenService, one.connect(), root).createPersonalAccessToken({
      name: `one-${short()}`,
    });
    const v = createClient(
      VerificationService,
      withHeaders(one.connect(), { authorization: `Bearer ${verifier}` }),
    );
    const watcher = Watcher.open(one.connect(), verifier);
    await watcher.first();
    const before = watcher.cursor;
    expect((await v.verifyCredential({ credential: token, minRevocationPosition: before })).code).toBe(
      VerificationCode.VALID,
    );
    await clientFor(TokenService, one.connect(), root).revokePersonalAccessToken({ id });
    await watcher.until(() => watcher.events.some((e) => e.endsWith(`:${id}`)));
    const answer = await v.verifyCredential({ credential: token, minRevocationPosition: watcher.cursor });
    expect(VerificationCode[answer.code]).toBe("REVOKED");
    watcher.close();
  });
});

describe("an instance behind the caller's position whose database stops answering (postgres)", () => {
  const schema = `t_${Date.now().toString(36)}_behind`;
  let proxy: DbProxy;
  let s: TestServer;

  beforeAll(async () => {
    proxy = await DbProxy.start();
    s = await startTestServer({ name: "postgres", url: () => proxy.url(schema) });
  }, 120_000);
  afterAll(async () => {
    proxy?.restore();
    await s?.close();
    await proxy?.close();
    await dropSchema(`postgres://postgres@127.0.0.1:5432/test?schema=${schema}`);
  });

  it("answers Unavailable with Retry-After within its bound, never the answer it kept", async () => {
    const root = await adminLogin(s.connect());
    const verifier = await verifierMachine(s.connect(), root);
    const { token } = await clientFor(TokenService, s.connect(), root).createPersonalAccessToken({
      name: `frozen-${short()}`,
    });
    const v = createClient(
      VerificationService,
      withHeaders(s.connect(), { authorization: `Bearer ${verifier}` }),
    );
    expect((await v.verifyCredential({ credential: token })).code).toBe(VerificationCode.VALID);
    // A position past what this instance has read: a revocation another instance's feed
    // delivered (committed, its notification not yet here).
    const feed = s.app.revocations;
    const ahead = feed.cursors.seal({
      id: feed.position + 1,
      kind: "credential",
      subjectId: "ahead",
      tenantId: "ahead",
      occurredAt: Date.now(),
    });
    proxy.freeze();
    const started = performance.now();
    const err = await v
      .verifyCredential({ credential: token, minRevocationPosition: ahead }, { timeoutMs: 10_000 })
      .then(() => undefined, ConnectError.from);
    expect(err?.code).toBe(Code.Unavailable);
    expect(err?.metadata.get("retry-after")).toBe("1");
    expect(performance.now() - started).toBeLessThan(5_000);
    proxy.restore();
  }, 60_000);
});
