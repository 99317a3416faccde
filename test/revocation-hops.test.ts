import { loadavg } from "node:os";
import { setImmediate as yieldToIo } from "node:timers/promises";
import { createClient, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import type { WatchRevocationsResponse } from "../gen/tessera/v1/verification_service_pb.js";
import { createTesseraAuth, type TesseraAuthError } from "../src/sdk/server/index.js";
import { clientFor, DATABASES, startTestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";

/**
 * Issue 22's revocation path, hop by hop, with a timestamp at each: the revoke RPC sent and
 * returned; the revocation feed's read handing the event to the streams (Tessera); the
 * WatchRevocations message arriving at the downstream and applied (its cache entry
 * dropped); the downstream's first call refused. Tessera and the downstream core share this
 * process (the real gRPC transport over TLS between them), so the hops share one clock.
 * Prints the distribution per hop; asserts the order and a loose bound (a loaded machine).
 */

const ROUNDS = 20;

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

describe.each(DATABASES)("a revocation's hops to a downstream cache on $name", (db) => {
  it("reaches the downstream and is refused there on the next call, each hop timed", async () => {
    const ts = await startTestServer(db);
    const plain = ts.connect();
    const admin = clients(plain, await adminLogin(plain));
    const verifier = (
      await admin.machines.createMachineUser({
        name: `downstream-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
    const username = `hops-${short()}`;
    await admin.users.createUser({ username, password: "hops password long", scopes: ["workflows:read"] });
    const login = await createClient(UserService, plain).login({ username, password: "hops password long" });
    const tokens = clientFor(TokenService, plain, login.accessToken);

    // Hop timestamps by credential id.
    const fed = new Map<string, number>();
    const arrived = new Map<string, number>();
    const applied = new Map<string, number>();
    const offFeed = ts.app.revocations.subscribe((batch) => {
      const at = performance.now();
      for (const e of batch.events) if (!fed.has(e.subjectId)) fed.set(e.subjectId, at);
    });
    // The SDK's own transport (gRPC over TLS), its stream tapped: a message is timed on
    // arrival, and again when the watch asks for the next one (it has applied this one).
    const inner = createGrpcTransport({ baseUrl: ts.server.url, nodeOptions: { ca: ts.certs.ca } });
    const tapped = {
      unary: inner.unary.bind(inner),
      async stream(...args: Parameters<Transport["stream"]>) {
        const res = await inner.stream(...args);
        const source = res.message as AsyncIterable<WatchRevocationsResponse>;
        async function* timed() {
          for await (const m of source) {
            const at = performance.now();
            for (const e of m.events) if (!arrived.has(e.id)) arrived.set(e.id, at);
            yield m;
            const done = performance.now();
            for (const e of m.events) if (!applied.has(e.id)) applied.set(e.id, done);
          }
        }
        return { ...res, message: timed() };
      },
    } as unknown as Transport;
    const auth = createTesseraAuth({ server: ts.server.url, transport: tapped, credential: verifier });
    try {
      expect(await auth.ready(10_000)).toBe(true);
      const rows: number[][] = [];
      for (let i = 0; i < ROUNDS; i++) {
        const pat = await tokens.createPersonalAccessToken({ name: `h${i}`, scopes: ["workflows:read"] });
        // Admitted twice: verified by Tessera, then from the cache.
        await auth.authenticate(`Bearer ${pat.token}`);
        const hits = auth.stats().cacheHits;
        await auth.authenticate(`Bearer ${pat.token}`);
        expect(auth.stats().cacheHits).toBe(hits + 1);
        const sent = performance.now();
        await tokens.revokePersonalAccessToken({ id: pat.id });
        const returned = performance.now();
        let refused = 0;
        let probes = 0;
        while (refused === 0) {
          probes++;
          try {
            await auth.authenticate(`Bearer ${pat.token}`);
          } catch (err) {
            expect((err as TesseraAuthError).reason).toBe("TOKEN_REVOKED");
            refused = performance.now();
          }
          expect(performance.now() - returned, "refused within 10 s").toBeLessThan(10_000);
          await yieldToIo(); // let the stream's message in between two probes
        }
        const f = fed.get(pat.id)!;
        const a = arrived.get(pat.id)!;
        const p = applied.get(pat.id)!;
        expect(f).toBeLessThanOrEqual(a);
        expect(a).toBeLessThanOrEqual(p);
        expect(p).toBeLessThanOrEqual(refused);
        rows.push([returned - sent, f - returned, a - f, p - a, refused - p, refused - returned, probes]);
      }
      const names = [
        "revoke RPC (sent → returned)",
        "feed read hands the event over (from the return)",
        "→ message arrives downstream",
        "→ applied (cache entry dropped)",
        "→ next call refused (VerifyCredential)",
        "total: returned → refused",
        "probes until refused",
      ];
      const lines = names.map((name, k) => {
        const xs = rows.map((r) => r[k]!).sort((x, y) => x - y);
        return `  ${name}: p50 ${percentile(xs, 50).toFixed(2)}, p99 ${percentile(xs, 99).toFixed(2)}, max ${xs.at(-1)!.toFixed(2)}`;
      });
      console.log(
        `revocation hops on ${db.name} over ${ROUNDS} rounds (ms; load ${loadavg()[0]!.toFixed(1)}):\n${lines.join("\n")}`,
      );
      const totals = rows.map((r) => r[5]!).sort((x, y) => x - y);
      expect(totals.at(-1)!).toBeLessThan(2_000);
    } finally {
      offFeed();
      auth.close();
      await ts.close();
    }
  });
});
