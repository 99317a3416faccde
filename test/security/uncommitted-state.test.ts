import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { TesseraError } from "../../src/errors.js";
import { writeIfScopesHold } from "../../src/services/common.js";
import { User } from "../../src/storage/entities.js";
import { DATABASES, memoryTransport, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";

/**
 * State the authentication path reads must be committed state: a transaction that re-enables
 * a user and is then rolled back must not admit that user's credential meanwhile. On SQLite
 * the raw reads share the ORM's one connection, and used to see its open transaction's writes.
 */
describe.each(DATABASES)("uncommitted state, on $name", (db) => {
  let ts: TestServer;
  let userId: string;
  let pat: string;

  beforeAll(async () => {
    ts = await startTestServer(db);
    const plain = ts.connect();
    const admin = clients(plain, await adminLogin(plain));
    const username = `dirty-${short()}`;
    const password = "dirty reads password";
    userId = (await admin.users.createUser({ username, password })).user!.id;
    const login = await createClient(UserService, plain).login({ username, password });
    const tokens = createClient(
      TokenService,
      withHeaders(plain, { authorization: `Bearer ${login.accessToken}` }),
    );
    pat = (await tokens.createPersonalAccessToken({ name: "script" })).token;
    await admin.users.updateUser({ id: userId, disabled: true });
  }, 120_000);

  afterAll(async () => {
    await ts?.close();
  });

  /** GetCurrentUser with the disabled user's token: "ok" or the refusal's code. */
  function call(): Promise<string> {
    const users = createClient(UserService, withHeaders(ts.connect(), { authorization: `Bearer ${pat}` }));
    return users.getCurrentUser({}).then(
      () => "ok",
      (e: unknown) => Code[ConnectError.from(e).code]!,
    );
  }

  /** Re-enable the user in a transaction held open for `holdMs` around `during`, then rolled back. */
  async function reenabledThenRolledBack<T>(holdMs: number, during: () => T): Promise<T> {
    let started: T | undefined;
    await expect(
      ts.app.storage.em.fork().transactional(async (tx) => {
        await tx.nativeUpdate(User, { id: userId }, { disabled: false });
        started = during();
        await new Promise((resolve) => setTimeout(resolve, holdMs));
        throw new Error("rolled back");
      }),
    ).rejects.toThrow("rolled back");
    return started as T;
  }

  it("refuses a disabled user's token while a transaction re-enabling the user is open, then rolled back", async () => {
    expect(await call()).toBe("Unauthenticated");
    const during = await reenabledThenRolledBack(300, call);
    expect(await during, "admitted on a re-enable that was rolled back").toBe("Unauthenticated");
  });

  it("refuses the token at every point of a same-turn re-enable that writeIfScopesHold rolls back", async () => {
    // UpdateUser's commit: the write, then the check that the user still holds the scopes
    // checked (here it does not, as after a concurrent promotion), then the rollback. Its
    // statements are awaited, so requests served in the same turn run between them: the
    // token's check starts a few more microtasks later each time, to land in every gap.
    const users = createClient(
      UserService,
      withHeaders(memoryTransport(ts.app), { authorization: `Bearer ${pat}` }),
    );
    const answers = new Set<string>();
    for (let offset = 0; offset < 80; offset += 2) {
      const write = writeIfScopesHold(ts.app.storage.em.fork(), User, userId, "not its scopes", (tx) =>
        tx.nativeUpdate(User, { id: userId }, { disabled: false }),
      ).catch((e: unknown) => (e instanceof TesseraError ? e.reason : e));
      const answer = (async () => {
        for (let i = 0; i < offset; i++) await null;
        return users.getCurrentUser({}).then(
          () => `ok at ${offset}`,
          (e: unknown) => Code[ConnectError.from(e).code]!,
        );
      })();
      expect(await write).toBe("FAILED_PRECONDITION");
      answers.add(await answer);
    }
    expect([...answers], "admitted on a re-enable that was rolled back").toEqual(["Unauthenticated"]);
  });

  it.runIf(db.name === "sqlite")(
    "answers Unavailable with Retry-After when the transaction stays open past the read's bound",
    async () => {
      const users = createClient(UserService, withHeaders(ts.connect(), { authorization: `Bearer ${pat}` }));
      const during = await reenabledThenRolledBack(1_500, () =>
        users.getCurrentUser({}).then(
          () => ({ code: "ok", retryAfter: null }),
          (e: unknown) => {
            const err = ConnectError.from(e);
            return { code: Code[err.code], retryAfter: err.metadata.get("retry-after") };
          },
        ),
      );
      expect(await during).toEqual({ code: "Unavailable", retryAfter: "1" });
      // Once the transaction has ended, the committed state answers.
      expect(await call()).toBe("Unauthenticated");
    },
  );
});
