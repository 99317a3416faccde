import { request } from "node:https";
import { createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { MachineAuthType, MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import type { App } from "../../src/app.js";
import { TOKEN_ID_LENGTH, TOKEN_SECRET_LENGTH } from "../../src/auth/token-format.js";
import { REFRESH_TOKEN_PREFIX } from "../../src/config/auth.js";
import { rejection } from "../errors-util.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  DATABASES,
  startTestServer,
  type TestServer,
  withHeaders,
} from "../helpers.js";
import { basic as basicHeader, basicMachine, bearerMachine, clients, short } from "../machine-fixtures.js";
import { captureLogs } from "./fixtures.js";

/**
 * No secret in any log line. A server logging at `trace`, with the ORM's SQL log on
 * (`database.debug`), goes through a broad set of operations over TLS, failures included
 * (wrong passwords, duplicate usernames lost in a race, control characters, a database
 * fault whose statement carries a hash), while every line it writes (its logger, and the
 * console) is captured. Every secret the test created or read back from the database is
 * then looked for in those lines: passwords, PBKDF2 and SHA-256 hashes, access and refresh
 * tokens, personal access tokens, API keys, machine tokens and passwords, the private
 * signing key.
 */

describe.each(DATABASES)("the logs on $name", (db) => {
  const logs = captureLogs("trace");
  const lines = logs.raw;
  const secrets = new Map<string, string>();
  let ts: TestServer;
  let app: App;
  const keep = (what: string, value: string | undefined) => {
    if (value) secrets.set(value, what);
  };
  /** `user:secret` pairs sent as HTTP Basic: the header holds the secret at an offset, not as its own base64. */
  const pairs = new Map<string, string>();
  const keepPair = (user: string, secret: string) => pairs.set(`${user}:${secret}`, `Basic pair of ${user}`);
  const basic = (user: string, secret: string) => {
    keepPair(user, secret);
    return basicHeader(user, secret);
  };

  beforeAll(async () => {
    for (const level of ["log", "error", "warn", "info", "debug"] as const)
      vi.spyOn(console, level).mockImplementation((...args: unknown[]) => {
        lines.push(args.map((a) => (a instanceof Error ? `${a.message}\n${a.stack}` : String(a))).join(" "));
      });
    ts = await startTestServer(
      db,
      {
        database: { debug: true },
        log: { level: "trace" },
        // Room in the hash pool's queue for the racing CreateUser calls.
        auth: { hashQueue: 32 },
      },
      undefined,
      { logger: logs.logger },
    );
    app = ts.app;
  });
  afterAll(async () => {
    vi.restoreAllMocks();
    await ts?.close();
  });

  const grpc = (): Transport => ts.grpc();
  const connect = (): Transport => ts.connect();

  it("holds no password, hash or token created or used through the API", async () => {
    keep("admin password", ADMIN_PASSWORD);
    keep("master key", app.config.auth.masterKey);
    const anonymous = createClient(UserService, connect());
    const admin = await anonymous.login({ username: "admin", password: ADMIN_PASSWORD });
    keep("access token", admin.accessToken);
    keep("refresh token", admin.refreshToken);
    const root = clients(grpc(), admin.accessToken);

    // Users: a creation, a race lost to a unique constraint, logins right and wrong.
    const username = `log-${short()}`;
    const password = `first password ${short()}`;
    keep("user password", password);
    const racers = Array.from({ length: 4 }, (_, i) => `racing password ${i} ${short()}`);
    for (const p of racers) keep("racing password", p);
    const created = await Promise.allSettled(
      racers.map((p) => root.users.createUser({ username, password: p, scopes: ["admin:users"] })),
    );
    expect(created.filter((o) => o.status === "fulfilled")).toHaveLength(1);
    const racerPassword = racers[created.findIndex((o) => o.status === "fulfilled")]!;
    await rejection(anonymous.login({ username, password: `${racerPassword}x` }));
    const session = await anonymous.login({ username, password: racerPassword });
    keep("access token", session.accessToken);
    keep("refresh token", session.refreshToken);
    const refreshed = await anonymous.refreshToken({ refreshToken: session.refreshToken });
    keep("access token", refreshed.accessToken);
    keep("refresh token", refreshed.refreshToken);
    // Reuse of a spent refresh token (detection revokes the family).
    await rejection(anonymous.refreshToken({ refreshToken: session.refreshToken }));
    const again = await anonymous.login({ username, password: racerPassword });
    keep("access token", again.accessToken);
    const changed = `changed password ${short()}`;
    keep("changed password", changed);
    await clientFor(UserService, connect(), again.accessToken).changePassword({
      currentPassword: racerPassword,
      newPassword: changed,
    });
    await rejection(
      clientFor(UserService, connect(), again.accessToken).changePassword({
        currentPassword: "not the current one",
        newPassword: "whatever new password",
      }),
    );
    const reset = `reset password ${short()}`;
    keep("reset password", reset);
    const { users } = await root.users.listUsers({});
    const target = users.find((u) => u.username === username)!;
    await root.users.updateUser({ id: target.id, password: reset });
    await rejection(clients(connect(), basic(username, "a wrong basic password")).users.getCurrentUser({}));
    await clients(connect(), basic(username, reset)).users.getCurrentUser({});
    await anonymous.logout({ refreshToken: refreshed.refreshToken });
    // Control characters, refused before the database.
    await rejection(anonymous.login({ username: `${username}\u0000`, password: reset }));

    // Personal access tokens and API keys, used as bearer and as X-API-Key.
    const tokens = clientFor(TokenService, grpc(), admin.accessToken);
    const pat = await tokens.createPersonalAccessToken({ name: "log scan", scopes: ["admin:users"] });
    keep("personal access token", pat.token);
    const key = await tokens.createApiKey({ name: "log scan", scopes: ["admin:users"] });
    keep("API key", key.key);
    await clientFor(UserService, connect(), pat.token).getCurrentUser({});
    await createClient(UserService, withHeaders(connect(), { "x-api-key": key.key })).getCurrentUser({});
    await rejection(clientFor(UserService, connect(), `${pat.token.slice(0, -4)}AAAA`).getCurrentUser({}));

    // Machine users: bearer and Basic, a rotation, a minted access token, a NUL version.
    const { tenant } = await root.tenants.createTenant({ name: `tenant-${short()}` });
    const { application } = await root.tenants.createApplication({ tenantId: tenant!.id, name: "app" });
    const bearer = await bearerMachine(grpc(), admin.accessToken, [application!.id], {
      tenantId: tenant!.id,
    });
    keep("machine token", bearer.token);
    const basicOne = await basicMachine(grpc(), admin.accessToken, [application!.id], {
      tenantId: tenant!.id,
    });
    keep("machine password", basicOne.password);
    const rotated = await root.machines.rotateMachineUserCredentials({ id: bearer.machine.id });
    keep("rotated machine token", rotated.token);
    const asMachine = clientFor(MachineUserService, connect(), rotated.token);
    const minted = await asMachine.issueAccessToken({});
    keep("machine access token", minted.accessToken);
    await clients(connect(), basic(basicOne.username, basicOne.password)).machines.checkAuthentication({});
    await rejection(
      clients(connect(), basic(basicOne.username, "wrong machine password")).machines.checkAuthentication({}),
    );
    await rejection(
      asMachine.registerBackend({
        callbackUrl: "https://backend.example.org/cb",
        version: "1\u0000",
        applicationId: application!.id,
      }),
    );

    // Verification for other services: every kind of credential submitted in a request body
    // (VerifyCredential over both protocols, and /oauth2/introspect), valid and not.
    const verifier = await root.machines.createMachineUser({
      name: `verifier-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    keep("verifier machine token", verifier.token);
    keepPair(basicOne.username, basicOne.password);
    keepPair(basicOne.username, "not its password");
    const basicPair = `Basic ${Buffer.from(`${basicOne.username}:${basicOne.password}`).toString("base64")}`;
    keep("Basic pair", basicPair);
    // The scan's offset forms find a secret inside a Basic header, whatever its username's length.
    expect(encodings(basicOne.password).some((form) => basicPair.includes(form))).toBe(true);
    const submitted = [
      pat.token,
      key.key,
      session.accessToken,
      rotated.token,
      minted.accessToken,
      basicPair,
      `${pat.token.slice(0, -4)}AAAA`,
      `Basic ${Buffer.from(`${basicOne.username}:not its password`).toString("base64")}`,
    ];
    for (const transport of [grpc(), connect()]) {
      const verification = clientFor(VerificationService, transport, verifier.token);
      for (const credential of submitted) await verification.verifyCredential({ credential });
    }
    for (const credential of submitted) {
      const res = await postForm(
        ts,
        "/oauth2/introspect",
        { token: credential },
        bearerHeader(verifier.token),
      );
      expect(res.status).toBe(200);
    }

    // The OAuth 2.0 token and revocation endpoints: a client secret in the body
    // (client_secret_post) and in a header, a wrong one, issued tokens, a refresh token spent
    // and one revoked. Each request writes an access line (checked below), none with a secret.
    const issued = await postForm(ts, "/oauth2/token", {
      grant_type: "client_credentials",
      client_id: basicOne.username,
      client_secret: basicOne.password,
    });
    expect(issued.status).toBe(200);
    keep("OAuth access token", issued.json.access_token as string | undefined);
    const byHeader = await postForm(
      ts,
      "/oauth2/token",
      { grant_type: "client_credentials" },
      basic(basicOne.username, basicOne.password),
    );
    keep("OAuth access token", byHeader.json.access_token as string | undefined);
    const wrongSecret = "wrong OAuth client secret";
    keep("wrong client secret", wrongSecret);
    expect(
      (
        await postForm(ts, "/oauth2/token", {
          grant_type: "client_credentials",
          client_id: basicOne.username,
          client_secret: wrongSecret,
        })
      ).status,
    ).toBe(401);
    const oauthSession = await anonymous.login({ username: "admin", password: ADMIN_PASSWORD });
    keep("access token", oauthSession.accessToken);
    keep("refresh token", oauthSession.refreshToken);
    const refreshedByOAuth = await postForm(ts, "/oauth2/token", {
      grant_type: "refresh_token",
      refresh_token: oauthSession.refreshToken,
    });
    expect(refreshedByOAuth.status).toBe(200);
    keep("OAuth access token", refreshedByOAuth.json.access_token as string | undefined);
    keep("OAuth refresh token", refreshedByOAuth.json.refresh_token as string | undefined);
    const revoked = await postForm(
      ts,
      "/oauth2/revoke",
      { token: refreshedByOAuth.json.refresh_token as string },
      bearerHeader(refreshedByOAuth.json.access_token as string),
    );
    expect(revoked.status).toBe(200);

    // Secrets where the endpoints refuse them: in the URL's query, in a form the parser
    // refuses (a control character), under the wrong content type, in a Basic header without
    // its colon, in an Authorization scheme Tessera does not know.
    const misplaced = `misplaced secret ${short()}`;
    keep("misplaced secret", misplaced);
    const query = new URLSearchParams({ client_id: basicOne.username, client_secret: misplaced }).toString();
    for (const [path, fields, headers] of [
      [`/oauth2/token?grant_type=client_credentials&${query}`, { grant_type: "client_credentials" }, {}],
      [
        `/oauth2/introspect?token=${encodeURIComponent(misplaced)}`,
        { token: "x" },
        bearerHeader(verifier.token),
      ],
      [
        "/oauth2/token",
        {
          grant_type: "client_credentials",
          client_id: basicOne.username,
          client_secret: `${misplaced}\u0001`,
        },
        {},
      ],
      [
        "/oauth2/token",
        { grant_type: "client_credentials", client_secret: misplaced },
        { "content-type": "text/plain" },
      ],
      [
        "/oauth2/revoke",
        { token: "x" },
        { authorization: `Basic ${Buffer.from(misplaced).toString("base64")}` },
      ],
      ["/oauth2/revoke", { token: "x" }, { authorization: `Digest ${misplaced}` }],
    ] as [string, Record<string, string>, Record<string, string>][]) {
      const res = await postForm(ts, path, fields, headers);
      expect(res.status, path).toBeGreaterThanOrEqual(400);
    }
    await rejection(
      createClient(
        UserService,
        withHeaders(connect(), { authorization: `Digest ${misplaced}` }),
      ).getCurrentUser({}),
    );

    // A database fault whose statement carries a secret's hash: the write of a new API key
    // fails (its table is gone), and the unexpected error is logged.
    await app.sql.run("drop table api_tokens", []);
    const lost = await rejection(tokens.createApiKey({ name: "after the fault", scopes: [] }));
    expect(lost.reason).toBe("INTERNAL");

    // Hashes as stored.
    for (const row of await app.sql.all<{ h: string }>("select password_hash as h from users", []))
      keep("user password hash", row.h);
    for (const row of await app.sql.all<{ h: string }>("select token_hash as h from refresh_tokens", []))
      keep("refresh token hash", row.h);
    for (const row of await app.sql.all<{ h: string }>(
      "select secret_hash as h from machine_credentials",
      [],
    ))
      keep("machine secret hash", row.h);
    for (const row of await app.sql.all<{ k: string }>("select private_jwk as k from signing_keys", [])) {
      keep("private signing key", row.k);
      try {
        keep("private signing key (d)", (JSON.parse(row.k) as { d?: string }).d);
      } catch {
        // Encrypted at rest: the column itself is what must not appear.
      }
    }

    // What was captured: the ORM's SQL and the failure were logged, so the scan saw them.
    const log = lines.join("\n");
    expect(log).toMatch(/insert into/i);
    for (const endpoint of ["POST /oauth2/token", "POST /oauth2/revoke", "POST /oauth2/introspect"])
      expect(log).toContain(`"method":"${endpoint}"`);
    expect(log).toMatch(/request failed/);
    expect(secrets.size).toBeGreaterThan(20);
    const found = [...secrets].filter(([value]) => log.includes(value)).map(([, what]) => what);
    expect(found).toEqual([]);
    // Nor in another form: encoded (base64 as in a Basic header, base64url, percent-encoding as
    // in a URL or a form, hex), or a token's secret part without its prefix and id.
    const encoded = [...secrets].flatMap(([value, what]) =>
      encodings(value).map((e) => [e, `${what} (encoded)`] as const),
    );
    expect(encoded.filter(([form]) => log.includes(form)).map(([, what]) => what)).toEqual([]);
    // Nor a Basic header's credentials: each pair sent, and any secret at an offset in one.
    expect(pairs.size).toBeGreaterThan(4);
    const paired = [...pairs].flatMap(([pair, what]) => {
      const bytes = Buffer.from(pair, "utf8");
      return [bytes.toString("base64").replace(/=+$/, ""), bytes.toString("base64url")].map(
        (f) => [f, what] as const,
      );
    });
    expect(paired.filter(([form]) => log.includes(form)).map(([, what]) => what)).toEqual([]);
    // No PBKDF2 hash of any kind, including ones never stored (a racer's that lost).
    expect(log).not.toMatch(/pbkdf2-sha256\$/);
  });
});

const bearerHeader = (token: string) => ({ authorization: `Bearer ${token}` });

/** POST a form to one of the OAuth endpoints; resolves with the status and the JSON answer. */
function postForm(
  ts: TestServer,
  path: string,
  fields: Record<string, string>,
  headers: Record<string, string> = {},
): Promise<{ status: number; json: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = request(
      `${ts.server.url}${path}`,
      {
        method: "POST",
        ca: ts.certs.ca,
        agent: false,
        headers: { "content-type": "application/x-www-form-urlencoded", ...headers },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          resolve({ status: res.statusCode ?? 0, json: text ? JSON.parse(text) : {} });
        });
      },
    );
    req.on("error", reject);
    req.end(new URLSearchParams(fields).toString());
  });
}

/**
 * The forms other than itself a secret could be written in: base64 and base64url (a Basic
 * header's, at any of the three offsets a `user:` before it gives, a cookie's), percent-encoding (a URL's query, a form body), hex; for one of
 * Tessera's opaque tokens also its secret part alone (after the prefix and the public id).
 */
function encodings(value: string): string[] {
  const bytes = Buffer.from(value, "utf8");
  const forms = new Set([
    bytes.toString("base64").replace(/=+$/, ""),
    bytes.toString("base64url"),
    encodeURIComponent(value),
    new URLSearchParams({ v: value }).toString().slice(2),
    bytes.toString("hex"),
  ]);
  // After a `user:` of any length (a Basic header): the secret's base64 shifted by one or two
  // bytes, from the first group made of its bytes alone to the last whole one.
  for (const shift of [1, 2]) {
    const shifted = Buffer.concat([Buffer.alloc(shift), bytes]).toString("base64");
    const whole = Math.floor((shift + bytes.length) / 3) * 4;
    forms.add(shifted.slice(4, whole));
  }
  const opaque = /^tsr_(?:pat|key|mu)_([A-Za-z0-9_-]+)$/.exec(value);
  if (opaque) forms.add(opaque[1]!.slice(TOKEN_ID_LENGTH, TOKEN_ID_LENGTH + TOKEN_SECRET_LENGTH));
  if (value.startsWith(REFRESH_TOKEN_PREFIX)) forms.add(value.slice(REFRESH_TOKEN_PREFIX.length));
  // Short forms (a 12-character password's hex is 24) could only match by chance in a long log.
  return [...forms].filter((f) => f !== value && f.length >= 16);
}
