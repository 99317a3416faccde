import { spawn } from "node:child_process";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { ADMIN_PASSWORD, dropSchema, startTestServer, type TestServer } from "../helpers.js";

/**
 * A deployment's role with a `lock_timeout` of its own (`ALTER ROLE … SET lock_timeout`, a
 * common guard against lock queues): a statement waiting past it on a lock another session
 * holds fails with SQLSTATE 55P03 (lock_not_available). That is the database being busy,
 * not a bug: Unavailable with Retry-After, as for a statement timeout, never Internal.
 */

const ROLE = "tessera_secb_lt";
const BASE = "postgres://postgres@127.0.0.1:5432/test";
const schema = `t_${Date.now().toString(36)}_locktimeout`;
let s: TestServer;
let t: Transport;

function psql(sql: string) {
  const child = spawn("psql", [BASE, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql]);
  return new Promise<number>((resolve) => child.once("exit", (code) => resolve(code ?? -1)));
}

beforeAll(async () => {
  await psql(
    `do $$ begin if not exists (select 1 from pg_roles where rolname = '${ROLE}') then create role ${ROLE} login; end if; end $$; ` +
      `grant create on database test to ${ROLE}; alter role ${ROLE} in database test set lock_timeout = '250ms'`,
  );
  const url = `postgres://${ROLE}@127.0.0.1:5432/test?schema=${schema}`;
  s = await startTestServer({ name: "postgres", url: () => url }, { database: { stateCacheSize: 0 } });
  t = s.connect();
}, 120_000);

afterAll(async () => {
  await s?.close();
  await dropSchema(`${BASE}?schema=${schema}`);
});

describe("a statement waiting past the role's lock_timeout (PostgreSQL)", () => {
  it("answers Unavailable with Retry-After, never Internal, and works once the lock is released", async () => {
    const users = createClient(UserService, t);
    // Another session holds the users table for 2 s.
    const held = psql(
      `begin; lock table ${schema}.users in access exclusive mode; select pg_sleep(2); commit`,
    );
    await new Promise((r) => setTimeout(r, 500));
    const err = await users.login({ username: "admin", password: ADMIN_PASSWORD }).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(err?.code).toBe(Code.Unavailable);
    expect(err?.metadata.get("retry-after")).toBe("1");
    expect(await held).toBe(0);
    const ok = await users.login({ username: "admin", password: ADMIN_PASSWORD });
    expect(ok.accessToken).not.toBe("");
  }, 60_000);
});
