import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Agent, fetch } from "undici";
import { afterAll, describe, expect, it } from "vitest";
import { scanChildStderr } from "./log-scan-suite.js";

const ROOT = join(import.meta.dirname, "..");
const TSX = join(ROOT, "node_modules", ".bin", "tsx");
const MAIN = join(ROOT, "src", "main.ts");

/**
 * `tessera serve` as an operator runs it: the metrics listener on its own address (and a
 * start that cannot bind it fails), access lines on stderr through the buffered access
 * logger, flushed within about a second.
 */
describe("tessera serve with metrics and the access log", () => {
  const children: ChildProcess[] = [];
  afterAll(() => {
    for (const c of children) c.kill("SIGKILL");
  });

  function serve(env: Record<string, string>) {
    const cwd = mkdtempSync(join(tmpdir(), "tessera-metrics-"));
    const child = spawn(TSX, [MAIN, "serve"], {
      cwd,
      env: {
        ...process.env,
        TESSERA_PORT: "0",
        TESSERA_HOST: "127.0.0.1",
        TESSERA_PASSWORD_ITERATIONS: "1000",
        TESSERA_ADMIN_PASSWORD: "metrics-serve-admin-pw",
        ...env,
      },
    });
    children.push(child);
    scanChildStderr(child);
    const out = { stderr: "" };
    child.stderr.on("data", (d) => {
      out.stderr += d;
    });
    const exited = new Promise<number | null>((r) => child.once("close", (code) => r(code)));
    return { child, cwd, out, exited };
  }

  const waitFor = async <T>(what: () => T | undefined, ms: number, why: () => string): Promise<T> => {
    const end = Date.now() + ms;
    for (;;) {
      const found = what();
      if (found !== undefined) return found;
      if (Date.now() > end) throw new Error(`timed out: ${why()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };

  it("serves /metrics apart from the public port and writes one access line per call", async () => {
    const { child, cwd, out, exited } = serve({ TESSERA_METRICS_LISTEN: "127.0.0.1:0" });
    const lines = () =>
      out.stderr
        .split("\n")
        .filter((l) => l.startsWith("{"))
        .map((l) => JSON.parse(l) as Record<string, unknown>);
    const started = () => lines().find((l) => l.msg === "tessera listening");
    await waitFor(
      () => (started() ? "yes" : undefined),
      90_000,
      () => out.stderr,
    );
    const url = started()!.url as string;
    const metricsUrl = lines().find((l) => l.msg === "metrics listening")?.url as string;
    expect(metricsUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    const agent = new Agent({ connect: { ca: readFileSync(join(cwd, "certs", "ca.crt")) } });
    try {
      const requestId = `serve-access-${Date.now()}`;
      const res = await fetch(`${url}/tessera.v1.UserService/GetCurrentUser`, {
        method: "POST",
        headers: { "content-type": "application/json", "x-request-id": requestId },
        body: "{}",
        dispatcher: agent,
      });
      expect(res.status).toBe(401);
      await res.text();
      expect((await fetch(`${url}/metrics`, { dispatcher: agent })).status).toBe(404);
      const text = await (await fetch(metricsUrl)).text();
      expect(text).toContain(
        'tessera_rpc_requests_total{service="tessera.v1.UserService",method="GetCurrentUser",protocol="connect",code="unauthenticated"} 1',
      );
      // Gathered in a buffer, flushed within a second or so (another process's timer and a
      // pipe away: the ceiling is for a loaded machine).
      const line = await waitFor(
        () => {
          const found = lines().filter((l) => l.msg === "access" && l.requestId === requestId);
          return found.length > 0 ? found : undefined;
        },
        20_000,
        () => out.stderr,
      );
      expect(line).toHaveLength(1);
      expect(line[0]).toMatchObject({
        method: "tessera.v1.UserService/GetCurrentUser",
        protocol: "connect",
        code: "unauthenticated",
        reason: "AUTH_REQUIRED",
        ip: "127.0.0.1",
        level: 30,
      });
    } finally {
      await agent.close();
      child.kill("SIGTERM");
    }
    expect(await exited).toBe(0);
  }, 120_000);

  it("fails the start with one line when the metrics address is taken", async () => {
    const taken = createServer();
    await new Promise<void>((r) => taken.listen(0, "127.0.0.1", () => r()));
    const port = (taken.address() as { port: number }).port;
    try {
      const { out, exited } = serve({ TESSERA_METRICS_LISTEN: `127.0.0.1:${port}` });
      expect(await exited).not.toBe(0);
      expect(out.stderr).toContain(`cannot listen on 127.0.0.1:${port}: address already in use`);
    } finally {
      taken.close();
    }
  }, 120_000);
});
