import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import {
  RevocationEventSchema,
  RevocationKind,
  type WatchRevocationsResponse,
  WatchRevocationsResponseSchema,
} from "../gen/tessera/v1/verification_service_pb.js";
import { RevocationWatch } from "../src/sdk/server/revocation-watch.js";

/** A stream that yields `messages` (each after `before`, if given), then stays open until aborted. */
function streamOf(messages: WatchRevocationsResponse[], before?: (index: number) => Promise<void>) {
  return async function* (_cursor: string, signal: AbortSignal) {
    for (const [index, message] of messages.entries()) {
      await before?.(index);
      yield message;
    }
    await new Promise<void>((resolve) => signal.addEventListener("abort", () => resolve(), { once: true }));
  };
}

describe("RevocationWatch", () => {
  it("after an event of a kind it does not know, sends access tokens issued before it to Tessera", async () => {
    let now = 1_000_000;
    let emptied = 0;
    let release!: () => void;
    const later = new Promise<void>((resolve) => {
      release = resolve;
    });
    const watch = new RevocationWatch({
      open: streamOf(
        [
          create(WatchRevocationsResponseSchema, { cursor: "c1", heartbeatSeconds: 60 }),
          create(WatchRevocationsResponseSchema, {
            cursor: "c2",
            // A kind a newer Tessera might send: this client cannot tell what it revokes.
            events: [create(RevocationEventSchema, { kind: 42 as RevocationKind, id: "x", tenantId: "t" })],
          }),
        ],
        (index) => (index === 1 ? later : Promise.resolve()),
      ),
      now: () => now,
      skewMs: 5_000,
      rememberMs: 60_000,
      onEvent: () => {},
      onLost: () => {
        emptied++;
      },
    });
    try {
      expect(await watch.ready()).toBe(true);
      // Up since a fresh start: tokens issued from then on are checked offline.
      expect(watch.coverageSince).toBe(1_000_000 + 5_000);
      now += 30_000;
      const before = emptied;
      release();
      await expect.poll(() => emptied).toBeGreaterThan(before);
      // A token issued (by Tessera's clock) before the unknown event, even allowing for skew,
      // is no longer covered offline: its revocation may be what the event said.
      expect(watch.coverageSince).toBe(1_030_000 + 5_000);
      expect(watch.healthy()).toBe(true);
    } finally {
      watch.close();
    }
  });

  it("an event of a known kind leaves the coverage of a fresh start as it was", async () => {
    let now = 1_000_000;
    const seen: string[] = [];
    const watch = new RevocationWatch({
      open: streamOf([
        create(WatchRevocationsResponseSchema, { cursor: "c1", heartbeatSeconds: 60 }),
        create(WatchRevocationsResponseSchema, {
          cursor: "c2",
          events: [create(RevocationEventSchema, { kind: RevocationKind.SESSION, id: "s1", tenantId: "t" })],
        }),
      ]),
      now: () => now,
      skewMs: 5_000,
      rememberMs: 60_000,
      onEvent: (target, id) => seen.push(`${target}:${id}`),
      onLost: () => {},
    });
    try {
      expect(await watch.ready()).toBe(true);
      now += 1_000;
      await expect.poll(() => seen).toEqual(["session:s1"]);
      expect(watch.coverageSince).toBe(1_000_000 + 5_000);
    } finally {
      watch.close();
    }
  });

  it("names as its position the cursor of the last events or reset it applied, not of a heartbeat", async () => {
    const watch = new RevocationWatch({
      open: streamOf([
        create(WatchRevocationsResponseSchema, { cursor: "h1", heartbeatSeconds: 60 }),
        create(WatchRevocationsResponseSchema, {
          cursor: "e1",
          events: [
            create(RevocationEventSchema, { kind: RevocationKind.CREDENTIAL, id: "c", tenantId: "t" }),
          ],
        }),
        create(WatchRevocationsResponseSchema, { cursor: "h2" }),
        create(WatchRevocationsResponseSchema, { cursor: "r1", reset: true }),
        create(WatchRevocationsResponseSchema, { cursor: "h3" }),
      ]),
      now: () => Date.now(),
      skewMs: 5_000,
      rememberMs: 60_000,
      onEvent: () => {},
      onLost: () => {},
    });
    try {
      expect(watch.position).toBe("");
      expect(await watch.ready()).toBe(true);
      await expect.poll(() => watch.stats().resets).toBe(1);
      // The heartbeat after the reset, read meanwhile, moves nothing.
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(watch.position).toBe("r1");
    } finally {
      watch.close();
    }
  });
});
