import { pbkdf2Sync, randomBytes } from "node:crypto";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { ConnectError, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { DEFAULT_HASH_IDLE, DEFAULT_HASH_NICE, HashPool, hashPool } from "../../src/auth/hash-pool.js";
import { HashWorkers } from "../../src/auth/hash-workers.js";
import { TesseraError } from "../../src/errors.js";
import { Code, rejection } from "../errors-util.js";
import { ADMIN_PASSWORD, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { timedOnCpu } from "../run-queue.js";

const linux = existsSync("/proc/thread-self");

/** Nice value of each thread of this process (field 19 of /proc/self/task/<tid>/stat). */
function threadNices(): Map<number, number> {
  const nices = new Map<number, number>();
  for (const tid of readdirSync("/proc/self/task")) {
    try {
      const stat = readFileSync(`/proc/self/task/${tid}/stat`, "utf8");
      nices.set(Number(tid), Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16]));
    } catch {
      // The thread ended meanwhile.
    }
  }
  return nices;
}

/** SCHED_IDLE in sched.h. */
const SCHED_IDLE = 5;

/** Scheduling policy of each thread of this process (field 41 of /proc/self/task/<tid>/stat). */
function threadPolicies(): Map<number, number> {
  const policies = new Map<number, number>();
  for (const tid of readdirSync("/proc/self/task")) {
    try {
      const stat = readFileSync(`/proc/self/task/${tid}/stat`, "utf8");
      policies.set(Number(tid), Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[38]));
    } catch {
      // The thread ended meanwhile.
    }
  }
  return policies;
}

const job = (secret: string, salt: Buffer) => ({ secret, salt, iterations: 2000, keyLength: 32 });

describe("HashWorkers", () => {
  it.runIf(linux)(
    "computes PBKDF2-SHA256 on threads that lowered their own priority, and only theirs",
    async () => {
      const before = threadNices();
      const workers = new HashWorkers({ threads: 2, nice: 19 });
      try {
        const salt = randomBytes(16);
        const [a, b] = await Promise.all([
          workers.pbkdf2(job("first secret", salt)),
          workers.pbkdf2(job("second secret", salt)),
        ]);
        expect(a).toEqual(pbkdf2Sync("first secret", salt, 2000, 32, "sha256"));
        expect(b).toEqual(pbkdf2Sync("second secret", salt, 2000, 32, "sha256"));
        expect(workers.niced).toBe(true);
        const after = threadNices();
        const newlyNiced = [...after].filter(([tid, nice]) => nice === 19 && before.get(tid) !== 19);
        expect(newlyNiced).toHaveLength(2);
        // The event loop's thread keeps its priority.
        expect(after.get(process.pid)).toBe(before.get(process.pid));
        expect(after.get(process.pid)).toBeLessThan(19);
      } finally {
        workers.close();
      }
    },
  );

  it.runIf(linux)("puts its threads, and only them, in the SCHED_IDLE class when asked", async () => {
    const before = threadPolicies();
    const workers = new HashWorkers({ threads: 2, nice: 19, idle: true });
    try {
      const salt = randomBytes(16);
      await Promise.all([workers.pbkdf2(job("first", salt)), workers.pbkdf2(job("second", salt))]);
      expect(workers.idle).toBe(true);
      const after = threadPolicies();
      const newlyIdle = [...after].filter(
        ([tid, policy]) => policy === SCHED_IDLE && before.get(tid) !== SCHED_IDLE,
      );
      expect(newlyIdle).toHaveLength(2);
      // The event loop's thread keeps the normal class.
      expect(after.get(process.pid)).toBe(0);
    } finally {
      workers.close();
    }
  });

  it.runIf(linux)("leaves its threads in the normal class when not asked", async () => {
    const before = threadPolicies();
    const workers = new HashWorkers({ threads: 1, nice: 19 });
    try {
      await workers.pbkdf2(job("secret", randomBytes(16)));
      expect(workers.idle).toBe(false);
      const newlyIdle = [...threadPolicies()].filter(
        ([tid, policy]) => policy === SCHED_IDLE && before.get(tid) !== SCHED_IDLE,
      );
      expect(newlyIdle).toEqual([]);
    } finally {
      workers.close();
    }
  });

  it("computes at the event loop's priority when asked for nice 0", async () => {
    const workers = new HashWorkers({ threads: 1, nice: 0 });
    try {
      const salt = randomBytes(16);
      expect(await workers.pbkdf2(job("secret", salt))).toEqual(
        pbkdf2Sync("secret", salt, 2000, 32, "sha256"),
      );
      expect(workers.niced).toBe(false);
    } finally {
      workers.close();
    }
  });

  it("stops a thread that waited idleMs for a hash, and starts one again for the next hash", async () => {
    // Longer than one thread may take to start after the other has hashed on a loaded machine
    // (at 200 ms the first thread was stopped before the second answered: 1 running, not 2).
    const workers = new HashWorkers({ threads: 2, nice: 0, idleMs: 5_000 });
    try {
      const salt = randomBytes(16);
      await Promise.all([workers.pbkdf2(job("first", salt)), workers.pbkdf2(job("second", salt))]);
      expect(workers.threadsRunning).toBe(2);
      await vi.waitFor(() => expect(workers.threadsRunning).toBe(0), { timeout: 20_000, interval: 100 });
      expect(await workers.pbkdf2(job("again", salt))).toEqual(pbkdf2Sync("again", salt, 2000, 32, "sha256"));
      expect(workers.threadsRunning).toBe(1);
    } finally {
      workers.close();
    }
  });

  it("keeps a thread that is busy past idleMs", async () => {
    const workers = new HashWorkers({ threads: 1, nice: 0, idleMs: 50 });
    try {
      const salt = randomBytes(16);
      const slow = { secret: "slow", salt, iterations: 400_000, keyLength: 32 };
      expect(await workers.pbkdf2(slow)).toEqual(pbkdf2Sync("slow", salt, 400_000, 32, "sha256"));
    } finally {
      workers.close();
    }
  });

  it("refuses hashes once closed", async () => {
    const workers = new HashWorkers({ threads: 1, nice: 19 });
    workers.close();
    await expect(workers.pbkdf2(job("secret", randomBytes(16)))).rejects.toThrow("closed");
  });
});

describe("HashPool deadline", () => {
  it("refuses a check whose verdict is not ready by the deadline, and drops it from the queue unstarted", async () => {
    const pool = new HashPool({ concurrency: 1, queue: 4, deadlineMs: 100 });
    let release: (() => void) | undefined;
    const first = pool.run(() => new Promise<number>((resolve) => (release = () => resolve(1))));
    let secondStarted = false;
    const second = pool.run(async () => {
      secondStarted = true;
      return 2;
    });
    for (const check of [first, second]) {
      const err = await check.then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(TesseraError);
      expect((err as TesseraError).reason).toBe("UNAVAILABLE");
      expect(Number((err as TesseraError).headers["retry-after"])).toBeGreaterThan(0);
    }
    // The running hash still holds its slot (its CPU is really in use); the queued one is gone.
    expect(pool.stats()).toMatchObject({ running: 1, queued: 0, expired: 2, started: 1 });
    release!();
    await vi.waitFor(() => expect(pool.stats().running).toBe(0));
    expect(secondStarted).toBe(false);
    expect(pool.stats().started).toBe(1);
  });

  it("refuses at once a check that, by the recent hash times, would wait past the deadline", async () => {
    const pool = new HashPool({ concurrency: 1, queue: 4, deadlineMs: 100 });
    // One hash of ~80 ms teaches the pool how long hashes take.
    await pool.run(() => new Promise<void>((resolve) => setTimeout(resolve, 80)));
    let release: (() => void) | undefined;
    // A free slot always starts, whatever the estimate.
    const running = pool.run(() => new Promise<void>((resolve) => (release = resolve)));
    expect(pool.hasRoom()).toBe(false);
    // Refused without waiting for the deadline (the slot's hash and its own would take
    // ~160 ms): settled before any timer could fire, whatever the machine's load.
    let err: unknown = "not settled";
    pool
      .run(async () => 1)
      .then(
        () => {
          err = null;
        },
        (e: unknown) => {
          err = e;
        },
      );
    await Promise.resolve();
    expect((err as TesseraError).reason).toBe("UNAVAILABLE");
    expect(pool.stats()).toMatchObject({ refused: 1, expired: 0, queued: 0 });
    // New secrets are not judged by the deadline: they queue.
    const creation = pool.run(async () => "stored", "create");
    expect(pool.stats().queued).toBe(1);
    release!();
    await running.catch(() => undefined);
    await expect(creation).resolves.toBe("stored");
  });

  it("never cuts the hashing of a new secret short", async () => {
    const pool = new HashPool({ concurrency: 1, queue: 4, deadlineMs: 20 });
    const slow = pool.run(
      () => new Promise<string>((resolve) => setTimeout(() => resolve("stored"), 150)),
      "create",
    );
    await expect(slow).resolves.toBe("stored");
    expect(pool.stats().expired).toBe(0);
  });
});

/** The deadline this suite gives checks (the default is 900 ms). */
const DEADLINE_MS = 300;
/**
 * What an answer may take beyond the deadline here: the test's client and server share one
 * event loop on a machine other test files load too (measured up to ~650 ms at a load
 * average of 18). The time the event loop waited for a CPU is left out of the measure (see
 * test/run-queue.ts): that is other processes' load, which no slack bounds. Issue 18's 1 s
 * is measured by the bench, whose flood and load come from other processes
 * (bench/results/2026-12-04-flood.md). Without the deadline a login queued behind
 * low-priority hashes on such a machine waits seconds.
 */
const SERVING_SLACK_MS = 1000;

describe.each(DATABASES)(
  "password checks at low priority with a deadline, over a real server on $name",
  (db) => {
    let ts: TestServer;

    beforeAll(async () => {
      ts = await startTestServer(db, {
        // The production defaults for priority; 600k iterations (~200 ms a hash) as deployed.
        auth: {
          passwordIterations: 600_000,
          hashConcurrency: 1,
          hashQueue: 4,
          hashNice: DEFAULT_HASH_NICE,
          hashIdle: DEFAULT_HASH_IDLE,
          hashDeadlineMs: DEADLINE_MS,
        },
      });
      // The dummy hash for unknown usernames is made once, on first use: not during the flood.
      await rejection(createClient(UserService, ts.connect()).login({ username: "warm-up", password: "x" }));
    });
    afterAll(async () => {
      await ts.close();
    });

    /**
     * One login: how long it took, less the time this process's event loop (the server's and
     * the client's) waited for a CPU meanwhile, and its outcome (true, or the ConnectError).
     */
    async function timedLogin(client: ReturnType<typeof createClient<typeof UserService>>) {
      const { ms, waited, value } = await timedOnCpu(() =>
        client.login({ username: "admin", password: ADMIN_PASSWORD }).then(
          (r) => r.accessToken.length > 0,
          (e: unknown) => ConnectError.from(e),
        ),
      );
      return { ms, waited, outcome: value };
    }

    function expectAnsweredOrBusy(outcome: boolean | ConnectError): void {
      if (outcome === true) return;
      expect(outcome).toBeInstanceOf(ConnectError);
      const err = outcome as ConnectError;
      expect(err.code).toBe(Code.Unavailable);
      expect(Number(err.metadata.get("retry-after"))).toBeGreaterThan(0);
    }

    it("answers a legitimate login during a wrong-password flood by the deadline, or refuses it with Retry-After", async () => {
      const flooder = createClient(UserService, ts.connect());
      let flooding = true;
      let n = 0;
      const flood = Array.from({ length: 16 }, async () => {
        while (flooding) {
          const i = n++;
          await flooder.login({ username: `flood-${i}`, password: `wrong ${i}` }).catch(() => undefined);
          // A pause between guesses: the flood's client shares this process's event loop with the
          // server, and refusals come back at once; back to back they would be a busy loop that
          // measures this test process, not the server (the bench floods from another process).
          await new Promise((r) => setTimeout(r, 50));
        }
      });
      try {
        await vi.waitFor(() => expect(hashPool().stats().running).toBe(1), { timeout: 5000, interval: 5 });
        const legit = createClient(UserService, ts.connect());
        // Its connection opened first (TLS handshake) with a call that costs no hash.
        await rejection(legit.login({ username: "", password: "" }));
        for (let k = 0; k < 5; k++) {
          const { ms, waited, outcome } = await timedLogin(legit);
          expect(ms, `waited ${waited.toFixed(0)} ms for a CPU besides`).toBeLessThan(
            DEADLINE_MS + SERVING_SLACK_MS,
          );
          expectAnsweredOrBusy(outcome);
        }
      } finally {
        flooding = false;
        await Promise.all(flood);
      }
    });

    it("refuses checks that cannot be answered by the deadline without hashing them", async () => {
      await vi.waitFor(() => expect(hashPool().stats()).toMatchObject({ running: 0, queued: 0 }), {
        timeout: 10_000,
      });
      const before = hashPool().stats();
      const client = createClient(UserService, ts.connect());
      // Five at once on one slot: the fifth waits behind four hashes of ≥190 ms, past the deadline.
      const logins = await Promise.all(Array.from({ length: 5 }, () => timedLogin(client)));
      for (const { ms, waited, outcome } of logins) {
        expect(ms, `waited ${waited.toFixed(0)} ms for a CPU besides`).toBeLessThan(
          DEADLINE_MS + SERVING_SLACK_MS,
        );
        expectAnsweredOrBusy(outcome);
      }
      expect(logins.filter((l) => l.outcome !== true).length).toBeGreaterThan(0);
      await vi.waitFor(() => expect(hashPool().stats().running).toBe(0), { timeout: 10_000 });
      const after = hashPool().stats();
      // Refused at once (the recent hash times said they would miss it) or when the deadline passed.
      expect(after.expired - before.expired + (after.refused - before.refused)).toBeGreaterThan(0);
      // Checks refused at once or expired while queued never cost a hash.
      expect(after.started - before.started).toBeLessThan(5);
    });
  },
);
