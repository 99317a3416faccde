import { createHash } from "node:crypto";
import { createClient, type Transport } from "@connectrpc/connect";
import type { Knex } from "@mikro-orm/knex";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { initORM, type Storage } from "../../src/storage/orm.js";
import { createTestCerts, dropSchema, POSTGRES } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";
import { outcome, pgHolds } from "../pg-holds.js";
import { transportTo } from "./fixtures.js";
import { killAll, serve, serveEnv, stop } from "./processes.js";

/**
 * DeleteUser on one instance and RefreshToken of that user's session on another, interleaved
 * where they took row locks in opposite orders. DeleteUser's DELETE takes the user's row,
 * then (ON DELETE CASCADE) its refresh tokens; RefreshToken spent its token (that row) and
 * then inserted the next one, whose foreign-key check waits for the user's row: a deadlock,
 * which PostgreSQL ends after deadlock_timeout by failing one of them (40P01, answered
 * Unavailable). A transaction of the test's own holds another refresh token of the user, so
 * that the deletion stops in its cascade with the user's row taken; each step waits on
 * pg_blocking_pids, not on time.
 */

const PASSWORD = "delete-user-refresh password";
const url = POSTGRES.url();
const children: Awaited<ReturnType<typeof serve>>["child"][] = [];
let ta: Transport;
let tb: Transport;
let probe: Storage;
let knex: Knex;

beforeAll(async () => {
  const certs = await createTestCerts();
  const a = await serve(serveEnv(url, certs.dir));
  children.push(a.child);
  const b = await serve(serveEnv(url, certs.dir));
  children.push(b.child);
  ta = transportTo(a.url, certs);
  tb = transportTo(b.url, certs);
  probe = await initORM({ url, migrate: false });
  knex = probe.em.getConnection().getKnex();
});

afterAll(async () => {
  for (const c of children) await stop(c);
  killAll();
  await probe?.close();
  await dropSchema(url);
});

const { waiterOn, hold } = pgHolds(() => knex);

describe("DeleteUser and RefreshToken on two PostgreSQL instances", () => {
  it("a deletion of a user and a refresh of its session do not deadlock", async () => {
    const root = await adminLogin(ta);
    const username = `del-${short()}`;
    const { user } = await clients(ta, root).users.createUser({ username, password: PASSWORD, scopes: [] });
    const first = await createClient(UserService, ta).login({ username, password: PASSWORD });
    const second = await createClient(UserService, tb).login({ username, password: PASSWORD });
    const hashOf = (token: string) => createHash("sha256").update(token).digest("hex");
    // The first session's refresh token held: the deletion's cascade stops there, the user's row taken.
    const holder = await hold("select id from refresh_tokens where token_hash = ? for update", [
      hashOf(first.refreshToken),
    ]);
    let deletion!: Promise<string>;
    let refresh!: Promise<string>;
    try {
      deletion = outcome(clients(ta, root).users.deleteUser({ id: user!.id }));
      const deleter = await waiterOn(holder.pid);
      // The second session refreshed on B: it waits for the deletion's lock on the user's row
      // (before: holding its spent refresh token, which the cascade deletes next).
      refresh = outcome(createClient(UserService, tb).refreshToken({ refreshToken: second.refreshToken }));
      await waiterOn(deleter);
    } finally {
      await holder.release();
    }
    // Before: one of them ended by the deadlock detector, UNAVAILABLE (503).
    expect([await deletion, await refresh]).toEqual(["done", "TOKEN_REVOKED"]);
    expect(await outcome(createClient(UserService, tb).login({ username, password: PASSWORD }))).toBe(
      "CREDENTIALS_INVALID",
    );
  });
});
