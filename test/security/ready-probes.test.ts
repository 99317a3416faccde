import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";

/*
 * /ready is public and not rate limited, so that probes always pass; it asks the database
 * whether it answers. A query per request let anonymous callers fill the pool (measured on
 * PostgreSQL: a flood of /ready held a legitimate Login for 14 s), so concurrent requests
 * share one query. PostgreSQL only: SQLite has no pool, and its query ends before the next
 * request is read, so there is nothing to share.
 */

/** GET `path` `n` times at once over one HTTP/2 connection; the statuses. */
function getAtOnce(ts: TestServer, path: string, n: number): Promise<number[]> {
  const session = ts.session();
  session.on("error", () => undefined);
  const one = () =>
    new Promise<number>((resolve, reject) => {
      const req = session.request({ ":path": path });
      let status = 0;
      req.on("response", (h) => {
        status = Number(h[":status"]);
      });
      req.on("error", reject);
      req.resume();
      req.on("end", () => resolve(status));
    });
  return Promise.all(Array.from({ length: n }, one)).finally(() => session.close());
}

describe.each(DATABASES.filter((d) => d.name === "postgres"))("/ready on $name", (db) => {
  let ts: TestServer;
  let pings = 0;
  beforeAll(async () => {
    ts = await startTestServer(db);
    // The real ping, counted.
    const ping = ts.app.storage.ping.bind(ts.app.storage);
    ts.app.storage.ping = () => {
      pings++;
      return ping();
    };
  });
  afterAll(async () => {
    await ts.close();
  });

  it("answers 200 requests arriving together with one database query between them, not one each", async () => {
    pings = 0;
    const statuses = await getAtOnce(ts, "/ready", 200);
    expect(statuses.every((s) => s === 200)).toBe(true);
    // Requests share a query only while it is out: a few may start another.
    expect(pings).toBeGreaterThanOrEqual(1);
    expect(pings).toBeLessThan(20);
  });

  it("asks the database again for a request that arrives after the last query ended", async () => {
    pings = 0;
    expect(await getAtOnce(ts, "/ready", 1)).toEqual([200]);
    expect(await getAtOnce(ts, "/ready", 1)).toEqual([200]);
    expect(pings).toBe(2);
  });
});
