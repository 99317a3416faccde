import type { Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuditService } from "../../gen/tessera/v1/audit_service_pb.js";
import { Code, rejection } from "../errors-util.js";
import { clientFor, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, tenantWithAdmin } from "../machine-fixtures.js";

/**
 * A tenant's admin:audit holder crafting what it sends ListAuditEvents (its page token is
 * only base64url of "<ms>.<id>", and a Timestamp over gRPC is any pair of integers): every
 * instant no timestamp can hold is its mistake, InvalidArgument, never an Internal from the
 * database (PostgreSQL refused the Invalid Date such instants become).
 */

const ID = "00000000-0000-4000-8000-000000000000";
const cursor = (ms: string) => Buffer.from(`${ms}.${ID}`, "utf8").toString("base64url");

describe.each(DATABASES)("instants no timestamp holds, sent to ListAuditEvents over TLS on $name", (db) => {
  let ts: TestServer;
  let token: string;

  beforeAll(async () => {
    ts = await startTestServer(db);
    const t = ts.connect();
    token = (await tenantWithAdmin(t, await adminLogin(t), ["admin:audit"])).token;
  });
  afterAll(async () => {
    await ts.close();
  });

  const transports: [string, () => Transport][] = [
    ["Connect", () => ts.connect()],
    ["gRPC", () => ts.grpc()],
    ["gRPC-Web", () => ts.grpcWeb()],
  ];

  it.each(transports)(
    "refuses a page token past the last instant a Date holds, over %s",
    async (_name, transport) => {
      const audit = clientFor(AuditService, transport(), token);
      for (const ms of ["9999999999999999", "8640000000000001"]) {
        const r = await rejection(audit.listAuditEvents({ pageToken: cursor(ms) }));
        expect(r.code).toBe(Code.InvalidArgument);
        expect(r.reason).toBe("INVALID_ARGUMENT");
        expect(r.message).toBe("page_token is not valid");
      }
      // The latest instant a timestamp holds is a cursor like any other.
      await audit.listAuditEvents({ pageToken: cursor("253402300799999") });
    },
  );

  it.each(transports)(
    "refuses a start_time or end_time outside years 1 to 9999, over %s",
    async (_name, transport) => {
      const audit = clientFor(AuditService, transport(), token);
      // Past what a Date holds, before what PostgreSQL's timestamps hold (4714 BC), and the
      // last second of 9999 whose nanoseconds round up into year 10000 (which PostgreSQL takes
      // but cannot compare with as sent).
      const outside = [
        { seconds: 10n ** 15n, nanos: 0 },
        { seconds: -(10n ** 15n), nanos: 0 },
        { seconds: -(10n ** 13n), nanos: 0 },
        { seconds: 253402300799n, nanos: 999_999_999 },
        { seconds: 253402300800n, nanos: 0 },
      ];
      for (const time of outside) {
        for (const field of ["startTime", "endTime"] as const) {
          const r = await rejection(audit.listAuditEvents({ [field]: time }));
          expect(r.code, `${field} ${time.seconds}.${time.nanos}`).toBe(Code.InvalidArgument);
          expect(r.reason).toBe("INVALID_ARGUMENT");
          expect(r.message).toBe(
            `${field === "startTime" ? "start_time" : "end_time"} must be within years 1 to 9999`,
          );
        }
      }
      // The first and last instants of that range are times like any other.
      await audit.listAuditEvents({
        startTime: { seconds: -62135596800n, nanos: 0 },
        endTime: { seconds: 253402300799n, nanos: 999_000_000 },
      });
    },
  );
});
