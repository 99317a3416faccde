import { randomUUID } from "node:crypto";
import { createRequire } from "node:module";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { App } from "../src/app.js";
import type { PgNotifier } from "../src/storage/pg-notify.js";
import { RevocationEventRepository } from "../src/storage/repositories/revocation-events.js";
import type { SqlRunner } from "../src/storage/sql.js";
import { CursorCodec, markOf } from "../src/verification/revocation-cursor.js";
import { RevocationFeed } from "../src/verification/revocation-feed.js";
import { createTestApp, DATABASES, POSTGRES } from "./helpers.js";
import { earlierCursor } from "./watch-fixtures.js";

/**
 * The revocation feed's storage on SQLite and PostgreSQL, below the RPC: the triggers write
 * an event for a change made by any path (raw SQL too) and only when it commits, and none
 * for the updates that do not matter to a verification; and the cursors.
 */
describe.each(DATABASES)("the revocation feed on $name", (db) => {
  let app: App;
  let events: RevocationEventRepository;
  let tenantId: string;
  let userId: string;

  beforeAll(async () => {
    app = await createTestApp(db);
    events = new RevocationEventRepository(app.sql);
    tenantId = await app.defaultTenantId();
    userId = (await app.sql.get<{ id: string }>("select id from users where username = 'admin'", []))!.id;
  });
  afterAll(async () => {
    await app?.close();
  });

  /** The events after `from`, as `kind:id`. */
  const since = async (from: number) =>
    (await events.after(from, 1_000)).map((e) => `${e.kind}:${e.subjectId}`);

  it("writes an event for a change made by raw SQL, with the row's tenant", async () => {
    const from = await events.lastId();
    await app.sql.run("update users set scopes = ? where id = ?", ["x:read", userId]);
    const after = await events.after(from, 10);
    expect(after.map((e) => [e.kind, e.subjectId, e.tenantId])).toEqual([["subject", userId, tenantId]]);
    expect(Math.abs(after[0]!.occurredAt - Date.now())).toBeLessThan(60_000);
  });

  it("writes nothing for a change that rolls back", async () => {
    const from = await events.lastId();
    await expect(
      app.storage.em.fork().transactional(async (tx) => {
        await tx.execute("update users set disabled = ? where id = ?", [true, userId]);
        throw new Error("rolled back");
      }),
    ).rejects.toThrow("rolled back");
    expect(await since(from)).toEqual([]);
    // The next change still gets an event, in order.
    await app.sql.run("update users set scopes = ? where id = ?", ["y:read", userId]);
    expect(await since(from)).toEqual([`subject:${userId}`]);
  });

  it("writes nothing for updates that do not change what verifies (last used, stored digest, names)", async () => {
    const now = new Date();
    await app.sql.run(
      "insert into api_tokens (id, public_id, kind, tenant_id, owner_user_id, name, scopes, secret_hash, hint, created_at) values (?, ?, 'pat', ?, ?, 'n', '', 'h', 'x', ?)",
      [randomUUID(), randomUUID().slice(0, 16), tenantId, userId, now],
    );
    const id = (await app.sql.get<{ id: string }>("select id from api_tokens where owner_user_id = ?", [
      userId,
    ]))!.id;
    const from = await events.lastId();
    await app.sql.run("update api_tokens set last_used_at = ? where id = ?", [now, id]);
    await app.sql.run("update api_tokens set verified_digest = ? where id = ?", ["d".repeat(64), id]);
    await app.sql.run("update api_tokens set name = ? where id = ?", ["renamed", id]);
    await app.sql.run("update api_tokens set expires_at = ? where id = ?", [
      new Date(Date.now() + 86_400_000),
      id,
    ]);
    // Lengthening an expiry does not matter either; shortening it does, and revoking.
    await app.sql.run("update api_tokens set expires_at = ? where id = ?", [
      new Date(Date.now() + 2 * 86_400_000),
      id,
    ]);
    expect(await since(from)).toEqual([`credential:${id}`]);
    await app.sql.run("update api_tokens set expires_at = ? where id = ?", [
      new Date(Date.now() + 3_600_000),
      id,
    ]);
    await app.sql.run("update api_tokens set revoked_at = ? where id = ?", [now, id]);
    expect(await since(from)).toEqual([`credential:${id}`, `credential:${id}`, `credential:${id}`]);
    // Deleting a revoked token: it made its event when revoked.
    await app.sql.run("delete from api_tokens where id = ?", [id]);
    expect(await since(from)).toHaveLength(3);
  });

  it("prunes old events but keeps the newest, and records how far it pruned", async () => {
    await app.sql.run("update users set scopes = ? where id = ?", ["z:read", userId]);
    const last = await events.lastId();
    const through = await events.prune(new Date(Date.now() + 60_000), 1_000_000);
    expect(through).toBeGreaterThan(0);
    expect(await events.lastId()).toBe(last);
    expect((await events.after(0, 10)).map((e) => e.id)).toEqual([last]);
    expect((await events.info()).prunedThrough).toBe(through);
    expect(through).toBeLessThan(last);
  });

  it("prunes a backlog by age through the occurred_at index, in steps with a turn between them", async () => {
    // 12,000 events from two days ago, then one of now: a backlog three steps long.
    const old = new Date(Date.now() - 2 * 86_400_000);
    await app.sql.run(
      db.name === "sqlite"
        ? "with recursive n(i) as (select 1 union all select i + 1 from n where i < 12000) " +
            "insert into revocation_events (kind, subject_id, tenant_id, occurred_at) " +
            "select 'credential', 'bulk-' || i, ?, ? from n"
        : "insert into revocation_events (kind, subject_id, tenant_id, occurred_at) " +
            "select 'credential', 'bulk-' || i, ?, ? from generate_series(1, 12000) as i",
      [tenantId, old],
    );
    await app.sql.run("update users set scopes = ? where id = ?", ["y:read", userId]);
    const last = await events.lastId();
    // Each statement the pruning sends, with the event-loop turns seen before it.
    let turns = 0;
    let counting = true;
    const count = () => {
      turns++;
      if (counting) setImmediate(count);
    };
    setImmediate(count);
    const sent: { sql: string; turns: number }[] = [];
    const recording = new Proxy(app.sql, {
      get(target, key) {
        const value = Reflect.get(target, key);
        if (typeof value !== "function") return value;
        return (...args: unknown[]) => {
          if (typeof args[0] === "string") sent.push({ sql: args[0], turns });
          return value.apply(target, args);
        };
      },
    });
    const through = await new RevocationEventRepository(recording).prune(
      new Date(Date.now() - 86_400_000),
      1_000_000,
    );
    counting = false;
    expect((await events.after(0, 10)).map((e) => e.id)).toEqual([last]);
    expect(through).toBe(last - 1);
    const deletes = sent.filter((q) => q.sql.startsWith("delete"));
    expect(deletes.length).toBeGreaterThanOrEqual(3);
    for (let i = 1; i < deletes.length; i++) expect(deletes[i]!.turns).toBeGreaterThan(deletes[i - 1]!.turns);
    if (db.name === "sqlite") {
      // A look-up with a condition reads the occurred_at index (the old one walked the ids kept).
      for (const { sql } of sent.filter((q) => q.sql.startsWith("select") && q.sql.includes(" where "))) {
        const plan = await app.sql.all<{ detail: string }>(`explain query plan ${sql}`, [old]);
        expect(plan.map((r) => r.detail).join("; ")).toMatch(/INDEX revocation_events_occurred_at_index/);
      }
    }
  });
});

/** `events` whose reads fail while `set(true)` (the database unreachable). */
function stalling(events: RevocationEventRepository) {
  let failing = false;
  const proxy = new Proxy(events, {
    get(target, key) {
      const value = Reflect.get(target, key);
      if (key !== "from" || typeof value !== "function") return value;
      return (...args: unknown[]) =>
        failing ? Promise.reject(new Error("connection lost")) : value.apply(target, args);
    },
  });
  return {
    events: proxy,
    set: (on: boolean) => {
      failing = on;
    },
  };
}

/** A feed of its own over `app`'s events, polling, with the batches it hands out and the times it ended its streams. */
async function ownFeed(app: App, events = new RevocationEventRepository(app.sql)) {
  const lines: string[] = [];
  const feed = new RevocationFeed({
    events,
    pollMs: 20,
    retentionSeconds: 86_400,
    maxEvents: 1_000_000,
    logger: { warn: (_o, msg) => lines.push(msg), info: () => undefined },
  });
  await feed.start();
  const read: number[] = [];
  let lost = 0;
  feed.subscribe((b) => read.push(...b.events.map((e) => e.id)));
  feed.onLost(() => lost++);
  return { feed, read, lines, lost: () => lost };
}

describe.each(DATABASES)("the revocation feed's reader on $name", (db) => {
  let app: App;
  let userId: string;
  const change = (scopes: string) =>
    app.sql.run("update users set scopes = ? where id = ?", [scopes, userId]);

  beforeAll(async () => {
    app = await createTestApp(db);
    userId = (await app.sql.get<{ id: string }>("select id from users where username = 'admin'", []))!.id;
  });
  afterAll(async () => {
    await app?.close();
  });

  it("goes on from an empty feed, and past retention deleting the last event it read, ending no stream", async () => {
    await app.sql.run("delete from revocation_events", []);
    const f = await ownFeed(app);
    expect(f.feed.position).toBe(0);
    await change("a:read");
    await expect.poll(() => f.read.length).toBe(1);
    await change("b:read");
    await expect.poll(() => f.read.length).toBe(2);
    // Retention takes the event the reader read last: a newer one is committed first, not yet read.
    f.feed.close();
    const stalled = stalling(new RevocationEventRepository(app.sql));
    const g = await ownFeed(app, stalled.events);
    stalled.set(true);
    await change("c:read");
    const through = await new RevocationEventRepository(app.sql).prune(
      new Date(Date.now() + 60_000),
      1_000_000,
    );
    expect(through).toBe(g.feed.position);
    stalled.set(false);
    await expect.poll(() => g.read.length).toBe(1);
    await change("d:read");
    await expect.poll(() => g.read.length).toBe(2);
    expect(g.lost()).toBe(0);
    expect(f.lost()).toBe(0);
    g.feed.close();
  });

  it("ends its streams when retention deleted events it had not read, and goes on from the newest", async () => {
    const stalled = stalling(new RevocationEventRepository(app.sql));
    const f = await ownFeed(app, stalled.events);
    const position = f.feed.position;
    // Not reading while three events come and retention deletes two of them.
    stalled.set(true);
    await change("e:read");
    await change("f:read");
    await change("g:read");
    await new RevocationEventRepository(app.sql).prune(new Date(Date.now() + 60_000), 1);
    stalled.set(false);
    await expect.poll(() => f.lost()).toBe(1);
    expect(f.read).toEqual([]);
    expect(f.feed.position).toBeGreaterThan(position + 2);
    await change("h:read");
    await expect.poll(() => f.read.length).toBe(1);
    expect(f.lost()).toBe(1);
    f.feed.close();
  });

  it("keeps the check owed when a read fails: the restore is seen by the read that succeeds", async () => {
    const failing = stalling(new RevocationEventRepository(app.sql));
    await change("i:read");
    const f = await ownFeed(app, failing.events);
    const backupAt = f.feed.position;
    await change("j:read");
    await change("k:read");
    await expect.poll(() => f.read.length).toBe(2);
    failing.set(true);
    await app.sql.run("delete from revocation_events where id > ?", [backupAt]);
    if (db.name === "postgres")
      await app.sql.get("select setval(pg_get_serial_sequence('revocation_events', 'id'), ?, true)", [
        backupAt,
      ]);
    else await app.sql.run("update sqlite_sequence set seq = ? where name = 'revocation_events'", [backupAt]);
    for (const s of ["l:read", "m:read", "n:read"]) await change(s);
    await new Promise((r) => setTimeout(r, 100));
    failing.set(false);
    await expect.poll(() => f.lost()).toBe(1);
    expect(f.read).toHaveLength(2);
    expect(f.lines).toContain(
      "revocation feed: the last event read is gone (its ids went back: restored from a backup?); ending every stream",
    );
    f.feed.close();
  });

  it.runIf(db.name === "postgres")(
    "refuses to start when the events' sequence hands out ids ahead",
    async () => {
      await app.sql.run("alter sequence revocation_events_id_seq cache 20", []);
      try {
        const feed = new RevocationFeed({
          events: new RevocationEventRepository(app.sql),
          // PostgreSQL's: what the check is made for (the notifier itself is not reached).
          notifier: {} as PgNotifier,
          pollMs: 20,
          retentionSeconds: 86_400,
          maxEvents: 1_000_000,
          logger: { warn: () => undefined, info: () => undefined },
        });
        await expect(feed.start()).rejects.toThrow(
          /revocation_events_id_seq of revocation_events caches 20 ids per session.*alter sequence .*revocation_events_id_seq cache 1/,
        );
      } finally {
        await app.sql.run("alter sequence revocation_events_id_seq cache 1", []);
      }
    },
  );
});

/** One session of node-postgres (what the ORM's pool uses), opened with settings of its own. */
interface PgSession {
  connect(): Promise<void>;
  end(): Promise<void>;
  query(sql: string, params?: unknown[]): Promise<{ rows: Record<string, unknown>[] }>;
}
const PgClient = createRequire(import.meta.url)("pg").Client as new (options: {
  connectionString: string;
  options: string;
}) => PgSession;

/** A feed over `events` as PostgreSQL's (the notifier itself is not reached): its start checks the id sequence. */
const pgFeed = (events: RevocationEventRepository) =>
  new RevocationFeed({
    events,
    notifier: {} as PgNotifier,
    pollMs: 20,
    retentionSeconds: 86_400,
    maxEvents: 1_000_000,
    logger: { warn: () => undefined, info: () => undefined },
  });

describe.runIf(DATABASES.includes(POSTGRES))(
  "the revocation feed on PostgreSQL sessions of other settings",
  () => {
    let app: App;
    let schema = "";
    let client: PgSession;

    beforeAll(async () => {
      const url = POSTGRES.url();
      schema = new URL(url).searchParams.get("schema")!;
      app = await createTestApp({ name: "postgres", url: () => url });
      const base = new URL(url);
      base.searchParams.delete("schema");
      client = new PgClient({
        connectionString: base.toString(),
        options: `-c search_path=${schema} -c DateStyle=SQL,DMY`,
      });
      await client.connect();
    });
    afterAll(async () => {
      await client?.end();
      await app?.close();
    });

    /** A runner over the one session of `client` (`?` placeholders numbered as PostgreSQL's). */
    const session = (): SqlRunner => {
      const query = async (sql: string, params: readonly unknown[] = []) => {
        let n = 0;
        return (
          await client.query(
            sql.replace(/\?/g, () => `$${++n}`),
            [...params],
          )
        ).rows;
      };
      return {
        get: async (sql: string, params?: readonly unknown[]) => (await query(sql, params))[0],
        all: query,
        run: async (sql: string, params?: readonly unknown[]) => (await query(sql, params)).length,
      } as unknown as SqlRunner;
    };

    it("reads an event the same, and marks it the same, under any DateStyle", async () => {
      expect((await client.query("show datestyle")).rows[0]!.DateStyle).toBe("SQL, DMY");
      const userId = (await app.sql.get<{ id: string }>("select id from users where username = 'admin'", []))!
        .id;
      await app.sql.run("update users set scopes = ? where id = ?", ["dmy:read", userId]);
      const dmy = await new RevocationEventRepository(session()).newest();
      const iso = await new RevocationEventRepository(app.sql).newest();
      expect(Math.abs(dmy!.occurredAt - Date.now())).toBeLessThan(60_000);
      expect(dmy).toEqual(iso);
      expect(markOf(dmy).equals(markOf(iso))).toBe(true);
    });

    it("refuses to start when the events' id draws from a sequence it does not own, caching ids ahead", async () => {
      await app.sql.run("alter sequence revocation_events_id_seq owned by none", []);
      await app.sql.run("alter sequence revocation_events_id_seq cache 20", []);
      try {
        await expect(pgFeed(new RevocationEventRepository(app.sql)).start()).rejects.toThrow(
          /revocation_events_id_seq of revocation_events caches 20 ids per session/,
        );
      } finally {
        await app.sql.run("alter sequence revocation_events_id_seq cache 1", []);
      }
      const started = pgFeed(new RevocationEventRepository(app.sql));
      await started.start();
      started.close();
    });

    it("refuses to start when no sequence of the events' id is found", async () => {
      // A default naming its sequence by text: resolved at each call, no dependency recorded.
      await app.sql.run(
        "alter table revocation_events alter column id set default nextval('revocation_events_id_seq'::text)",
        [],
      );
      try {
        await expect(pgFeed(new RevocationEventRepository(app.sql)).start()).rejects.toThrow(
          /no sequence of revocation_events\.id found/,
        );
      } finally {
        await app.sql.run(
          "alter table revocation_events alter column id set default nextval('revocation_events_id_seq'::regclass)",
          [],
        );
      }
    });
  },
);

describe("revocation cursors", () => {
  const event = (id: number, occurredAt = 1_700_000_000_000) =>
    ({ id, kind: "credential", subjectId: "c-1", tenantId: "t-1", occurredAt }) as const;

  it("open only with the database id that sealed them, and are opaque", () => {
    const id = randomUUID();
    const codec = new CursorCodec(id);
    const c1 = codec.seal(event(42));
    const c2 = codec.seal(event(42));
    expect(c1).not.toBe(c2);
    expect(codec.open(c1)?.position).toBe(42);
    expect(new CursorCodec(id).open(c2)?.position).toBe(42);
    expect(new CursorCodec(randomUUID()).open(c1)).toBeUndefined();
    for (const bad of [
      "",
      "x",
      `${c1}A`,
      c1.slice(1),
      "!".repeat(59),
      Buffer.alloc(44).toString("base64url"),
      // Of the earlier format's length, not sealed here.
      Buffer.alloc(36).toString("base64url"),
    ])
      expect(codec.open(bad), bad).toBeUndefined();
    expect(Buffer.from(c1, "base64url").includes(Buffer.from([0, 0, 0, 0, 0, 0, 0, 42]))).toBe(false);
  });

  it("carry the mark of the event at their position, which another event at that id does not match", () => {
    const codec = new CursorCodec(randomUUID());
    const opened = codec.open(codec.seal(event(7)))!;
    expect(opened.mark!.equals(markOf(event(7)))).toBe(true);
    // The same id drawn again after a restore: a later change, or another subject.
    expect(opened.mark!.equals(markOf(event(7, 1_700_000_000_001)))).toBe(false);
    expect(opened.mark!.equals(markOf({ ...event(7), subjectId: "c-2" }))).toBe(false);
    expect(opened.mark!.equals(markOf(undefined))).toBe(false);
    expect(codec.open(codec.seal(undefined))).toEqual({ position: 0, mark: markOf(undefined) });
  });

  it("open an earlier version's cursor (a position alone) by its position, for a rolling upgrade", () => {
    const id = randomUUID();
    const opened = new CursorCodec(id).open(earlierCursor(id, 42));
    expect(opened).toEqual({ position: 42 });
    expect(new CursorCodec(randomUUID()).open(earlierCursor(id, 42))).toBeUndefined();
  });
});
