import { randomBytes } from "node:crypto";
import { ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  createTestCerts,
  dropSchema,
  POSTGRES,
  TEST_MASTER_KEY,
} from "../helpers.js";
import { transportTo } from "./fixtures.js";
import { killAll, serve, serveEnv, stop } from "./processes.js";

/**
 * A master key rotated the way the README says, one instance at a time: the first instance
 * restarted with the new key (and the old one in TESSERA_PREVIOUS_MASTER_KEYS) reseals the
 * signing keys at its start; the instances still running with the old key only must go on
 * signing with the keys they already hold (the key material is the same, only its envelope
 * changed) until they are restarted in turn.
 */

const NEW_KEY = randomBytes(32).toString("base64");
const url = POSTGRES.url();
const children: Awaited<ReturnType<typeof serve>>["child"][] = [];
let ta: Transport;
let tb: Transport;

beforeAll(async () => {
  const certs = await createTestCerts();
  // A rotates (a key every 6 s, published 2 s ahead); B, started later, would only in a day:
  // the key of A's next rotation is sealed under the old master key.
  const a = await serve(
    serveEnv(url, certs.dir, {
      TESSERA_JWT_KEY_ROTATION_INTERVAL: "6",
      TESSERA_JWT_KEY_PRE_PUBLICATION: "2",
    }),
  );
  children.push(a.child);
  ta = transportTo(a.url, certs);
  // The first login on A before B reseals: A has opened the signing key.
  await createClient(UserService, ta).login({ username: "admin", password: ADMIN_PASSWORD });
  const b = await serve(
    serveEnv(url, certs.dir, { TESSERA_MASTER_KEY: NEW_KEY, TESSERA_PREVIOUS_MASTER_KEYS: TEST_MASTER_KEY }),
  );
  children.push(b.child);
  tb = transportTo(b.url, certs);
});

afterAll(async () => {
  for (const c of children) await stop(c);
  killAll();
  await dropSchema(url);
});

describe("a master key rotated one instance at a time", () => {
  /** A login on `mine` ("ok" or its error) and, when it succeeded, its token used on `other`. */
  async function signsAndVerifies(mine: Transport, other: Transport): Promise<string> {
    try {
      const login = await createClient(UserService, mine).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      });
      return (await clientFor(UserService, other, login.accessToken).getCurrentUser({})).username;
    } catch (e) {
      return ConnectError.from(e).message;
    }
  }

  it("leaves an instance still on the old key signing, and its tokens verified on the new one", async () => {
    // Past A's key refresh (500 ms; the reseal is also announced at once): A has read the resealed rows.
    await new Promise((r) => setTimeout(r, 1_500));
    expect(await signsAndVerifies(ta, tb)).toBe("admin");
    expect(await signsAndVerifies(tb, ta)).toBe("admin");
  });

  it("lets an instance on the new key sign with a key one still on the old key created meanwhile", async () => {
    // A's rotations go on: past two of them, the signing key is one A sealed under the old master key.
    await new Promise((r) => setTimeout(r, 13_000));
    expect(await signsAndVerifies(tb, ta)).toBe("admin");
    expect(await signsAndVerifies(ta, tb)).toBe("admin");
  });
});
