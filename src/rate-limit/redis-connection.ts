import type { Redis } from "ioredis";

// The first connection of the limiters' Redis client, as the start waits for it: with
// `enableOfflineQueue: false`, a call made before ioredis is ready fails at once, and the
// limiters would count per instance for the next second (RedisState), each instance of a
// fleet started together granting its own budget.

/**
 * Watch `client` from now on, and return what the start awaits: true once the client is
 * ready, false when a connection attempt has failed since it was last ready (refused,
 * timed out, its ready check refused: an answer, and an outage does not end sooner for
 * waiting) or when none is ready within `boundMs` of the call (a Redis that accepts and
 * does not answer).
 */
export function watchFirstConnection(client: Redis): (boundMs: number) => Promise<boolean> {
  let failed = false;
  client.on("error", () => {
    failed = true;
  });
  client.on("ready", () => {
    failed = false;
  });
  return (boundMs) => {
    if (client.status === "ready") return Promise.resolve(true);
    if (failed) return Promise.resolve(false);
    return new Promise<boolean>((resolve) => {
      const done = (ok: boolean) => {
        clearTimeout(timer);
        client.off("ready", ready).off("error", fail).off("end", fail);
        resolve(ok);
      };
      const ready = () => done(true);
      const fail = () => done(false);
      const timer = setTimeout(fail, boundMs);
      client.once("ready", ready).once("error", fail).once("end", fail);
    });
  };
}
