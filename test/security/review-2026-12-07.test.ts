import { mkdtempSync, readFileSync } from "node:fs";
import { createSecureServer } from "node:http2";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, createFileRegistry, type DescService, setExtension } from "@bufbuild/protobuf";
import {
  FileDescriptorProtoSchema,
  file_google_protobuf_empty,
  MethodOptionsSchema,
} from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type HandlerContext } from "@connectrpc/connect";
import { connectNodeAdapter, createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { AuthRuleSchema, auth } from "../../gen/tessera/v1/options_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { createApp } from "../../src/app.js";
import { parseHash } from "../../src/auth/password.js";
import {
  createTesseraAuth,
  createTesseraAuthInterceptor,
  type TesseraAuth,
  tesseraContextValues,
} from "../../src/sdk/server/index.js";
import { Tenant, User } from "../../src/storage/entities.js";
import {
  DATABASES,
  memoryTransport,
  silentLogger,
  startTestServer,
  type TestServer,
  testConfig,
  withHeaders,
} from "../helpers.js";
import {
  adminLogin,
  boundMachineUser,
  clients,
  connectedWithCertificate,
  mintClientCertificate,
  short,
} from "../machine-fixtures.js";

/**
 * The adversarial review of 2026-12-07 (the last sessions' changes: hashing, password
 * upgrades, the SDK's held streams, answer headers, refresh and revocation), against a real
 * server over TLS: each test is a finding of that review, failing on the main it was found
 * on, and holds with its fix.
 */

/** A downstream service with one server-streaming method needing `ticks:read`, built at run time. */
const file = create(FileDescriptorProtoSchema, {
  name: "ticker/v1/ticker.proto",
  package: "ticker.v1",
  syntax: "proto3",
  dependency: ["google/protobuf/empty.proto"],
  service: [
    {
      name: "TickerService",
      method: [
        {
          name: "Ticks",
          inputType: ".google.protobuf.Empty",
          outputType: ".google.protobuf.Empty",
          serverStreaming: true,
          options: (() => {
            const o = create(MethodOptionsSchema);
            setExtension(o, auth, create(AuthRuleSchema, { scopes: ["ticks:read"] }));
            return o;
          })(),
        },
      ],
    },
  ],
});
const TickerService = createFileRegistry(file, (name) =>
  name === "google/protobuf/empty.proto" ? file_google_protobuf_empty : undefined,
).getService("ticker.v1.TickerService") as DescService;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A tick every 50 ms until the call's signal ends it. */
async function* ticks(_req: unknown, ctx: HandlerContext): AsyncGenerator<object> {
  while (!ctx.signal.aborted) {
    yield {};
    await sleep(50);
  }
}

describe.each(DATABASES)("review 2026-12-07 on $name", (db) => {
  let ts: TestServer;
  let root: string;
  const cores: TesseraAuth[] = [];

  beforeAll(async () => {
    ts = await startTestServer(db, { server: { mtls: "optional" } });
    root = await adminLogin(ts.connect());
  }, 120_000);

  afterEach(() => {
    for (const c of cores.splice(0)) c.close();
  });

  afterAll(async () => {
    await ts?.close();
  });

  it("SDK: a held stream of a certificate-bound token ends once the connection's client certificate has expired", async () => {
    const admin = clients(ts.connect(), root);
    const verifier = (
      await admin.machines.createMachineUser({
        name: `verifier-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
    // A short-lived workload certificate (its expiry is how it is revoked), bound to a
    // machine user, which obtains an access token bound to it (RFC 8705) that outlives it.
    const pem = await mintClientCertificate(ts, 8 / 86_400);
    await boundMachineUser(admin, `workload-${short()}`, pem.fingerprint, ["ticks:read"]);
    const over = await connectedWithCertificate(ts, pem);
    const { accessToken } = await over.client.issueAccessToken({});
    over.sessionManager.abort();

    const core = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier,
    });
    cores.push(core);
    // The watch up: the stream is vouched for, so nothing but a deadline checks it again.
    expect(await core.ready(10_000)).toBe(true);
    const downstream = createSecureServer(
      {
        key: readFileSync(join(ts.certs.dir, "server.key")),
        cert: readFileSync(join(ts.certs.dir, "server.crt")),
        ca: ts.certs.ca,
        requestCert: true,
        rejectUnauthorized: false,
      },
      connectNodeAdapter({
        routes: ({ service }) => service(TickerService, { ticks } as never),
        interceptors: [createTesseraAuthInterceptor(core)],
        contextValues: tesseraContextValues,
      }),
    );
    await new Promise<void>((resolve) => downstream.listen(0, "127.0.0.1", resolve));
    const port = (downstream.address() as AddressInfo).port;
    const transport = createGrpcTransport({
      baseUrl: `https://localhost:${port}`,
      nodeOptions: { ca: ts.certs.ca, cert: pem.cert, key: pem.key },
    });
    const ticker = createClient(TickerService, transport) as unknown as {
      ticks(req: object, o: { headers: Record<string, string>; signal: AbortSignal }): AsyncIterable<unknown>;
    };
    const stop = new AbortController();
    let count = 0;
    let done = false;
    const ended = (async () => {
      for await (const _ of ticker.ticks(
        {},
        { headers: { authorization: `Bearer ${accessToken}` }, signal: stop.signal },
      ))
        count++;
    })().then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    void ended.then(() => {
      done = true;
    });
    try {
      await expect.poll(() => count > 2 || done, { timeout: 10_000 }).toBe(true);
      expect(done, "the bound token's stream was not admitted").toBe(false);
      // The certificate's notAfter passes; the stream keeps running on its connection.
      await sleep(Math.max(0, pem.notAfter + 1500 - Date.now()));
      await expect
        .poll(() => done, { timeout: 3000, interval: 50, message: "the stream outlived its certificate" })
        .toBe(true);
      const err = await ended;
      expect(err?.code).toBe(Code.Unauthenticated);
      expect(err?.findDetails(ErrorInfoSchema)[0]?.reason).toBe("TOKEN_NOT_BOUND");
    } finally {
      stop.abort();
      await ended;
      downstream.close();
    }
  });
});

describe.each(DATABASES)("review 2026-12-07, password upgrades, on $name", (db) => {
  /**
   * Iterations the user's hash was made with (slow, so logins overlap), and the server's now:
   * a little higher, as a hash is only ever re-made stronger (a re-hash then takes about as
   * long as a check, so more logins are staggered across it).
   */
  const OLD_ITERATIONS = 300_000;
  const NEW_ITERATIONS = 310_000;
  /** At most this many calls, one every `everyMs` until the hash was re-made (and two more). */
  const STAGGERED = 40;
  const PASSWORD = "a password made long ago";
  let ts: TestServer;
  let userId: string;

  beforeAll(async () => {
    const url =
      db.name === "sqlite"
        ? `sqlite:${join(mkdtempSync(join(tmpdir(), "tessera-review-")), "t.db")}`
        : db.url();
    // The user's hash made at an older, lower count; the server re-hashes it at its own on
    // the next successful login. Hashes run side by side, as on any machine with the cores.
    const before = await createApp(testConfig(url, { auth: { passwordIterations: OLD_ITERATIONS } }), {
      logger: silentLogger,
    });
    try {
      const admin = clients(memoryTransport(before), await adminLogin(memoryTransport(before)));
      const { user } = await admin.users.createUser({ username: "two-devices", password: PASSWORD });
      userId = user!.id;
      await admin.users.createUser({ username: "two-scripts", password: PASSWORD });
    } finally {
      await before.close();
    }
    ts = await startTestServer(
      { name: db.name, url: () => url },
      { auth: { passwordIterations: NEW_ITERATIONS, hashConcurrency: 4 } },
    );
  }, 120_000);

  afterAll(async () => {
    await ts?.close();
  });

  const hashOf = async (username: string) =>
    (await ts.app.storage.em.fork().findOneOrFail(User, { username })).passwordHash;

  /**
   * `call` every `everyMs` until `username`'s hash was re-made, and twice more: those started
   * in the last check's time before that read the old hash and check their session after it.
   */
  async function staggered(username: string, everyMs: number, call: (i: number) => Promise<unknown>) {
    const old = await hashOf(username);
    const calls: Promise<string>[] = [];
    let after = 0;
    for (let i = 0; i < STAGGERED && after < 3; i++) {
      calls.push(
        call(i).then(
          () => "ok",
          (e: unknown) => ConnectError.from(e).rawMessage,
        ),
      );
      await sleep(everyMs);
      if (after > 0 || (await hashOf(username)) !== old) after++;
    }
    expect(after, "the hash was not re-made").toBeGreaterThan(0);
    return Promise.all(calls);
  }

  /**
   * The calls refused other than for the hash pool's load: on a loaded machine some staggered
   * calls wait past the hash deadline (503, "busy verifying passwords", a fault answered as one),
   * which is not what these tests are about; a refusal of the right password is.
   */
  function refusedByRehash(outcomes: string[]): string[] {
    expect(outcomes, "no call succeeded").toContain("ok");
    return outcomes.filter((o) => o !== "ok" && !o.startsWith("the server is busy verifying passwords"));
  }

  it("Login: concurrent logins of a user whose hash is re-hashed meanwhile all succeed", async () => {
    const users = createClient(UserService, ts.connect());
    // Staggered: the later ones read the old hash before the first login's re-hash, and
    // check their session after it.
    const logins = await staggered("two-devices", 50, () =>
      users.login({ username: "two-devices", password: PASSWORD }),
    );
    expect(refusedByRehash(logins), "a right password was refused by a re-hash of it").toEqual([]);
    const stored = await ts.app.storage.em.fork().findOneOrFail(User, { id: userId });
    expect(parseHash(stored.passwordHash)!.iterations).toBe(NEW_ITERATIONS);
  });

  it("HTTP Basic: concurrent calls making a token with a password re-hashed meanwhile all succeed", async () => {
    const header = `Basic ${Buffer.from(`two-scripts:${PASSWORD}`).toString("base64")}`;
    const tokens = createClient(TokenService, withHeaders(ts.connect(), { authorization: header }));
    const made = await staggered("two-scripts", 250, (i) =>
      tokens.createPersonalAccessToken({ name: `script ${i}` }),
    );
    expect(refusedByRehash(made), "a token made with the right password was refused").toEqual([]);
  });
});

describe.each(DATABASES)("review 2026-12-07, refresh, on $name", (db) => {
  let ts: TestServer;

  beforeAll(async () => {
    ts = await startTestServer(db);
  }, 120_000);

  afterAll(async () => {
    await ts?.close();
  });

  /** Make the database refuse new refresh tokens of `userId` (a write failing mid-refresh), until undone. */
  async function failRefreshInserts(userId: string): Promise<() => Promise<void>> {
    const sql = ts.app.storage.em.getConnection();
    if (db.name === "sqlite") {
      await sql.execute(
        `create trigger review_fail_refresh before insert on refresh_tokens when new.user_id = '${userId}' ` +
          "begin select raise(abort, 'injected write failure'); end",
      );
      return async () => void (await sql.execute("drop trigger review_fail_refresh"));
    }
    await sql.execute(
      "create function review_fail_refresh() returns trigger language plpgsql as " +
        "$$ begin raise exception 'injected write failure'; end $$",
    );
    await sql.execute(
      "create trigger review_fail_refresh before insert on refresh_tokens for each row " +
        `when (new.user_id = '${userId}') execute function review_fail_refresh()`,
    );
    return async () => {
      await sql.execute("drop trigger review_fail_refresh on refresh_tokens");
      await sql.execute("drop function review_fail_refresh()");
    };
  }

  it("a refresh that failed while writing its new token leaves the old one unspent: the retry is no re-use", async () => {
    const plain = ts.connect();
    const admin = clients(plain, await adminLogin(plain));
    const username = `refresher-${short()}`;
    const { user } = await admin.users.createUser({ username, password: "refresher password long" });
    const users = createClient(UserService, plain);
    const login = await users.login({ username, password: "refresher password long" });
    const undo = await failRefreshInserts(user!.id);
    try {
      await expect(users.refreshToken({ refreshToken: login.refreshToken })).rejects.toBeInstanceOf(
        ConnectError,
      );
    } finally {
      await undo();
    }
    // The client retries with the token it still holds, once the database writes again.
    const retried = await users.refreshToken({ refreshToken: login.refreshToken }).then(
      () => "ok",
      (e: unknown) => ConnectError.from(e).rawMessage,
    );
    expect(retried, "a failed write ended the session as a stolen token's re-use").toBe("ok");
  });
});

describe.each(DATABASES)("review 2026-12-07, audit, on $name", (db) => {
  let ts: TestServer;

  beforeAll(async () => {
    ts = await startTestServer(db);
  }, 120_000);

  afterAll(async () => {
    await ts?.close();
  });

  it("audit events written while another request's transaction is open survive its rollback", async () => {
    const action = `review-${short()}`;
    let flushed: Promise<void> | undefined;
    // A request's transaction (a refresh's, say) that fails after its first write, with the
    // audit buffer written in between (its 1 s timer, here asked for directly).
    const rolledBack = ts.app.storage.em.fork().transactional(async (tx) => {
      await tx.nativeUpdate(Tenant, { id: "no such tenant" }, { name: "x" });
      ts.app.audit.record({
        requestId: "review",
        tenantId: null,
        actorOutside: false,
        actorKind: "anonymous",
        actorId: null,
        action,
        outcome: "failure",
        ip: null,
      });
      flushed = ts.app.audit.flush();
      await sleep(100);
      throw new Error("the request failed");
    });
    await expect(rolledBack).rejects.toThrow("the request failed");
    await flushed;
    const rows = await ts.app.storage.em
      .fork()
      .getConnection()
      .execute("select id from audit_events where action = ?", [action]);
    expect(rows, "an audit event was rolled back with another request's transaction").toHaveLength(1);
  });
});
