import tls from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { captureLogs } from "./fixtures.js";

/**
 * Review of the OAuth 2.0 endpoints (/oauth2/token, /oauth2/introspect, /oauth2/revoke) as a
 * strict client and as an attacker, over TLS. Each case here failed on the code before it.
 */

describe("an OAuth request whose HTTP/1.1 client hangs up before its form is read", () => {
  let ts: TestServer;
  const logs = captureLogs("info");

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { log: { access: "info" } }, undefined, { logger: logs.logger });
  });
  afterAll(async () => {
    await ts?.close();
  });

  for (const path of ["/oauth2/token", "/oauth2/introspect", "/oauth2/revoke"])
    it(`is not logged as Tessera's fault (${path})`, async () => {
      // Anyone, unauthenticated, could write error lines ("request failed", a 500's) at will.
      const requestId = `oauth-hangup-${path.slice(8)}`;
      const socket = tls.connect({
        host: "127.0.0.1",
        port: ts.server.port,
        ca: ts.certs.ca,
        servername: "localhost",
        ALPNProtocols: ["http/1.1"],
      });
      socket.on("error", () => undefined);
      await new Promise((resolve) => socket.once("secureConnect", resolve));
      const head =
        `POST ${path} HTTP/1.1\r\nhost: localhost\r\n` +
        "content-type: application/x-www-form-urlencoded\r\ncontent-length: 100\r\n" +
        `x-request-id: ${requestId}\r\n\r\n`;
      await new Promise<void>((resolve) =>
        socket.write(Buffer.concat([Buffer.from(head), Buffer.from("grant_type=client_")]), () => resolve()),
      );
      socket.destroy();
      await expect
        .poll(() => logs.lines.some((l) => l.msg === "access" && l.requestId === requestId), {
          timeout: 5000,
        })
        .toBe(true);
      // The error line, when there is one, follows the access line at once.
      await new Promise((resolve) => setTimeout(resolve, 200));
      expect(logs.lines.filter((l) => l.requestId === requestId && (l.level as number) >= 50)).toEqual([]);
    });
});
