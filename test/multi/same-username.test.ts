import type { ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { dropSchema, POSTGRES, TEST_MASTER_KEY } from "../helpers.js";
import { killAll, serve, stop } from "./processes.js";

const ADMIN_PASSWORD = "same-username-admin-password";

/**
 * Two instances (real processes) on one database create the same username at the same
 * moment: both pass the "is it taken?" read (PBKDF2 runs between it and the insert), and
 * the database's unique index decides. The loser is answered 409 ALREADY_EXISTS, never
 * 500, round after round. On PostgreSQL (one schema) and on SQLite (one file, two
 * processes: the second writer also meets the file's lock).
 */
const sqliteFile = () => `sqlite:${join(mkdtempSync(join(tmpdir(), "tessera-same-name-db-")), "tessera.db")}`;
const databases = [
  ...(process.env.TESSERA_TEST_SKIP_POSTGRES === "1"
    ? []
    : [{ name: "postgres", url: () => POSTGRES.url() }]),
  { name: "sqlite", url: sqliteFile },
];
describe.each(databases)("the same username created on two instances at once on $name", (db) => {
  const url = db.url();
  let instances: { url: string; child: ChildProcess }[] = [];
  let dispatcher: Agent;
  let tokens: string[];

  const post = async (base: string, path: string, body: unknown, token?: string) => {
    const res = await undiciFetch(`${base}/tessera.v1.${path}`, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        ...(token ? { authorization: `Bearer ${token}` } : {}),
      },
      body: JSON.stringify(body),
      dispatcher,
    });
    return { status: res.status, body: (await res.json()) as Record<string, unknown> };
  };

  beforeAll(async () => {
    const certDir = join(mkdtempSync(join(tmpdir(), "tessera-same-name-")), "certs");
    const env = {
      ...(process.env as Record<string, string>),
      TESSERA_DATABASE_URL: url,
      TESSERA_CERT_DIR: certDir,
      TESSERA_HOST: "127.0.0.1",
      TESSERA_PORT: "0",
      TESSERA_ADMIN_PASSWORD: ADMIN_PASSWORD,
      // Real hashing work between the read and the insert: the window a race needs.
      TESSERA_PASSWORD_ITERATIONS: "100000",
      TESSERA_RATE_LIMIT: "false",
      TESSERA_MASTER_KEY: TEST_MASTER_KEY,
      TESSERA_LOG_LEVEL: "info",
    };
    instances = await Promise.all([serve(env), serve(env)]);
    dispatcher = new Agent({ connect: { ca: readFileSync(join(certDir, "ca.crt")) } });
    tokens = await Promise.all(
      instances.map(async (i) => {
        const login = await post(i.url, "UserService/Login", {
          username: "admin",
          password: ADMIN_PASSWORD,
        });
        // A failed login (e.g. 503 busy hashing) must fail here, not as 401s in the rounds.
        if (typeof login.body.accessToken !== "string")
          throw new Error(`login failed: ${login.status} ${JSON.stringify(login.body)}`);
        return login.body.accessToken;
      }),
    );
  }, 120_000);
  afterAll(async () => {
    await Promise.all(instances.map((i) => stop(i.child)));
    killAll();
    await dispatcher?.close();
    if (db.name === "postgres") await dropSchema(url);
  });

  it("answers the loser 409 ALREADY_EXISTS, never 500, in every one of 12 rounds", async () => {
    const statuses: number[][] = [];
    /** Rounds the database's unique index decided (both requests had found the name free). */
    let byIndex = 0;
    for (let round = 0; round < 12; round++) {
      const username = `race-${round}-${Date.now().toString(36)}`;
      const answers = await Promise.all(
        instances.map((inst, i) =>
          post(
            inst.url,
            "UserService/CreateUser",
            { username, password: "a long enough password" },
            tokens[i],
          ),
        ),
      );
      statuses.push(answers.map((a) => a.status).sort());
      expect(answers.map((a) => a.status).sort(), JSON.stringify(answers)).toEqual([200, 409]);
      const loser = answers.find((a) => a.status === 409)!;
      expect(loser.body).toMatchObject({ code: "already_exists", reason: "ALREADY_EXISTS" });
      if (loser.body.message !== "username is taken") byIndex++;
    }
    expect(statuses.flat()).not.toContain(500);
    // The race happened (the pre-check alone would make this test pass without one).
    expect(byIndex).toBeGreaterThan(0);
    console.log(`${byIndex} of 12 rounds decided by the unique index, the rest by the pre-check`);
  }, 120_000);
});
