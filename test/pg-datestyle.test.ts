import { randomBytes } from "node:crypto";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { initORM } from "../src/storage/orm.js";
import { clientFor, DATABASES, POSTGRES, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";

/**
 * A PostgreSQL database whose default DateStyle is not ISO (`alter database … set datestyle`,
 * taken by every new session): timestamps come back as text, which Tessera reads as ISO. In
 * another style a revoked_at read as none.
 */
describe.runIf(DATABASES.includes(POSTGRES))(
  "PostgreSQL with a database default DateStyle 'SQL, DMY'",
  () => {
    const name = `t_dmy_${randomBytes(4).toString("hex")}`;
    const base = new URL(POSTGRES.url());
    base.searchParams.delete("schema");
    const url = new URL(base);
    url.pathname = `/${name}`;
    url.searchParams.set("schema", "s");
    const servers: TestServer[] = [];
    const start = async () => {
      const ts = await startTestServer({ name: "postgres", url: () => url.toString() });
      servers.push(ts);
      return ts;
    };

    const admin = async (sql: string) => {
      const storage = await initORM({ url: base.toString(), migrate: false });
      try {
        await storage.em.getConnection().execute(sql);
      } finally {
        await storage.close();
      }
    };

    beforeAll(async () => {
      await admin(`create database ${name}`);
    });
    afterAll(async () => {
      try {
        for (const s of servers) await s.close();
      } finally {
        await admin(`drop database if exists ${name} with (force)`);
      }
    });

    it("refuses a revoked personal access token, and logs in", async () => {
      const first = await start();
      const plain = first.connect();
      const root = clients(plain, await adminLogin(plain));
      const username = `u-${short()}`;
      await root.users.createUser({ username, password: "user password long", scopes: [] });
      const login = await createClient(UserService, plain).login({
        username,
        password: "user password long",
      });
      const tokens = clientFor(TokenService, plain, login.accessToken);
      const pat = await tokens.createPersonalAccessToken({ name: "dmy" });
      await tokens.revokePersonalAccessToken({ id: pat.id });
      await first.close();
      servers.pop();

      await admin(`alter database ${name} set datestyle = 'SQL, DMY'`);
      const second = await start();
      const transport = second.connect();
      const err = await clientFor(TokenService, transport, pat.token)
        .listPersonalAccessTokens({})
        .then(
          () => "admitted",
          (e: unknown) => e,
        );
      expect(err instanceof ConnectError ? Code[err.code] : err).toBe("Unauthenticated");
      await adminLogin(transport);
    });
  },
);
