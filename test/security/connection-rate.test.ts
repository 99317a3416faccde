import tls from "node:tls";
import { afterEach, describe, expect, it } from "vitest";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";

/**
 * server.maxConnectionsPerIp bounds the connections an address holds, not how fast it opens
 * them: one that closes each right after its handshake made the server do handshake after
 * handshake (about 1.4 ms of CPU each here, P-256), as fast as it could connect. And
 * connections closed before TLS by any bound must not be lost silently: counted.
 */
function openTls(ts: TestServer): Promise<{ socket: tls.TLSSocket; accepted: boolean }> {
  return new Promise((resolve) => {
    const socket = tls.connect({
      host: "127.0.0.1",
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
