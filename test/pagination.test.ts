import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { App } from "../src/app.js";
import { TesseraError } from "../src/errors.js";
import {
  epochMsKey,
  keysetPage,
  keysetToken,
  listPage,
  pageParams,
  uuidKey,
} from "../src/services/pagination.js";
import { Application } from "../src/storage/machine-entities.js";
import { Code, rejection } from "./errors-util.js";
import { DATABASES, memoryTransport, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short, tenantWithAdmin } from "./machine-fixtures.js";

const tokenOf = (id: string) => Buffer.from(id, "utf8").toString("base64url");

/** The refusal of `fn` as the fields a caller can see. */
async function refusal(
  fn: () => unknown,
): Promise<{ reason: string; message: string; field: string | undefined }> {
  try {
    await fn();
  } catch (err) {
    if (!(err instanceof TesseraError)) throw err;
    return { reason: err.reason, message: err.message, field: err.metadata.field };
  }
  throw new Error("expected a refusal");
}

describe("keyset page tokens", () => {
  const id = "0f8fad5b-d9cb-469f-a165-70867728950e";

  it("keep the formats already handed out: an id's base64url, and the audit log's time.id", () => {
    expect(keysetToken(uuidKey).encode([id])).toBe(tokenOf(id));
    expect(keysetToken(uuidKey).decode(tokenOf(id))).toEqual([id]);
    const audit = keysetToken(epochMsKey, uuidKey);
    const issued = tokenOf(`1733390000123.${id}`);
    expect(audit.decode(issued)).toEqual([1733390000123, id]);
    expect(audit.encode([1733390000123, id])).toBe(issued);
  });

  it("refuse a token of the wrong shape as INVALID_ARGUMENT on page_token", async () => {
    const audit = keysetToken(epochMsKey, uuidKey);
    for (const text of [
      id,
      `x.${id}`,
      `1.${id}.1`,
      `1.${id.toUpperCase()}`,
      `12345678901234567.${id}`,
      `-1.${id}`,
      `1.`,
      "",
    ]) {
      expect(await refusal(() => audit.decode(tokenOf(text))), text).toMatchObject({
        reason: "INVALID_ARGUMENT",
        field: "page_token",
      });
    }
  });

  it("cut a page read with one row more than the limit, with the next page's token only when one follows", () => {
    const token = keysetToken(epochMsKey, uuidKey);
    const rows = [1, 2, 3].map((at) => ({ at, id }));
    const full = keysetPage(rows, 2, token, (r) => [r.at, r.id]);
    expect(full.items).toEqual(rows.slice(0, 2));
    expect(token.decode(full.nextPageToken)).toEqual([2, id]);
    const last = keysetPage(rows.slice(0, 2), 2, token, (r) => [r.at, r.id]);
    expect(last.items).toEqual(rows.slice(0, 2));
    expect(last.nextPageToken).toBe("");
  });
});

describe.each(DATABASES)("keyset pagination on $name", (db) => {
  let ts: TestServer;
  let app: App;
  let root: string;
  /** Tenant A with 5 applications, tenant B with 4 (ids ascending). */
  const apps: Record<"a" | "b", string[]> = { a: [], b: [] };
  let tenants: Record<"a" | "b", Awaited<ReturnType<typeof tenantWithAdmin>>>;

  beforeAll(async () => {
    ts = await startTestServer(db);
    app = ts.app;
    root = await adminLogin(memoryTransport(app));
    const make = async (extra: number) => {
      const t = await tenantWithAdmin(memoryTransport(app), root, ["admin:tenants", "admin:users"]);
      const ids = [t.application.id];
      for (let i = 0; i < extra; i++) {
        const { application } = await clients(memoryTransport(app), root).tenants.createApplication({
          tenantId: t.tenant.id,
          name: `app-${short()}`,
        });
        ids.push(application!.id);
      }
      return { t, ids: ids.sort() };
    };
    const a = await make(4);
    const b = await make(3);
    tenants = { a: a.t, b: b.t };
    apps.a = a.ids;
    apps.b = b.ids;
  });
  afterAll(async () => {
    await ts?.close();
  });

  /** Every page of tenant `t`'s applications at `size` rows a page. */
  async function pages(t: "a" | "b", size: number) {
    const out: { ids: string[]; next: string; total: number }[] = [];
    let token = "";
    do {
      const page = await listPage(
        app.storage.em.fork(),
        Application,
        { tenantId: tenants[t].tenant.id },
        pageParams(size, token),
      );
      out.push({ ids: page.items.map((x) => x.id), next: page.nextPageToken, total: page.totalSize });
      token = page.nextPageToken;
      expect(out.length).toBeLessThan(10);
    } while (token);
    return out;
  }

  it("pages in id order, each row once, and ends with a short page and no token", async () => {
    const got = await pages("a", 2);
    expect(got.map((p) => p.ids.length)).toEqual([2, 2, 1]);
    expect(got.flatMap((p) => p.ids)).toEqual(apps.a);
    expect(got.map((p) => p.total)).toEqual([5, 5, 5]);
    expect(got[2]!.next).toBe("");
  });

  it("ends a list whose size is a multiple of the page size with an empty page and no token", async () => {
    const got = await pages("b", 2);
    expect(got.map((p) => p.ids.length)).toEqual([2, 2, 0]);
    expect(got.flatMap((p) => p.ids)).toEqual(apps.b);
    expect(got[1]!.next).toBe(tokenOf(apps.b[3]!));
    expect(got[2]!.next).toBe("");
  });

  it("resumes right after the row a token names", async () => {
    const page = await listPage(
      app.storage.em.fork(),
      Application,
      { tenantId: tenants.a.tenant.id },
      pageParams(200, tokenOf(apps.a[1]!)),
    );
    expect(page.items.map((x) => x.id)).toEqual(apps.a.slice(2));
    expect(page.nextPageToken).toBe("");
  });

  it("sizes pages at 50 by default and 200 at most, and refuses a negative size", async () => {
    expect(pageParams(0, "").limit).toBe(50);
    expect(pageParams(7, "").limit).toBe(7);
    expect(pageParams(10_000, "").limit).toBe(200);
    expect(await refusal(() => pageParams(-1, ""))).toMatchObject({
      reason: "INVALID_ARGUMENT",
      field: "page_size",
    });
  });

  it("refuses a token naming another tenant's object, or a deleted one, exactly like a malformed token", async () => {
    const list = (token: string) =>
      refusal(() =>
        listPage(
          app.storage.em.fork(),
          Application,
          { tenantId: tenants.a.tenant.id },
          pageParams(10, token),
        ),
      );
    const malformed = await refusal(() => pageParams(10, "not a token"));
    expect(malformed).toEqual({
      reason: "INVALID_ARGUMENT",
      message: "page_token is not valid",
      field: "page_token",
    });
    expect(await refusal(() => pageParams(10, tokenOf("not-a-uuid")))).toEqual(malformed);
    // Well-formed, but naming a row this list does not hold.
    expect(await list(tokenOf(apps.b[0]!))).toEqual(malformed);
    expect(await list(tokenOf("00000000-0000-4000-8000-000000000000"))).toEqual(malformed);
  });

  it("refuses over TLS a tenant admin's page token of another tenant's list like a malformed one", async () => {
    const transport = ts.connect();
    const adminA = clients(transport, tenants.a.token);
    const adminB = clients(transport, tenants.b.token);
    // B's own token works for B.
    const first = await adminB.tenants.listApplications({ pageSize: 1 });
    expect(first.nextPageToken).toBe(tokenOf(apps.b[0]!));
    const second = await adminB.tenants.listApplications({ pageSize: 1, pageToken: first.nextPageToken });
    expect(second.applications.map((x) => x.id)).toEqual([apps.b[1]]);

    const garbage = await rejection(adminA.tenants.listApplications({ pageSize: 1, pageToken: "garbage" }));
    expect(garbage.code).toBe(Code.InvalidArgument);
    expect(garbage.reason).toBe("INVALID_ARGUMENT");
    const foreign = await rejection(
      adminA.tenants.listApplications({ pageSize: 1, pageToken: first.nextPageToken }),
    );
    expect({ code: foreign.code, reason: foreign.reason, message: foreign.message }).toEqual({
      code: garbage.code,
      reason: garbage.reason,
      message: garbage.message,
    });

    // Users too: B's admin user, as a cursor of A's user list.
    const usersB = await adminB.users.listUsers({ pageSize: 1 });
    expect(usersB.nextPageToken).not.toBe("");
    const foreignUser = await rejection(
      adminA.users.listUsers({ pageSize: 1, pageToken: usersB.nextPageToken }),
    );
    expect(foreignUser.code).toBe(Code.InvalidArgument);
    expect(foreignUser.message).toBe(garbage.message);
  });
});
