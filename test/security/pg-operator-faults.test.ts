import { spawn } from "node:child_process";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { ADMIN_PASSWORD, clientFor, createTestCerts, dropSchema, type TestCerts } from "../helpers.js";
import { transportTo } from "../multi/fixtures.js";
import { killAll, serve, serveEnv, stop } from "../multi/processes.js";

/**
 * An operator's bad day under a running `tessera serve`, done to its database role:
 * - PostgreSQL turned read-only: a failover that demoted the primary it talks to, a standby
 *   it was pointed at, or `default_transaction_read_only` set for maintenance. Every write
 *   then fails with SQLSTATE 25006 (read_only_sql_transaction);
 * - new sessions refused: the role's password rotated before the instance's configuration,
 *   its LOGIN taken away, a pg_hba.conf change (SQLSTATE class 28), or the database renamed
 *   or being restored (3D000). The pool's sessions end and none can be opened again.
 * Either is the database unable to serve this instance now, not a bug: Unavailable with
 * Retry-After, as a read-only SQLite file or a refused connection is, never Internal.
 */

// A role of this file's run alone: the unit and connect projects run it at the same time,
// and a role made read-only or refused its login under the other's server would fail it.
const ROLE = `tessera_ops_${process.pid}_${Date.now().toString(36)}`;
const BASE = "postgres://postgres@127.0.0.1:5432/test";
const schema = `t_${Date.now().toString(36)}_operator`;
let certs: TestCerts;
let child: Awaited<ReturnType<typeof serve>>["child"] | undefined;
let t: Transport;
/** The server's log lines (JSON, from its stderr). */
const logLines: Record<string, unknown>[] = [];

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
  expect(await psql(`select pg_terminate_backend(pid) from pg_stat_activity where usename = '${ROLE}'`)).toBe(
    0,
  );
}

async function failure(call: Promise<unknown>): Promise<ConnectError | undefined> {
  return call.then(
    () => undefined,
    (e: unknown) => ConnectError.from(e),
  );
}

beforeAll(async () => {
  await psql(`create role ${ROLE} login; grant create on database test to ${ROLE}`);
  certs = await createTestCerts();
  const s = await serve(serveEnv(`postgres://${ROLE}@127.0.0.1:5432/test?schema=${schema}`, certs.dir));
  child = s.child;
  let pending = "";
  child.stderr?.on("data", (d: Buffer) => {
    const parts = (pending + d.toString()).split("\n");
    pending = parts.pop() ?? "";
    for (const line of parts)
      if (line.startsWith("{")) logLines.push(JSON.parse(line) as Record<string, unknown>);
  });
  t = transportTo(s.url, certs);
}, 120_000);

afterAll(async () => {
  if (child) await stop(child);
  killAll();
  await dropSchema(`${BASE}?schema=${schema}`);
  await psql(
    `alter role ${ROLE} in database test reset all; drop owned by ${ROLE}; drop role if exists ${ROLE}`,
  );
});

describe("PostgreSQL failing an instance's role under it", () => {
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

  it("answers reads and writes Unavailable with Retry-After, never Internal, while the role may not log in, and serves again once it may", async () => {
    const users = createClient(UserService, t);
    const first = await users.login({ username: "admin", password: ADMIN_PASSWORD });
    const me = () => clientFor(UserService, t, first.accessToken).getCurrentUser({});
    await me();
    expect(await psql(`alter role ${ROLE} nologin`)).toBe(0);
    expect(
      await psql(`select pg_terminate_backend(pid) from pg_stat_activity where usename = '${ROLE}'`),
    ).toBe(0);
    for (let i = 0; i < 3; i++) {
      for (const err of [
        await failure(users.login({ username: "admin", password: ADMIN_PASSWORD })),
        await failure(me()),
      ]) {
        expect(err?.code, err?.message).toBe(Code.Unavailable);
        expect(err?.metadata.get("retry-after")).toBe("1");
      }
    }
    // Said at error level, naming the SQLSTATE (28000: the role may not log in), once for
    // the six refused calls (rate-limited), not a line each.
    await expect
      .poll(() => logLines.filter((l) => l.level === 50 && l.sqlstate !== undefined))
      .toHaveLength(1);
    expect(logLines.find((l) => l.sqlstate !== undefined)).toMatchObject({ sqlstate: "28000" });
    expect(await psql(`alter role ${ROLE} login`)).toBe(0);
    await expect.poll(async () => (await failure(me()))?.code).toBeUndefined();
  });
});
