import { randomUUID } from "node:crypto";
import { createClient, type Transport } from "@connectrpc/connect";
import type { EventSubscriber } from "@mikro-orm/core";
import { describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { Code, rejection } from "../errors-util.js";
import { clientFor, DATABASES } from "../helpers.js";
import { bearerMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { certificateTenant, certificateUser, mintBackend as mint, presenting } from "./fixtures.js";

/**
 * The adversarial review of authority and tenant walls, RPC by RPC (w-rauthz). Each test is
 * an attack that worked before its fix, driven over TLS against the real server.
 */
describe.each(DATABASES)("review: authority and tenant walls on $name", (db) => {
  const c = certificateTenant(db);

  async function bindSan(token: string, machineUserId: string, san: string, over: Transport = c.transport) {
    return clients(over, token).machines.bindCertificate({
      machineUserId,
      identity: { case: "sanUri", value: san },
    });
  }

  async function machine(token: string, scopes: string[] = []) {
    const { machine } = await bearerMachine(c.transport, token, [c.tenant.application.id], {
      tenantId: c.tenant.tenant.id,
      scopes,
    });
    return machine;
  }

  describe("proving one's own unproven SAN URI binding", () => {
    /** A certificate of a stronger machine user carrying two URIs; the `*` admin bound the first to a weak machine user. */
    async function sharedCertificate(strongProven: boolean) {
      const id = short();
      const san = { shared: `spiffe://tenant.example/pool/${id}`, own: `spiffe://tenant.example/api/${id}` };
      const strong = await machine(c.root, ["cluster:write"]);
      const victim = await mint(c.ts, san.shared, san.own);
      await bindSan(c.root, strong.id, san.own, strongProven ? presenting(c.ts, victim) : c.transport);
      const weak = await machine(c.tenant.token);
      await bindSan(c.root, weak.id, san.shared);
      return { san, strong, weak, victim };
    }

    it("weighs the prover's authority, not the first binder's: an admin:machine-users holder does not lock a stronger machine user's certificate out", async () => {
      const { san, strong, weak, victim } = await sharedCertificate(true);
      expect(await certificateUser(c.ts, victim)).toBe(strong.id);
      // The weak admin holds a certificate carrying the shared URI, and proves the binding.
      const lookalike = await mint(c.ts, san.shared);
      const { binding } = await bindSan(c.tenant.token, weak.id, san.shared, presenting(c.ts, lookalike));
      expect(binding!.proven).toBe(true);
      // As a proof of its own making would: it takes nothing from the stronger machine user.
      expect(await certificateUser(c.ts, victim)).toBe(strong.id);
      expect(await certificateUser(c.ts, lookalike)).toBe(weak.id);
    });

    it("weighs the prover's authority, not the first binder's: an admin:machine-users holder does not take a contested certificate", async () => {
      const { san, strong, weak, victim } = await sharedCertificate(false);
      const lookalike = await mint(c.ts, san.shared);
      await bindSan(c.tenant.token, weak.id, san.shared, presenting(c.ts, lookalike));
      expect(await certificateUser(c.ts, victim)).not.toBe(weak.id);
      expect(await certificateUser(c.ts, victim)).toBe(strong.id);
    });
  });

  describe("a promotion racing a change that also sets the scopes", () => {
    const PASSWORD = "correct horse battery staple";
    const NEW_PASSWORD = "attacker chosen password 1";
    const login = async (username: string, password = PASSWORD) =>
      (await createClient(UserService, c.transport).login({ username, password })).accessToken;

    async function userWith(scopes: string[]) {
      const username = `u-${short()}`;
      const { user } = await clients(c.transport, c.root).users.createUser({
        username,
        password: PASSWORD,
        scopes,
      });
      return { id: user!.id, username, token: await login(username) };
    }

    /**
     * Promote `id` to `*` (raw SQL, another connection than the request's) as the request's own
     * transaction on that row is about to begin: after its authority check (and the PBKDF2 of
     * a password reset), before its write.
     */
    function promoteBeforeWrite(entity: string, id: string, table: string) {
      const subscribers = c.ts.app.storage.em.getEventManager().getSubscribers();
      let fired = false;
      const subscriber: EventSubscriber = {
        async beforeTransactionStart({ em }) {
          if (fired || em.getUnitOfWork().getById(entity, id) === undefined) return;
          fired = true;
          await c.ts.app.sql.run(`update ${table} set scopes = ? where id = ?`, ["*", id]);
        },
      };
      subscribers.add(subscriber);
      return { fired: () => fired, stop: () => subscribers.delete(subscriber) };
    }

    it("UpdateUser: a password reset naming scopes the caller holds is not written over a user promoted to * meanwhile", async () => {
      const attacker = await userWith(["admin:users", "cluster:read"]);
      const target = await userWith(["cluster:read"]);
      const race = promoteBeforeWrite("User", target.id, "users");
      const r = await rejection(
        clients(c.transport, attacker.token).users.updateUser({
          id: target.id,
          password: NEW_PASSWORD,
          scopes: { scopes: [] },
        }),
      ).finally(race.stop);
      expect(race.fired()).toBe(true);
      expect({ code: r.code, reason: r.reason }).toEqual({
        code: Code.FailedPrecondition,
        reason: "FAILED_PRECONDITION",
      });
      // The attacker's password does not sign in; the target's own does, still holding *.
      expect((await rejection(login(target.username, NEW_PASSWORD))).reason).toBe("CREDENTIALS_INVALID");
      const again = await createClient(UserService, c.transport).login({
        username: target.username,
        password: PASSWORD,
      });
      expect(again.user!.permissions).toEqual(["*"]);
    });

    it("UpdateMachineUser: scopes the caller holds are not written over a machine user promoted to * meanwhile", async () => {
      const attacker = await userWith(["admin:machine-users", "cluster:read"]);
      const { machineUser } = await clients(c.transport, c.root).machines.createMachineUser({
        name: `mu-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["cluster:read"],
      });
      const race = promoteBeforeWrite("MachineUser", machineUser!.id, "machine_users");
      const r = await rejection(
        clients(c.transport, attacker.token).machines.updateMachineUser({
          id: machineUser!.id,
          scopes: { scopes: [] },
          disabled: true,
        }),
      ).finally(race.stop);
      expect(race.fired()).toBe(true);
      expect(r.code).toBe(Code.FailedPrecondition);
      const { machineUser: after } = await clients(c.transport, c.root).machines.getMachineUser({
        id: machineUser!.id,
      });
      expect({ scopes: after!.scopes, disabled: after!.disabled }).toEqual({
        scopes: ["*"],
        disabled: false,
      });
    });
  });

  describe("another tenant's object named by its id", () => {
    /** The ids of the entities the server hydrates while `call` runs. */
    async function hydrated(call: () => Promise<unknown>): Promise<{ ids: Set<string>; outcome: unknown }> {
      const events = c.ts.app.storage.em.getEventManager();
      const ids = new Set<string>();
      const subscriber: EventSubscriber = {
        onInit({ entity }) {
          const id = (entity as { id?: unknown }).id;
          if (typeof id === "string") ids.add(id);
        },
      };
      // Registered (not only added to the set): entity events go to the registered listeners,
      // and each request's EntityManager is forked, with its listeners, from this one.
      events.registerSubscriber(subscriber);
      try {
        return { ids, outcome: await rejection(call()).then((r) => ({ code: r.code, message: r.message })) };
      } finally {
        events.getSubscribers().delete(subscriber);
        (events as unknown as { listeners: Record<string, Set<unknown>> }).listeners.onInit?.delete(
          subscriber,
        );
      }
    }

    it("is never read: it costs what a missing id costs, and reads as missing, for every RPC taking one", async () => {
      // Another tenant's user, machine user, application, backend, personal access token and API key.
      const other = await tenantWithAdmin(c.transport, c.root, ["admin:*"]);
      const otherUser = (await clients(c.transport, other.token).users.getCurrentUser({})).id;
      const { machine: mu, token: muToken } = await bearerMachine(c.transport, other.token, [
        other.application.id,
      ]);
      const { backendId } = await clients(c.transport, muToken).machines.registerBackend({
        applicationId: other.application.id,
        callbackUrl: `https://backend-${short()}.example/callback`,
        version: "1",
      });
      const tokens = clientFor(TokenService, c.transport, other.token);
      const pat = (await tokens.createPersonalAccessToken({ name: "theirs", scopes: [] })).id;
      const key = (await tokens.createApiKey({ name: "theirs", scopes: [] })).id;

      const attacker = await tenantWithAdmin(c.transport, c.root, ["admin:*"]);
      const api = {
        ...clients(c.transport, attacker.token),
        tokens: clientFor(TokenService, c.transport, attacker.token),
      };
      const san = { case: "sanUri" as const, value: `spiffe://tenant.example/${short()}` };
      const calls: [string, string, (id: string) => Promise<unknown>][] = [
        ["GetUser", otherUser, (id) => api.users.getUser({ id })],
        ["UpdateUser", otherUser, (id) => api.users.updateUser({ id, disabled: true })],
        ["DeleteUser", otherUser, (id) => api.users.deleteUser({ id })],
        ["ListPersonalAccessTokens", otherUser, (userId) => api.tokens.listPersonalAccessTokens({ userId })],
        ["GetMachineUser", mu.id, (id) => api.machines.getMachineUser({ id })],
        ["UpdateMachineUser", mu.id, (id) => api.machines.updateMachineUser({ id, disabled: true })],
        ["RotateMachineUserCredentials", mu.id, (id) => api.machines.rotateMachineUserCredentials({ id })],
        [
          "BindCertificate",
          mu.id,
          (machineUserId) => api.machines.bindCertificate({ machineUserId, identity: san }),
        ],
        ["DeleteMachineUser", mu.id, (id) => api.machines.deleteMachineUser({ id })],
        [
          "UnbindCertificate",
          mu.id,
          (machineUserId) => api.machines.unbindCertificate({ machineUserId, identity: san }),
        ],
        [
          "ListBackends(machine_user_id)",
          mu.id,
          (machineUserId) => api.machines.listBackends({ machineUserId }),
        ],
        ["GetTenant", other.tenant.id, (id) => api.tenants.getTenant({ id })],
        ["UpdateTenant", other.tenant.id, (id) => api.tenants.updateTenant({ id, disabled: true })],
        ["ListApplications", other.tenant.id, (tenantId) => api.tenants.listApplications({ tenantId })],
        [
          "CreateApplication",
          other.tenant.id,
          (tenantId) => api.tenants.createApplication({ tenantId, name: "x" }),
        ],
        ["ListMachineUsers", other.tenant.id, (tenantId) => api.machines.listMachineUsers({ tenantId })],
        [
          "CreateUser",
          other.tenant.id,
          (tenantId) =>
            api.users.createUser({ tenantId, username: `u-${short()}`, password: "a long enough password" }),
        ],
        ["GetApplication", other.application.id, (id) => api.tenants.getApplication({ id })],
        ["DeleteApplication", other.application.id, (id) => api.tenants.deleteApplication({ id })],
        [
          "ListBackends",
          other.application.id,
          (applicationId) => api.machines.listBackends({ applicationId }),
        ],
        ["DeregisterBackend", backendId, (id) => api.machines.deregisterBackend({ id })],
        ["RevokePersonalAccessToken", pat, (id) => api.tokens.revokePersonalAccessToken({ id })],
        ["RevokeApiKey", key, (id) => api.tokens.revokeApiKey({ id })],
      ];
      for (const [rpc, theirs, call] of calls) {
        const missing = randomUUID();
        const seen = await hydrated(() => call(theirs));
        const absent = await hydrated(() => call(missing));
        expect({ rpc, outcome: seen.outcome }).toEqual({ rpc, outcome: absent.outcome });
        expect((absent.outcome as { code: Code }).code, rpc).toBe(Code.NotFound);
        expect(seen.ids.has(theirs), `${rpc} read another tenant's row`).toBe(false);
      }
    });
  });
});
