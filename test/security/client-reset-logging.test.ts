import http2 from "node:http2";
import tls from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { captureLogs } from "./fixtures.js";

/**
 * A client that resets its stream (or, over HTTP/1.1, hangs up) before its request body is
 * read has ended the call itself: Connect's reader fails (connect-node says Internal), but nothing is Tessera's
 * fault, so nothing is logged at error level. Else any caller, unauthenticated, writes
 * error lines at will (an alert, a flood). Both transports (the `unit` project runs the
 * fast one, `connect` connect-node's stock adapter).
 */

const LOGIN = "/tessera.v1.UserService/Login";

describe("a call its client resets before its body is read", () => {
  let ts: TestServer;
  const logs = captureLogs("info");

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { log: { access: "info" } }, undefined, { logger: logs.logger });
  });
  afterAll(async () => {
    await ts?.close();
  });

  const RESETS = [
    ["CANCEL", http2.constants.NGHTTP2_CANCEL],
    ["INTERNAL_ERROR", http2.constants.NGHTTP2_INTERNAL_ERROR],
  ] as const;
  for (const contentType of ["application/json", "application/grpc-web+proto"])
    for (const [name, rstCode] of RESETS)
      it(`is not logged as Tessera's fault (${contentType}, RST_STREAM ${name})`, async () => {
        const requestId = `reset-${name}-${contentType.replace(/\W/g, "-")}`;
        const session = ts.session();
        session.on("error", () => undefined);
        const req = session.request({
          ":method": "POST",
          ":path": LOGIN,
          "content-type": contentType,
          "content-length": "100",
          "x-request-id": requestId,
        });
        req.on("error", () => undefined);
        // Part of the body (for gRPC-Web, an envelope announcing 90 bytes and 5 of them), so
        // the server is reading it when the reset arrives.
        const part =
          contentType === "application/json"
            ? Buffer.alloc(10, 0x20)
            : Buffer.from([0, 0, 0, 0, 90, 0, 0, 0, 0, 0]);
        await new Promise<void>((resolve) => req.write(part, () => resolve()));
        req.close(rstCode);
        try {
          // The call's end is observed (its access line), then nothing it logged is an error.
          await expect
            .poll(() => logs.lines.some((l) => l.msg === "access" && l.requestId === requestId), {
              timeout: 5000,
            })
            .toBe(true);
          const ofCall = logs.lines.filter((l) => l.requestId === requestId);
          expect(ofCall.filter((l) => (l.level as number) >= 50)).toEqual([]);
        } finally {
          session.close();
        }
      });

  for (const contentType of ["application/json", "application/grpc-web+proto"])
    it(`is not logged as Tessera's fault when an HTTP/1.1 client hangs up (${contentType})`, async () => {
      const requestId = `hangup-${contentType.replace(/\W/g, "-")}`;
      const socket = tls.connect({
        host: "127.0.0.1",
        port: ts.server.port,
        ca: ts.certs.ca,
        servername: "localhost",
        ALPNProtocols: ["http/1.1"],
      });
      socket.on("error", () => undefined);
      await new Promise((resolve) => socket.once("secureConnect", resolve));
      const head = `POST ${LOGIN} HTTP/1.1\r\nhost: localhost\r\ncontent-type: ${contentType}\r\ncontent-length: 100\r\nx-request-id: ${requestId}\r\n\r\n`;
      const part =
        contentType === "application/json"
          ? Buffer.alloc(10, 0x20)
          : Buffer.from([0, 0, 0, 0, 90, 0, 0, 0, 0, 0]);
      await new Promise<void>((resolve) =>
        socket.write(Buffer.concat([Buffer.from(head), part]), () => resolve()),
      );
      socket.destroy();
      await expect
        .poll(() => logs.lines.some((l) => l.msg === "access" && l.requestId === requestId), {
          timeout: 5000,
        })
        .toBe(true);
      expect(logs.lines.filter((l) => l.requestId === requestId && (l.level as number) >= 50)).toEqual([]);
    });
});
