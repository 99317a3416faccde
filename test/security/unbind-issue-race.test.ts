import { X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { Agent, request } from "undici";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType, MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { createClientCertificate } from "../../src/certs/dev-ca.js";
import { rejection } from "../errors-util.js";
import {
  createTestCerts,
  DATABASES,
  POSTGRES,
  pinnableClock,
  startTestServer,
  type TestServer,
} from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";
import { aSecondAhead, signingAfter } from "./fixtures.js";

/**
 * UnbindCertificate ends the access tokens the certificate obtained (their cut-off is the
 * unbinding's second). An IssueAccessToken whose certificate was authenticated before the
 * unbinding committed, and that reads the machine user after it, waits out the cut-off's
 * second (it never issues in a rotation's second) and so signed a token after it: bound to a
 * certificate no longer bound, it authenticated for its whole lifetime. The interleaving is
 * forced, not hoped for: the test's hook on the per-principal limiter (counted after
 * authentication, before the handler) runs the whole unbinding (committed) first.
 * The binding is checked after the signature, and the unbinding's cut-off raised to its
 * commit's second: hooks on the signing (an unbinding committed just before it, the next
 * second begun) and on the machine user's row (a commit held back while a token is signed
 * in the next second, PostgreSQL) force the two interleavings left.
 */
describe.each(DATABASES)("an unbinding racing the certificate's IssueAccessToken ($name)", (db) => {
  let ts: TestServer;
  let admin: ReturnType<typeof clients>;
  let tenantId: string;
  const clock = pinnableClock();

  beforeAll(async () => {
    // Rate limits on: the per-principal count is where the hook sits.
    ts = await startTestServer(
      db,
      { server: { mtls: "optional" }, rateLimit: { enabled: true } },
      await createTestCerts("unused"),
      { clock: clock.now },
    );
    admin = clients(over(), await adminLogin(over()));
    tenantId = (await admin.tenants.createTenant({ name: `race-${short()}` })).tenant!.id;
  });
  afterAll(async () => {
    await ts?.close();
  });
  afterEach(() => clock.release());

  function over(folder?: { cert: Buffer; key: Buffer }): Transport {
    return createConnectTransport({
      baseUrl: ts.server.url,
      httpVersion: "2",
      nodeOptions: { ca: ts.certs.ca, ...(folder ? { cert: folder.cert, key: folder.key } : {}) },
    });
  }

  /** A machine user with a certificate of its own bound, and its clients over that certificate. */
  async function boundCertificate() {
    const mu = (
      await admin.machines.createMachineUser({
        tenantId,
        name: `raced-${short()}`,
        authType: MachineAuthType.BEARER,
      })
    ).machineUser!;
    const out = join(mkdtempSync(join(tmpdir(), "tessera-backend-")), "raced");
    await createClientCertificate(ts.certs.dir, "raced", out);
    const folder = {
      cert: readFileSync(join(out, "client.crt")),
      key: readFileSync(join(out, "client.key")),
    };
    const fingerprint = new X509Certificate(folder.cert).fingerprint256.replace(/:/g, "").toLowerCase();
    const { binding } = await admin.machines.bindCertificate({
      machineUserId: mu.id,
      identity: { case: "sha256Fingerprint", value: fingerprint },
    });
    const withCert = over(folder);
    const machines = createClient(MachineUserService, withCert);
    return { mu, binding: binding!, folder, withCert, machines };
  }

  /** The outcome of IssueAccessToken: the token, or the error. */
  function issue(machines: ReturnType<typeof createClient<typeof MachineUserService>>) {
    return machines.issueAccessToken({}).then(
      (r): string | ConnectError => r.accessToken,
      (e: unknown) => ConnectError.from(e),
    );
  }

  /** Whether `token` authenticates a call now, over the certificate's connection. */
  async function works(withCert: Transport, token: string): Promise<boolean> {
    try {
      await clients(withCert, token).machines.checkAuthentication({});
      return true;
    } catch (err) {
      expect((await rejection(Promise.reject(err))).reason).toBe("TOKEN_REVOKED");
      return false;
    }
  }

  it("issues no token that outlives an unbinding committed after the certificate authenticated", async () => {
    const { mu, binding, withCert, machines } = await boundCertificate();

    // The hook: the certificate's IssueAccessToken, authenticated and counted, first lets the
    // unbinding run to its commit.
    const limiter = ts.app.limits!.perPrincipal;
    const consume = limiter.consume.bind(limiter);
    const consumeNow = limiter.consumeNow.bind(limiter);
    // Admission counts in memory synchronously (consumeNow); answering "not now" for this
    // machine user sends its count through consume, where the hook waits.
    limiter.consumeNow = (key: string) => (key === `machine:${mu.id}` ? undefined : consumeNow(key));
    let unbound = false;
    limiter.consume = async (key: string) => {
      if (key === `machine:${mu.id}`) {
        limiter.consume = consume;
        await admin.machines.unbindCertificate({
          machineUserId: mu.id,
          identity: { case: "bindingId", value: binding.id },
        });
        unbound = true;
      }
      return consume(key);
    };
    let outcome: string | ConnectError;
    try {
      outcome = await machines.issueAccessToken({}).then(
        (r) => r.accessToken,
        (e: unknown) => ConnectError.from(e),
      );
    } finally {
      limiter.consume = consume;
      limiter.consumeNow = consumeNow;
    }
    expect(unbound).toBe(true);
    // A token issued anyway must at least authenticate nothing (it did, for its lifetime).
    if (typeof outcome === "string")
      expect((await rejection(clients(withCert, outcome).machines.checkAuthentication({}))).reason).toBe(
        "TOKEN_REVOKED",
      );
    // Refused: the certificate it would be bound to is no longer bound.
    expect(outcome).toBeInstanceOf(ConnectError);
    expect((await rejection(Promise.reject(outcome))).reason).toBe("TOKEN_REVOKED");
  });

  /** POST /oauth2/token, client_credentials over the certificate: the token, or the status and error. */
  async function grant(folder: {
    cert: Buffer;
    key: Buffer;
  }): Promise<string | { status: number; error: string }> {
    const agent = new Agent({ connect: { ca: ts.certs.ca, cert: folder.cert, key: folder.key } });
    try {
      const res = await request(`${ts.server.url}/oauth2/token`, {
        method: "POST",
        dispatcher: agent,
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: "grant_type=client_credentials",
      });
      const body = (await res.body.json()) as { access_token?: string; error?: string };
      return res.statusCode === 200 ? body.access_token! : { status: res.statusCode, error: body.error! };
    } finally {
      await agent.close();
    }
  }

  it.each(["IssueAccessToken", "the client_credentials grant"] as const)(
    "refuses through %s a token signed in a later second than an unbinding that committed after the binding was last read",
    async (way) => {
      const { mu, binding, folder, withCert, machines } = await boundCertificate();
      const second = aSecondAhead();
      clock.pin(second);
      // The hook: just before the signature, the unbinding commits (its cut-off in this second),
      // and the next second begins; the token's iat is then past the cut-off.
      const { outcome, ran: unbound } = await signingAfter(
        ts,
        mu.id,
        async () => {
          await admin.machines.unbindCertificate({
            machineUserId: mu.id,
            identity: { case: "bindingId", value: binding.id },
          });
          clock.pin(second + 1000);
        },
        (): Promise<string | ConnectError | { status: number; error: string }> =>
          way === "IssueAccessToken" ? issue(machines) : grant(folder),
      );
      expect(unbound).toBe(true);
      if (typeof outcome === "string")
        expect(await works(withCert, outcome), "a token signed after the unbinding authenticated").toBe(
          false,
        );
      if (way === "IssueAccessToken") {
        expect(outcome).toBeInstanceOf(ConnectError);
        expect((await rejection(Promise.reject(outcome))).reason).toBe("TOKEN_REVOKED");
      } else expect(outcome).toEqual({ status: 400, error: "invalid_grant" });
    },
  );

  // SQLite has one connection: a check made while an unbinding is uncommitted waits for its end
  // or sees its deletion. PostgreSQL reads what was committed, so the check can miss it.
  it.skipIf(db !== POSTGRES)(
    "ends a token signed in a later second than the cut-off while the unbinding's commit was on its way",
    async () => {
      const { mu, binding, withCert, machines } = await boundCertificate();
      const second = aSecondAhead();
      clock.pin(second);
      // The hook: a transaction of the test's holds the machine user's row, so the unbinding,
      // its binding deleted and its cut-off read (this second), waits to write it.
      const knex = ts.app.storage.em.getConnection().getKnex();
      let holder = 0;
      let release!: () => void;
      const released = new Promise<void>((resolve) => {
        release = resolve;
      });
      let held!: () => void;
      const holding = new Promise<void>((resolve) => {
        held = resolve;
      });
      const hold = knex.transaction(async (trx) => {
        holder = (await trx.raw("select pg_backend_pid() as pid")).rows[0].pid;
        await trx.raw("select id from machine_users where id = ? for update", [mu.id]);
        held();
        await released;
      });
      await holding;
      const unbinding = admin.machines.unbindCertificate({
        machineUserId: mu.id,
        identity: { case: "bindingId", value: binding.id },
      });
      try {
        await expect
          .poll(
            async () =>
              (
                await knex.raw(
                  "select count(*)::int as n from pg_stat_activity where ?::int = any(pg_blocking_pids(pid))",
                  [holder],
                )
              ).rows[0].n,
          )
          .toBe(1);
        // The next second: the certificate's token is signed in it, and its check after the
        // signature still sees the binding (the deletion is not committed).
        clock.pin(second + 1000);
        const outcome = await issue(machines);
        expect(typeof outcome, "the binding was still committed when the token was checked").toBe("string");
        release();
        await hold;
        await unbinding;
        expect(
          await works(withCert, outcome as string),
          "a token signed before the unbinding's commit outlived it",
        ).toBe(false);
      } finally {
        release();
        await hold;
        await unbinding.catch(() => undefined);
      }
    },
  );
});
