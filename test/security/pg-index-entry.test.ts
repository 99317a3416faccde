import { randomInt } from "node:crypto";
import { Code, ConnectError, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createTestCerts, dropSchema, POSTGRES } from "../helpers.js";
import { adminLogin, bearerMachine, clients, tenantWithAdmin } from "../machine-fixtures.js";
import { transportTo } from "../multi/fixtures.js";
import { killAll, serve, serveEnv, stop } from "../multi/processes.js";

/**
 * A value within its field's bound in characters can still be too long in bytes for a
 * PostgreSQL index entry (a btree holds at most 2,704 bytes): 2,048 CJK characters are
 * about 6 KB in UTF-8. The database refuses the insert with SQLSTATE 54000
 * (program_limit_exceeded): a client's value the service cannot store, InvalidArgument,
 * never Internal (whose error line a tenant's administrator could have written at will).
 */

const url = POSTGRES.url();
let child: Awaited<ReturnType<typeof serve>>["child"] | undefined;
let t: Transport;

beforeAll(async () => {
  const certs = await createTestCerts();
  const s = await serve(serveEnv(url, certs.dir));
  child = s.child;
  t = transportTo(s.url, certs);
}, 120_000);

afterAll(async () => {
  if (child) await stop(child);
  killAll();
  await dropSchema(url);
});

/** `n` random CJK characters (three bytes each in UTF-8; random, so PostgreSQL cannot compress them into an entry). */
function cjk(n: number): string {
  let s = "";
  for (let i = 0; i < n; i++) s += String.fromCharCode(0x4e00 + randomInt(0x5000));
  return s;
}

describe("a value too large in bytes for a PostgreSQL index entry", () => {
  it("binding a SAN URI of 2,000 multi-byte characters is InvalidArgument, never Internal", async () => {
    const root = await adminLogin(t);
    const tenant = await tenantWithAdmin(t, root);
    const m = await bearerMachine(t, tenant.token, [tenant.application.id]);
    const machines = clients(t, tenant.token).machines;
    const err = await machines
      .bindCertificate({
        machineUserId: m.machine.id,
        identity: { case: "sanUri", value: `spiffe://${cjk(2000)}` },
      })
      .then(
        () => undefined,
        (e: unknown) => ConnectError.from(e),
      );
    expect(err?.code, err?.message).toBe(Code.InvalidArgument);
    // A SAN URI that fits is still bound.
    await machines.bindCertificate({
      machineUserId: m.machine.id,
      identity: { case: "sanUri", value: `spiffe://${cjk(100)}` },
    });
  });
});
