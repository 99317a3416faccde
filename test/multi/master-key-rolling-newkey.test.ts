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
 * The other half of test/multi/master-key-rolling.test.ts: during a rolling master-key
 * rotation the signing-key rotations are won by an instance already on the new key (B).
 * The instance still on the old key (A) must open those keys and sign with them once they
 * activate; it answered Unavailable "no signing key available" on every Login when they were
 * sealed under the new key only.
 */

const NEW_KEY = randomBytes(32).toString("base64");
const url = POSTGRES.url();
const children: Awaited<ReturnType<typeof serve>>["child"][] = [];
let ta: Transport;
let tb: Transport;

beforeAll(async () => {
  const certs = await createTestCerts();
  // A would rotate only in a day; B rotates every 6 s (published 2 s ahead).
  const a = await serve(serveEnv(url, certs.dir));
  children.push(a.child);
  ta = transportTo(a.url, certs);
  const b = await serve(
    serveEnv(url, certs.dir, {
      TESSERA_MASTER_KEY: NEW_KEY,
      TESSERA_PREVIOUS_MASTER_KEYS: TEST_MASTER_KEY,
      TESSERA_JWT_KEY_ROTATION_INTERVAL: "6",
      TESSERA_JWT_KEY_PRE_PUBLICATION: "2",
    }),
  );
  children.push(b.child);
  tb = transportTo(b.url, certs);
});

afterAll(async () => {
  for (const c of children) await stop(c);
  killAll();
  await dropSchema(url);
});

/** A login on `mine` ("admin", or its error) whose token is then used on `other`. */
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

describe("a master key rotated one instance at a time, signing keys rotated by the new instance", () => {
  it("leaves the instance still on the old key signing with the keys the new one created", async () => {
    // Past two of B's rotations: the signing key is one B created while A still runs.
    await new Promise((r) => setTimeout(r, 13_000));
    expect(await signsAndVerifies(ta, tb)).toBe("admin");
    expect(await signsAndVerifies(tb, ta)).toBe("admin");
  });
});
