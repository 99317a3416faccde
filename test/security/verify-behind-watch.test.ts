import { join } from "node:path";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { VerificationCode, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import type { App } from "../../src/app.js";
import { createTesseraAuth, type TesseraAuth } from "../../src/sdk/server/index.js";
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
import { holdNotifications, splitTransport, Watcher } from "../watch-fixtures.js";

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

/*
 * VerifyCredential's `min_revocation_position` when the feed's ids go back (a restore from a
 * backup, or failover to a replica that was behind): the ids are drawn again for other events,
 * so "the caller's position is at or below what this instance applied" no longer means the
 * caller's events are reflected here. Each cursor carries the mark of its event; an instance
 * that does not know the event at that id as the caller's catches up (and its feed looks), and
 * a feed that restarted empties the state cache. A cursor left above the feed's end by the
 * restore costs one read, not a flush of the state cache per call, and a credential of no shape
 * Tessera issues is answered MALFORMED before any catching up.
 * Two instances A and B on one PostgreSQL schema, over TLS; B's notifications held.
 */

/** As test/watch-revocations-restore.test.ts: the events after `backupAt` gone, the sequence back; `revoke` in the same commit. */
async function restore(app: App, backupAt: number, revoke: string[] = []): Promise<void> {
  await app.storage.em.fork().transactional(async (tx) => {
    await tx.execute("delete from revocation_events where id > ?", [backupAt]);
    await tx.execute("select setval(pg_get_serial_sequence('revocation_events', 'id'), ?, ?)", [
      Math.max(backupAt, 1),
      backupAt > 0,
    ]);
    for (const id of revoke)
      await tx.execute("update api_tokens set revoked_at = ? where id = ?", [new Date(), id]);
  });
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

  /** An SDK core watching A and verifying through B (a load balancer's choice), up. */
  async function watchingAVerifyingB(): Promise<TesseraAuth> {
    const auth = createTesseraAuth({
      server: a.server.url,
      caFile: join(a.certs.dir, "ca.crt"),
      credential: verifier,
      transport: splitTransport(b.connect(), a.connect()),
    });
    cores.push(auth);
    expect(await auth.ready(10_000)).toBe(true);
    return auth;
  }

  it("refuses a personal access token whose revocation the watch delivered before B heard of it, and caches nothing", async () => {
    const { id, token } = await pat();
    const auth = await watchingAVerifyingB();
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

  describe("after the feed's ids went back", () => {
    /** A PAT, and ten events after it that both instances have read; returns the newest id. */
    async function patAndHistory(): Promise<{ id: string; token: string; high: number }> {
      const tokens = clientFor(TokenService, a.connect(), root);
      const { id, token } = await tokens.createPersonalAccessToken({ name: `restored-${short()}` });
      for (let i = 0; i < 10; i++) {
        const t = await tokens.createPersonalAccessToken({ name: `event-${short()}` });
        await tokens.revokePersonalAccessToken({ id: t.id });
      }
      const high = a.app.revocations.position;
      await expect.poll(() => b.app.revocations.position, { timeout: 10_000 }).toBe(high);
      return { id, token, high };
    }

    const onB = () =>
      createClient(VerificationService, withHeaders(b.connect(), { authorization: `Bearer ${verifier}` }));

    async function cursorOfA(): Promise<string> {
      const watcher = Watcher.open(a.connect(), verifier);
      await watcher.first();
      const cursor = watcher.cursor;
      watcher.close();
      return cursor;
    }

    /** B's answer as of a cursor of A's, then B's notifications released and the restore awaited. */
    async function onBAsOfA(token: string, restored: Promise<void>): Promise<string> {
      const answer = await onB().verifyCredential({
        credential: token,
        minRevocationPosition: await cursorOfA(),
      });
      for (const release of releases.splice(0)) release();
      await restored;
      return VerificationCode[answer.code]!;
    }

    it("refuses a PAT revoked in the restore's commit on B, whose feed has not seen the restore, and so does the SDK", async () => {
      const pat = await patAndHistory();
      const auth = await watchingAVerifyingB();
      expect((await onB().verifyCredential({ credential: pat.token })).code).toBe(VerificationCode.VALID);
      expect((await auth.authenticate(`Bearer ${pat.token}`)).kind).toBe("user");

      releases.push(holdNotifications(b.app));
      const { resets, events } = auth.stats().watch!;
      const restored = restore(a.app, pat.high - 5, [pat.id]);
      // A's feed saw the restore: the SDK was answered reset (its cursor now names A's newest event).
      await expect
        .poll(() => auth.stats().watch!.resets + auth.stats().watch!.events, { timeout: 10_000 })
        .toBeGreaterThan(resets + events);
      // B's has not: it still claims the old newest id, above the SDK's cursor.
      expect(b.app.revocations.position).toBe(pat.high);
      const refused = await auth.authenticate(`Bearer ${pat.token}`).then(
        () => "admitted",
        (e: { reason?: string }) => e.reason,
      );
      expect(refused).toBe("TOKEN_REVOKED");
      expect(await onBAsOfA(pat.token, restored)).toBe("REVOKED");
    }, 60_000);

    it("refuses it on B whose feed saw the restore before any notification of its commit reached B", async () => {
      const pat = await patAndHistory();
      expect((await onB().verifyCredential({ credential: pat.token })).code).toBe(VerificationCode.VALID);
      releases.push(holdNotifications(b.app));
      const restored = restore(a.app, pat.high - 5, [pat.id]);
      await expect.poll(() => a.app.revocations.position, { timeout: 10_000 }).toBeLessThan(pat.high);
      // B's feed woken (as by a notification of an earlier change): it sees the ids went back.
      b.app.revocations.wake();
      await expect.poll(() => b.app.revocations.position, { timeout: 10_000 }).toBeLessThan(pat.high);
      expect(await onBAsOfA(pat.token, restored)).toBe("REVOKED");
    }, 60_000);

    it("costs one read for a cursor left past the feed's end by a restore, not a flush of the state cache per call", async () => {
      const pat = await patAndHistory();
      const before = await cursorOfA();
      const spare = await clientFor(TokenService, a.connect(), root).createPersonalAccessToken({
        name: `spare-${short()}`,
      });
      await restore(a.app, pat.high - 5, [spare.id]);
      await expect.poll(() => b.app.revocations.position, { timeout: 10_000 }).toBeLessThan(pat.high);
      const v = onB();
      const invalidations = () => b.app.sql.cacheStats().invalidations;
      const start = invalidations();
      for (let i = 0; i < 20; i++) {
        const answer = await v.verifyCredential({ credential: pat.token, minRevocationPosition: before });
        expect(VerificationCode[answer.code]).toBe("VALID");
      }
      expect(invalidations() - start).toBeLessThanOrEqual(1);
    }, 60_000);

    it("answers a credential of no shape Tessera issues MALFORMED without catching up with a cursor past the feed's end", async () => {
      const v = onB();
      const invalidations = () => b.app.sql.cacheStats().invalidations;
      const feed = b.app.revocations;
      const past = feed.cursors.seal({
        id: feed.position + 50,
        kind: "credential",
        subjectId: "past",
        tenantId: "past",
        occurredAt: Date.now(),
      });
      const garbage = invalidations();
      for (let i = 0; i < 20; i++) {
        const answer = await v.verifyCredential({
          credential: `tsr_garbage${i}`,
          minRevocationPosition: past,
        });
        expect(VerificationCode[answer.code]).toBe("MALFORMED");
      }
      expect(invalidations() - garbage).toBe(0);
    }, 60_000);
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

  /** A PAT answered VALID (its rows kept), and a VerifyCredential client. */
  async function verifiedOnce(name: string) {
    const root = await adminLogin(s.connect());
    const verifier = await verifierMachine(s.connect(), root);
    const { token } = await clientFor(TokenService, s.connect(), root).createPersonalAccessToken({
      name: `${name}-${short()}`,
    });
    const v = createClient(
      VerificationService,
      withHeaders(s.connect(), { authorization: `Bearer ${verifier}` }),
    );
    expect((await v.verifyCredential({ credential: token })).code).toBe(VerificationCode.VALID);
    return { token, v };
  }

  /**
   * A position past what this instance has read: a revocation another instance's feed
   * delivered (committed, its notification not yet here). Each call a new cursor.
   */
  function ahead(subjectId: string): string {
    const feed = s.app.revocations;
    return feed.cursors.seal({
      id: feed.position + 1,
      kind: "credential",
      subjectId,
      tenantId: "ahead",
      occurredAt: Date.now(),
    });
  }

  it("answers Unavailable with Retry-After within its bound, never the answer it kept", async () => {
    const { token, v } = await verifiedOnce("frozen");
    const cursor = ahead("frozen");
    proxy.freeze();
    const started = performance.now();
    const err = await v
      .verifyCredential({ credential: token, minRevocationPosition: cursor }, { timeoutMs: 10_000 })
      .then(() => undefined, ConnectError.from);
    expect(err?.code).toBe(Code.Unavailable);
    expect(err?.metadata.get("retry-after")).toBe("1");
    expect(performance.now() - started).toBeLessThan(5_000);
    proxy.restore();
    // The database answers again: the same cursor is caught up with (the read held meanwhile is over).
    const answer = await v.verifyCredential({ credential: token, minRevocationPosition: cursor });
    expect(answer.code).toBe(VerificationCode.VALID);
  }, 60_000);

  it("answers Unavailable before the call's own deadline (the SDK's default 2 s), not after the caller left", async () => {
    const { token, v } = await verifiedOnce("deadline");
    // The listening session back from the freeze before (the state cache serves the caller's rows again).
    await expect
      .poll(() => s.app.notifier?.online && s.app.notifier.provenAgoMs < 500, { timeout: 10_000 })
      .toBe(true);
    expect((await v.verifyCredential({ credential: token })).code).toBe(VerificationCode.VALID);
    proxy.freeze();
    // The SDK's default deadline (2 s), and a shorter one: each answered Unavailable by the server.
    const answers = await Promise.all(
      [2_000, 800].map((timeoutMs) =>
        v
          .verifyCredential(
            { credential: token, minRevocationPosition: ahead(`${timeoutMs}`) },
            { timeoutMs },
          )
          .then(() => undefined, ConnectError.from),
      ),
    );
    proxy.restore();
    for (const err of answers) {
      expect(err?.code).toBe(Code.Unavailable);
      expect(err?.metadata.get("retry-after")).toBe("1");
    }
  }, 60_000);
});
