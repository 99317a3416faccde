// Interleaving requests at their PostgreSQL row locks, deterministically: a transaction of the
// test's own holds a lock, and each step waits on pg_blocking_pids, not on time.
import { ConnectError } from "@connectrpc/connect";
import type { Knex } from "@mikro-orm/knex";
import { expect } from "vitest";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";

/** What became of `call`: "done", or the reason it was refused with. */
export async function outcome(call: Promise<unknown>): Promise<string> {
  try {
    await call;
    return "done";
  } catch (err) {
    const e = ConnectError.from(err);
    return e.findDetails(ErrorInfoSchema)[0]?.reason ?? String(e);
  }
}

/** Lock holds and waits on the database `knex` connects to. */
export function pgHolds(knex: () => Knex) {
  /** The server processes waiting for a lock `pid` holds. */
  async function blockedBy(pid: number): Promise<number[]> {
    const { rows } = await knex().raw(
      "select pid from pg_stat_activity where ?::int = any(pg_blocking_pids(pid)) order by pid",
      [pid],
    );
    return rows.map((r: { pid: number }) => r.pid);
  }

  /** The one server process waiting for `pid`, once there is one. */
  async function waiterOn(pid: number): Promise<number> {
    await expect.poll(() => blockedBy(pid)).toHaveLength(1);
    return (await blockedBy(pid))[0]!;
  }

  /** A transaction of the test's that runs `sql` (taking its locks) and holds them until released. */
  async function hold(sql: string, params: string[]) {
    let release!: () => void;
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    let held!: (pid: number) => void;
    const holding = new Promise<number>((resolve) => {
      held = resolve;
    });
    const done = knex().transaction(async (trx) => {
      const pid = (await trx.raw("select pg_backend_pid() as pid")).rows[0].pid as number;
      await trx.raw(sql, params);
      held(pid);
      await released;
    });
    const pid = await Promise.race([holding, done.then(() => -1)]);
    return {
      pid,
      async release() {
        release();
        await done;
      },
    };
  }

  return { blockedBy, waiterOn, hold };
}
