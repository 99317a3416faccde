import { randomBytes, randomUUID } from "node:crypto";
import type { Knex } from "@mikro-orm/knex";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import { MachineCredential } from "../../src/storage/machine-entities.js";
import { pinnableClock, sharedInstances, type TestServer } from "../helpers.js";
import { adminLogin, authenticates, bearerMachine, clients } from "../machine-fixtures.js";
import { pgHolds } from "../pg-holds.js";

/**
 * Two administrators rotate one machine user's credentials at once. Rotations take effect one
 * after the other, in commit order: after two without a grace period exactly one new
 * credential works, the one of the rotation that committed last (the other answered as a
 * rotation immediately followed by another); after two with a grace period, the earlier
 * one's credential lives out the later one's grace period and then ends.
 *
 * PostgreSQL, two instances on one schema: the first rotation is held inside its transaction
 * (a lock of the test's on the machine user's credential) until the second has started its
 * own on the other instance. Before, both held only a shared lock on the machine user: each
 * deleted (or ended) the credentials it saw, neither saw the other's new one, and both new
 * credentials stayed live for good. SQLite runs one write transaction at a time: two
 * concurrent calls on one instance, a guard rather than a reproduction.
 */
describe.each(["sqlite", "postgres"] as const)(
  "concurrent rotations of one machine user's credentials (%s)",
  (kind) => {
    let one: TestServer;
    let two: TestServer;
    let root: string;
    let knex: Knex;
    const clock = pinnableClock();
    // PostgreSQL: waits are bounded by the conditions below, not by the statement timeout.
    const config = { database: { statementTimeoutMs: 60_000 } };
    const servers = sharedInstances(kind, kind === "sqlite" ? [config] : [config, config], {
      clock: clock.now,
    });

    beforeAll(async () => {
      one = servers[0]!;
      two = servers[servers.length - 1]!;
      root = await adminLogin(one.connect());
      knex = one.app.storage.em.getConnection().getKnex();
    });
    afterEach(() => clock.release());

    /** Whether `credential` authenticates a call, on each instance. */
    const works = (credential: string) =>
      Promise.all([one, two].map((ts) => authenticates(ts.connect(), credential)));

    /**
     * A rotation of `id` on instance one, and a second on instance two begun while the first is
     * inside its transaction (PostgreSQL; SQLite: both at once). Both answers, first's first.
     */
    async function rotateTwice(id: string, gracePeriodSeconds: number) {
      const rotate = (ts: TestServer) =>
        clients(ts.connect(), root).machines.rotateMachineUserCredentials({ id, gracePeriodSeconds });
      if (kind === "sqlite") return Promise.all([rotate(one), rotate(two)]);
      const { blockedBy, waiterOn, hold } = pgHolds(() => knex);
      const holder = await hold("select id from machine_credentials where machine_user_id = ? for update", [
        id,
      ]);
      let first!: ReturnType<typeof rotate>;
      let second!: ReturnType<typeof rotate>;
      try {
        first = rotate(one);
        // Held at the previous credential, inside its transaction.
        const firstPid = await waiterOn(holder.pid);
        second = rotate(two);
        // The second waits too: for the first's lock on the machine user (before: for the
        // credential's row, as the first did, with a snapshot from before either inserted).
        await expect
          .poll(async () => {
            const waiting = [...(await blockedBy(holder.pid)), ...(await blockedBy(firstPid))];
            return new Set(waiting.filter((pid) => pid !== firstPid)).size;
          })
          .toBe(1);
      } finally {
        await holder.release();
      }
      return [await first, await second] as const;
    }

    /** The machine user's credentials without an end. */
    const unending = (machineUserId: string) =>
      one.app.storage.em.fork().count(MachineCredential, { machineUserId, expiresAt: null });

    it("leaves exactly one credential working after two rotations without a grace period, the last one's", async () => {
      const { machine, token } = await bearerMachine(one.connect(), root, []);
      const [a, b] = await rotateTwice(machine.id, 0);
      expect(await works(token)).toEqual([false, false]);
      const live = [await works(a.token), await works(b.token)];
      // PostgreSQL: the second waited for the first, so it committed last.
      if (kind === "postgres")
        expect(live, "both rotations' credentials work").toEqual([
          [false, false],
          [true, true],
        ]);
      else expect(live.map((l) => l.join()).sort()).toEqual(["false,false", "true,true"]);
      expect(await unending(machine.id)).toBe(1);
    });

    it("ends the earlier rotation's credential with the later one's grace period", async () => {
      const { machine, token } = await bearerMachine(one.connect(), root, []);
      const [a, b] = await rotateTwice(machine.id, 600);
      // Within the grace periods all three work.
      expect([await works(token), await works(a.token), await works(b.token)]).toEqual([
        [true, true],
        [true, true],
        [true, true],
      ]);
      expect(await unending(machine.id)).toBe(1);
      clock.pin(Date.now() + 601_000);
      const live = [await works(a.token), await works(b.token)];
      expect(await works(token)).toEqual([false, false]);
      if (kind === "postgres")
        expect(live, "the earlier rotation's credential outlived the grace period").toEqual([
          [false, false],
          [true, true],
        ]);
      else expect(live.map((l) => l.join()).sort()).toEqual(["false,false", "true,true"]);
    });

    // The rotation state as SQL writes it (microseconds; Tessera reads and writes milliseconds):
    // a write conditional on the row still holding what was read never matched it, and every
    // rotation of the machine user was refused FAILED_PRECONDITION until the column was rewritten.
    it.runIf(kind === "postgres")(
      "rotates a machine user whose rotation state an operator's SQL wrote",
      async () => {
        const { machine, token } = await bearerMachine(one.connect(), root, []);
        await knex.raw(
          "update machine_users set rotated_at = now() - interval '1 hour' + interval '1 microsecond', " +
            "rotation_grace_until = now() - interval '1 hour' + interval '1 microsecond' where id = ?",
          [machine.id],
        );
        const rotated = await clients(two.connect(), root).machines.rotateMachineUserCredentials({
          id: machine.id,
        });
        expect(await works(rotated.token)).toEqual([true, true]);
        expect(await works(token)).toEqual([false, false]);
      },
    );

    // A rolling upgrade: an instance on the previous release rotates under a shared lock of the
    // machine user (FOR KEY SHARE). Its transaction, as the test's own: it has deleted the
    // credential and inserted its new one when this release's rotation starts.
    it.runIf(kind === "postgres")(
      "replaces the credential of a previous release's rotation in its transaction when it comes second",
      async () => {
        const { machine } = await bearerMachine(one.connect(), root, []);
        const { waiterOn, hold } = pgHolds(() => knex);
        const previous = randomUUID();
        const holder = await hold(
          "with locked as (select id from machine_users where id = ? for key share), " +
            "gone as (delete from machine_credentials where machine_user_id = ?) " +
            "insert into machine_credentials (id, machine_user_id, kind, public_id, secret_hash, hint, created_at) " +
            "select ?, id, 'bearer', ?, 'x', '', now() from locked",
          [machine.id, machine.id, previous, randomBytes(8).toString("hex")],
        );
        let rotation!: Promise<unknown>;
        try {
          rotation = clients(two.connect(), root).machines.rotateMachineUserCredentials({ id: machine.id });
          // Before: held only at the credential the other deleted, with a snapshot from before its insert.
          await waiterOn(holder.pid);
        } finally {
          await holder.release();
        }
        await rotation;
        const left = await one.app.storage.em.fork().find(MachineCredential, { machineUserId: machine.id });
        expect(left.map((c) => c.id)).not.toContain(previous);
        expect(left).toHaveLength(1);
      },
    );
  },
);
