import { once } from "node:events";
import { connect, type Socket } from "node:net";
import { describe, expect, it } from "vitest";
import { RedisState } from "../src/rate-limit.js";

function fixture() {
  const lines: string[] = [];
  let now = 0;
  const state = new RedisState(
    { warn: (m) => lines.push(`warn ${m}`), info: (m) => lines.push(`info ${m}`) },
    1000,
    () => now,
  );
  return { state, lines, advance: (ms: number) => (now += ms) };
}

const ok = () => Promise.resolve("ok");
const timeout = () => Promise.reject(new Error("Command timed out"));

describe("RedisState", () => {
  it("logs Redis going away once however many calls fail, and skips Redis until the retry time", async () => {
    const { state, lines, advance } = fixture();
    await expect(state.run(ok)).resolves.toBe("ok");
    await expect(state.run(timeout)).rejects.toThrow("timed out");
    let called = 0;
    const counted = () => {
      called++;
      return ok();
    };
    for (let i = 0; i < 5; i++) await expect(state.run(counted)).rejects.toThrow("Redis unavailable");
    expect(called).toBe(0);
    advance(999);
    await expect(state.run(counted)).rejects.toThrow("Redis unavailable");
    expect(lines).toEqual(["warn Redis unavailable, limiting per instance"]);
    expect(state.available).toBe(false);
  });

  it("tries Redis again after a second with one call at a time, and logs its return once", async () => {
    const { state, lines, advance } = fixture();
    await expect(state.run(timeout)).rejects.toThrow();
    advance(1000);
    let finish!: (v: string) => void;
    const probe = state.run(() => new Promise<string>((r) => (finish = r)));
    // While the probe is out, the others do not wait for Redis.
    await expect(state.run(ok)).rejects.toThrow("Redis unavailable");
    finish("ok");
    await expect(probe).resolves.toBe("ok");
    await expect(state.run(ok)).resolves.toBe("ok");
    expect(lines).toEqual(["warn Redis unavailable, limiting per instance", "info Redis back"]);
    expect(state.available).toBe(true);
  });

  it("waits another second when the probe fails, without logging again", async () => {
    const { state, lines, advance } = fixture();
    await expect(state.run(timeout)).rejects.toThrow();
    advance(1000);
    await expect(state.run(timeout)).rejects.toThrow("timed out");
    advance(500);
    await expect(state.run(ok)).rejects.toThrow("Redis unavailable");
    advance(500);
    await expect(state.run(ok)).resolves.toBe("ok");
    expect(lines).toEqual(["warn Redis unavailable, limiting per instance", "info Redis back"]);
  });

  it("refuses a call past its deadline, and counts Redis away", async () => {
    const lines: string[] = [];
    const state = new RedisState(
      { warn: (m) => lines.push(`warn ${m}`), info: (m) => lines.push(`info ${m}`) },
      1000,
      Date.now,
      20,
    );
    await expect(state.run(() => new Promise<string>(() => undefined))).rejects.toThrow("within 20 ms");
    expect(lines).toEqual(["warn Redis unavailable, limiting per instance"]);
  });

  it("takes an answer that came while the event loop was busy past the deadline", async () => {
    // The machine's Redis (another process: it answers while this event loop is busy).
    const client: Socket = connect(6379, "127.0.0.1");
    client.on("error", () => undefined);
    await once(client, "connect");
    try {
      const lines: string[] = [];
      const state = new RedisState(
        { warn: (m) => lines.push(`warn ${m}`), info: (m) => lines.push(`info ${m}`) },
        1000,
        Date.now,
        20,
      );
      const answer = state.run(async () => {
        client.write("PING\r\n");
        const [data] = await once(client, "data");
        return String(data);
      });
      // The event loop busy past the deadline: the answer is in the socket, the timer due.
      const until = performance.now() + 200;
      while (performance.now() < until);
      await expect(answer).resolves.toBe("+PONG\r\n");
      expect(lines).toEqual([]);
    } finally {
      client.destroy();
    }
  });
});
