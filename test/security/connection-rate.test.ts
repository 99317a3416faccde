import tls from "node:tls";
import { afterEach, describe, expect, it } from "vitest";
import { pinnableClock, SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { capturingLogger } from "../outage-helpers.js";

/**
 * server.maxConnectionsPerIp bounds the connections an address holds, not how fast it opens
 * them: one that closes each right after its handshake made the server do handshake after
 * handshake (about 1.4 ms of CPU each here, P-256), as fast as it could connect. And
 * connections closed before TLS by any bound must not be lost silently: counted.
 */
function openTls(ts: TestServer, from?: string): Promise<{ socket: tls.TLSSocket; accepted: boolean }> {
  return new Promise((resolve) => {
    const socket = tls.connect({
      host: "127.0.0.1",
      ...(from === undefined ? {} : { localAddress: from }),
      port: ts.server.port,
      ca: ts.certs.ca,
      servername: "localhost",
      ALPNProtocols: ["h2"],
    });
    socket.on("error", () => undefined);
    socket.once("secureConnect", () => resolve({ socket, accepted: true }));
    socket.once("close", () => resolve({ socket, accepted: false }));
  });
}

/** `tessera_connections_refused_total` by limit, as scraped. */
async function refused(ts: TestServer): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const line of (await ts.app.metrics!.scrape()).split("\n")) {
    const m = /^tessera_connections_refused_total\{limit="(\w+)"\} (\d+)/.exec(line);
    if (m) out[m[1]!] = Number(m[2]);
  }
  return out;
}

describe("new connections per address", () => {
  let ts: TestServer | undefined;
  afterEach(async () => {
    await ts?.close();
    ts = undefined;
  });

  for (const maxConnectionsPerIp of [0, 1024])
    it(`closes an address's connections past server.newConnectionsPerIpPerSecond before TLS, and counts them (maxConnectionsPerIp ${maxConnectionsPerIp})`, async () => {
      ts = await startTestServer(SQLITE, {
        server: { newConnectionsPerIpPerSecond: 20, maxConnectionsPerIp },
      });
      const before = (await refused(ts)).rate ?? 0;
      const started = Date.now();
      const opened = await Promise.all(Array.from({ length: 100 }, () => openTls(ts!)));
      const seconds = Math.ceil((Date.now() - started) / 1000);
      for (const c of opened) c.socket.destroy();
      const accepted = opened.filter((c) => c.accepted).length;
      // 20 in each second the burst spanned (at least one).
      expect(accepted).toBeGreaterThanOrEqual(20);
      expect(accepted).toBeLessThanOrEqual(20 * (seconds + 1));
      expect((await refused(ts)).rate! - before).toBe(100 - accepted);
      // The next second the address is admitted again.
      await new Promise((r) => setTimeout(r, 1100));
      const again = await openTls(ts);
      again.socket.destroy();
      expect(again.accepted).toBe(true);
    });

  it("counts the connections server.maxConnectionsPerIp closes", async () => {
    ts = await startTestServer(SQLITE, { server: { maxConnectionsPerIp: 3 } });
    const before = (await refused(ts)).per_ip ?? 0;
    const held: tls.TLSSocket[] = [];
    try {
      for (let i = 0; i < 3; i++) held.push((await openTls(ts)).socket);
      const over = await Promise.all([openTls(ts), openTls(ts)]);
      expect(over.map((c) => c.accepted)).toEqual([false, false]);
      expect((await refused(ts)).per_ip! - before).toBe(2);
    } finally {
      for (const s of held) s.destroy();
    }
  });
});

describe("the aggregated refusal warning", () => {
  const MSG = /^connections closed before TLS, or HTTP\/2 streams refused, by the connection limits/;

  it("logs one warning per interval with its totals by limit, as many as the counter counted, and the last interval's at close", async () => {
    const clock = pinnableClock();
    const t0 = Date.now();
    clock.pin(t0);
    const { logger, log } = capturingLogger("info");
    // Two connections per address, three in all: addresses 127.0.0.x are all the loopback's.
    const ts = await startTestServer(
      SQLITE,
      { server: { maxConnectionsPerIp: 2, maxConnections: 3 } },
      undefined,
      { logger, clock: clock.now },
    );
    const held: tls.TLSSocket[] = [];
    let closed = false;
    try {
      const before = await refused(ts);
      for (let i = 0; i < 2; i++) held.push((await openTls(ts, "127.0.0.1")).socket);
      // Past the address's bound (three in all are not open yet): per_ip, three times.
      const perIp = await Promise.all([1, 2, 3].map(() => openTls(ts, "127.0.0.1")));
      expect(perIp.map((c) => c.accepted)).toEqual([false, false, false]);
      const third = await openTls(ts, "127.0.0.2");
      expect(third.accepted).toBe(true);
      held.push(third.socket);
      // Three open: every other is closed by the total bound, four times.
      const total = await Promise.all([1, 2, 3, 4].map(() => openTls(ts, "127.0.0.3")));
      expect(total.map((c) => c.accepted)).toEqual([false, false, false, false]);
      const counted = await refused(ts);
      expect((counted.per_ip ?? 0) - (before.per_ip ?? 0)).toBe(3);
      expect((counted.total ?? 0) - (before.total ?? 0)).toBe(4);
      // Seven refusals within one interval: no line yet, not one each.
      expect(log.count(MSG)).toBe(0);
      // The interval's end, by the app's clock: the next refusal writes the interval's one
      // line, with its totals, and starts the next interval.
      clock.pin(t0 + 10_000);
      expect((await openTls(ts, "127.0.0.3")).accepted).toBe(false);
      expect(log.count(MSG)).toBe(1);
      const line = log.lines.find((l) => MSG.test(String(l.msg)))!;
      expect(line.level).toBe(40);
      expect(line.refused).toEqual({ per_ip: 3, total: 4 });
      expect(line.intervalMs).toBe(10_000);
      expect(((await refused(ts)).total ?? 0) - (before.total ?? 0)).toBe(5);
      for (const s of held.splice(0)) s.destroy();
      await ts.close();
      closed = true;
      // The last interval's refusal is logged when the server closes, not lost.
      expect(log.count(MSG)).toBe(2);
      expect(log.lines.filter((l) => MSG.test(String(l.msg)))[1]!.refused).toEqual({ total: 1 });
    } finally {
      for (const s of held) s.destroy();
      if (!closed) await ts.close();
    }
  });
});
