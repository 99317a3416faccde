import { spawn } from "node:child_process";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { ADMIN_PASSWORD, clientFor, createTestCerts, dropSchema, type TestCerts } from "../helpers.js";
import { transportTo } from "../multi/fixtures.js";
import { killAll, serve, serveEnv, stop } from "../multi/processes.js";

/**
 * PostgreSQL turned read-only under a running instance: a failover that demoted the primary
 * it talks to, a standby it was pointed at, or `default_transaction_read_only` set by an
 * operator for maintenance. Every write then fails with SQLSTATE 25006
 * (read_only_sql_transaction). That is the database unable to take writes now, not a bug:
 * Unavailable with Retry-After, as a read-only SQLite file is, never Internal.
 */

const ROLE = "tessera_rstore_ro";
const BASE = "postgres://postgres@127.0.0.1:5432/test";
const schema = `t_${Date.now().toString(36)}_readonly`;
let certs: TestCerts;
let child: Awaited<ReturnType<typeof serve>>["child"] | undefined;
let t: Transport;

function psql(sql: string): Promise<number> {
  const p = spawn("psql", [BASE, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql]);
  return new Promise((resolve) => p.once("exit", (code) => resolve(code ?? -1)));
}

/** Make (or make writable again) every new session of the role read-only, and end its current ones. */
async function readOnly(on: boolean): Promise<void> {
  expect(
    await psql(
      `alter role ${ROLE} in database test set default_transaction_read_only = ${on ? "on" : "off"}`,
    ),
  ).toBe(0);
  // Sessions take the setting when they start: end the instance's (its pool and listener reconnect).
  expect(
    await psql(`select pg_terminate_backend(pid) from pg_stat_activity where usename = '${ROLE}'`),
  ).toBe(0);
}

async function failure(call: Promise<unknown>): Promise<ConnectError | undefined> {
  return call.then(
    () => undefined,
    (e: unknown) => ConnectError.from(e),
  );
}

beforeAll(async () => {
  await psql(
    `do $$ begin if not exists (select 1 from pg_roles where rolname = '${ROLE}') then create role ${ROLE} login; end if; end $$; ` +
      `grant create on database test to ${ROLE}; alter role ${ROLE} in database test set default_transaction_read_only = off`,
  );
  certs = await createTestCerts();
  const s = await serve(serveEnv(`postgres://${ROLE}@127.0.0.1:5432/test?schema=${schema}`, certs.dir));
  child = s.child;
  t = transportTo(s.url, certs);
}, 120_000);

afterAll(async () => {
  await psql(`alter role ${ROLE} in database test set default_transaction_read_only = off`);
  if (child) await stop(child);
  killAll();
  await dropSchema(`${BASE}?schema=${schema}`);
});

describe("PostgreSQL turned read-only under a running instance", () => {
  it("answers writes Unavailable with Retry-After, never Internal, and writes again once it is writable", async () => {
    const users = createClient(UserService, t);
    const first = await users.login({ username: "admin", password: ADMIN_PASSWORD });
    await readOnly(true);
    // The first calls may meet a pooled session just ended (57P01, an outage too); then read-only ones.
    for (let i = 0; i < 4; i++) {
      const login = await failure(users.login({ username: "admin", password: ADMIN_PASSWORD }));
      expect(login?.code, login?.message).toBe(Code.Unavailable);
      expect(login?.metadata.get("retry-after")).toBe("1");
      const pat = await failure(
        clientFor(TokenService, t, first.accessToken).createPersonalAccessToken({ name: `ro-${i}` }),
      );
      expect(pat?.code, pat?.message).toBe(Code.Unavailable);
      expect(pat?.metadata.get("retry-after")).toBe("1");
    }
    await readOnly(false);
    await expect
      .poll(async () => (await failure(users.login({ username: "admin", password: ADMIN_PASSWORD })))?.code)
      .toBeUndefined();
  });
});
