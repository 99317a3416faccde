import { createClient, type Transport } from "@connectrpc/connect";
import type { EventSubscriber } from "@mikro-orm/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { Code, rejection } from "../errors-util.js";
import { ADMIN_PASSWORD, clientFor, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, basic, clients, short } from "../machine-fixtures.js";

/**
 * Authority is bounded (issue #18, item 1): over TLS, an administrator tries every
 * principal-changing RPC on principals stronger than itself. Each attempt must be
 * PermissionDenied / ACCESS_DENIED and leave the target untouched; the same calls on a
 * weaker target, and by a `*` caller, succeed.
 */

const STATIC_ADMIN_TOKEN = "static-admin-token-for-escalation-tests-0123456789";
const PASSWORD = "correct horse battery staple";
const NEW_PASSWORD = "attacker chosen password 1";

async function denied(call: Promise<unknown>): Promise<void> {
  const r = await rejection(call);
  expect({ code: r.code, reason: r.reason }).toEqual({
    code: Code.PermissionDenied,
    reason: "ACCESS_DENIED",
  });
}

describe.each(DATABASES)("escalation over TLS on $name", (db) => {
  let ts: TestServer;
  let t: Transport;
  let root: string;
  let rootId: string;
  let applicationId: string;

  const as = (token: string) => ({
    ...clients(t, token),
    tokens: clientFor(TokenService, t, token),
  });
  const login = async (username: string, password = PASSWORD) =>
    (await createClient(UserService, t).login({ username, password })).accessToken;

  /** A user of the default tenant holding `scopes`, logged in. */
  async function userWith(scopes: string[]) {
    const username = `u-${short()}`;
    const { user } = await as(root).users.createUser({ username, password: PASSWORD, scopes });
    return { id: user!.id, username, token: await login(username) };
  }

  /** A bearer machine user of the default tenant holding `scopes`, assigned to the application. */
  async function machineWith(scopes: string[]) {
    const res = await as(root).machines.createMachineUser({
      name: `mu-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes,
      applicationIds: [applicationId],
    });
    return { id: res.machineUser!.id, token: res.token };
  }

  beforeAll(async () => {
    ts = await startTestServer(db, { admin: { token: STATIC_ADMIN_TOKEN } });
    t = ts.connect();
    root = await adminLogin(t);
    rootId = (await as(root).users.getCurrentUser({})).id;
    applicationId = (await as(root).tenants.createApplication({ name: `app-${short()}` })).application!.id;
  });
  afterAll(async () => {
    await ts.close();
  });

  describe("users", () => {
    it.each([["admin:users"], ["admin:*"]])(
      "a holder of %s cannot reset the password of, disable, demote or delete the bootstrap * admin",
      async (scope) => {
        const attacker = await userWith([scope]);
        const u = as(attacker.token).users;
        await denied(u.updateUser({ id: rootId, password: NEW_PASSWORD }));
        await denied(u.updateUser({ id: rootId, disabled: true }));
        await denied(u.updateUser({ id: rootId, scopes: { scopes: [] } }));
        await denied(u.updateUser({ id: rootId, scopes: { scopes: [scope] } }));
        await denied(u.updateUser({ id: rootId, revokeTokens: true }));
        await denied(u.deleteUser({ id: rootId }));
        // Untouched: the old password still signs in, as a `*` admin.
        const again = await createClient(UserService, t).login({
          username: "admin",
          password: ADMIN_PASSWORD,
        });
        expect(again.user?.permissions).toEqual(["*"]);
        expect(again.user?.disabled).toBe(false);
        expect((await rejection(login("admin", NEW_PASSWORD))).reason).toBe("CREDENTIALS_INVALID");
      },
    );

    it("an admin:users holder cannot change any field of a user holding a scope it lacks", async () => {
      const attacker = await userWith(["admin:users"]);
      const target = await userWith(["cluster:write"]);
      const u = as(attacker.token).users;
      await denied(u.updateUser({ id: target.id, password: NEW_PASSWORD }));
      await denied(u.updateUser({ id: target.id, disabled: true }));
      // Even to scopes the attacker holds: the target's current ones are not covered.
      await denied(u.updateUser({ id: target.id, scopes: { scopes: ["admin:users"] } }));
      await denied(u.updateUser({ id: target.id, scopes: { scopes: [] } }));
      await denied(u.deleteUser({ id: target.id }));
      const after = (await as(root).users.getUser({ id: target.id })).user!;
      expect(after.permissions).toEqual(["cluster:write"]);
      expect(after.disabled).toBe(false);
      expect(await login(target.username)).toBeTruthy();
    });

    it("nobody sets its own password through UpdateUser, not even a * admin: FailedPrecondition, use ChangePassword", async () => {
      const self = await userWith(["admin:users"]);
      const pat = (await as(self.token).tokens.createPersonalAccessToken({ name: "self pat" })).token;
      for (const [token, id] of [
        [self.token, self.id],
        [pat, self.id],
        [root, rootId],
      ] as const) {
        for (const call of [
          () => as(token).users.updateUser({ id, password: NEW_PASSWORD }),
          () => as(token).users.updateUser({ id, password: NEW_PASSWORD, revokeTokens: true }),
          () => clients(ts.grpc(), token).users.updateUser({ id, password: NEW_PASSWORD }),
        ]) {
          const r = await rejection(call());
          expect([r.code, r.reason]).toEqual([Code.FailedPrecondition, "FAILED_PRECONDITION"]);
          expect(r.message).toContain("ChangePassword");
        }
      }
      // Nothing changed: the old passwords sign in, the new one does not, and the PAT still works.
      expect(await login(self.username)).toBeTruthy();
      expect(await login("admin", ADMIN_PASSWORD)).toBeTruthy();
      expect((await rejection(login(self.username, NEW_PASSWORD))).reason).toBe("CREDENTIALS_INVALID");
      expect((await as(pat).users.getCurrentUser({})).id).toBe(self.id);
      // The other fields of oneself are not refused by this rule, and ChangePassword works.
      await as(self.token).users.updateUser({ id: self.id, revokeTokens: true });
      await as(self.token).users.changePassword({ currentPassword: PASSWORD, newPassword: NEW_PASSWORD });
      expect(await login(self.username, NEW_PASSWORD)).toBeTruthy();
    });

    it("an admin:users holder cannot create a user with a scope it lacks", async () => {
      const attacker = await userWith(["admin:users"]);
      await denied(
        as(attacker.token).users.createUser({ username: `x-${short()}`, password: PASSWORD, scopes: ["*"] }),
      );
    });

    it("an admin:users holder manages a user whose scopes it holds", async () => {
      const manager = await userWith(["admin:users", "cluster:read"]);
      const target = await userWith(["cluster:read"]);
      const u = as(manager.token).users;
      await u.updateUser({ id: target.id, password: NEW_PASSWORD });
      expect(await login(target.username, NEW_PASSWORD)).toBeTruthy();
      expect((await u.updateUser({ id: target.id, disabled: true })).user?.disabled).toBe(true);
      expect((await u.updateUser({ id: target.id, disabled: false })).user?.disabled).toBe(false);
      expect((await u.updateUser({ id: target.id, scopes: { scopes: [] } })).user?.permissions).toEqual([]);
      await u.deleteUser({ id: target.id });
      expect((await rejection(u.getUser({ id: target.id }))).code).toBe(Code.NotFound);
    });
  });

  describe("tokens of other users", () => {
    it("an admin:tokens holder cannot revoke the tokens of a stronger user: they read as missing", async () => {
      const attacker = await userWith(["admin:tokens"]);
      const pat = await as(root).tokens.createPersonalAccessToken({ name: "root pat" });
      const key = await as(root).tokens.createApiKey({ name: "root key" });
      const absent = "00000000-0000-4000-8000-000000000000";
      for (const transport of [t, ts.grpc()]) {
        const tokens = clientFor(TokenService, transport, attacker.token);
        const missingPat = await rejection(tokens.revokePersonalAccessToken({ id: absent }));
        const missingKey = await rejection(tokens.revokeApiKey({ id: absent }));
        expect(missingPat.code).toBe(Code.NotFound);
        const patTry = await rejection(tokens.revokePersonalAccessToken({ id: pat.id }));
        const keyTry = await rejection(tokens.revokeApiKey({ id: key.id }));
        expect([patTry.code, patTry.reason, patTry.message]).toEqual([
          missingPat.code,
          missingPat.reason,
          missingPat.message,
        ]);
        expect([keyTry.code, keyTry.reason, keyTry.message]).toEqual([
          missingKey.code,
          missingKey.reason,
          missingKey.message,
        ]);
      }
      // Both still authenticate the victim.
      expect((await as(pat.token).users.getCurrentUser({})).id).toBe(rootId);
      expect((await as(key.key).users.getCurrentUser({})).id).toBe(rootId);
    });

    it("an admin:tokens holder cannot list the tokens of a stronger user: the user reads as missing, and all_users leaves them out", async () => {
      const attacker = await userWith(["admin:tokens", "cluster:read"]);
      const strong = await userWith(["admin:tokens", "cluster:write"]);
      const weak = await userWith(["cluster:read"]);
      const strongPat = await as(strong.token).tokens.createPersonalAccessToken({ name: "strong pat" });
      const strongKey = await as(strong.token).tokens.createApiKey({ name: "strong key" });
      const rootPat = await as(root).tokens.createPersonalAccessToken({ name: "root pat 2" });
      const weakPat = await as(weak.token).tokens.createPersonalAccessToken({ name: "weak pat" });
      const weakKey = await as(weak.token).tokens.createApiKey({ name: "weak key" });
      const ownPat = await as(attacker.token).tokens.createPersonalAccessToken({
        name: "own, cut down",
        scopes: ["admin:tokens"],
      });
      const hiddenIds = [strongPat.id, strongKey.id, rootPat.id];
      for (const transport of [t, ts.grpc()]) {
        // The attacker's own PAT is cut down to admin:tokens: its own tokens stay listed.
        for (const token of [attacker.token, ownPat.token]) {
          const tokens = clientFor(TokenService, transport, token);
          const missing = await rejection(
            tokens.listPersonalAccessTokens({ userId: "00000000-0000-4000-8000-000000000000" }),
          );
          expect(missing.code).toBe(Code.NotFound);
          for (const userId of [strong.id, rootId]) {
            for (const call of [
              () => tokens.listPersonalAccessTokens({ userId }),
              () => tokens.listApiKeys({ userId, includeRevoked: true }),
            ]) {
              const r = await rejection(call());
              expect([r.code, r.reason, r.message]).toEqual([missing.code, missing.reason, missing.message]);
            }
          }
          const pats = await tokens.listPersonalAccessTokens({ allUsers: true, includeRevoked: true });
          const keys = await tokens.listApiKeys({ allUsers: true, includeRevoked: true });
          const listed = [...pats.tokens, ...keys.apiKeys].map((x) => x.id);
          // Through the cut-down PAT the caller's authority is admin:tokens alone: even the weak
          // user (cluster:read) is out of its reach then.
          const weakIds = [weakPat.id, weakKey.id];
          for (const id of token === attacker.token ? hiddenIds : [...hiddenIds, ...weakIds])
            expect(listed).not.toContain(id);
          for (const id of token === attacker.token ? [...weakIds, ownPat.id] : [ownPat.id])
            expect(listed).toContain(id);
          expect(pats.totalSize).toBe(pats.tokens.length);
          // Paging through one at a time sees the same set.
          const paged: string[] = [];
          let pageToken = "";
          do {
            const page = await tokens.listPersonalAccessTokens({
              allUsers: true,
              includeRevoked: true,
              pageSize: 1,
              pageToken,
            });
            paged.push(...page.tokens.map((x) => x.id));
            pageToken = page.nextPageToken;
          } while (pageToken);
          expect(paged.sort()).toEqual(pats.tokens.map((x) => x.id).sort());
        }
        // A weak user's tokens are listed by user id too.
        const byWeak = await clientFor(TokenService, transport, attacker.token).listApiKeys({
          userId: weak.id,
        });
        expect(byWeak.apiKeys.map((x) => x.id)).toEqual([weakKey.id]);
      }
      // A * caller sees them all.
      const all = await as(root).tokens.listPersonalAccessTokens({ allUsers: true });
      for (const id of [strongPat.id, rootPat.id, weakPat.id])
        expect(all.tokens.map((x) => x.id)).toContain(id);
    });

    it("an admin:tokens holder revokes the tokens of a user whose scopes it holds", async () => {
      const manager = await userWith(["admin:tokens", "cluster:read"]);
      const owner = await userWith(["cluster:read"]);
      const pat = await as(owner.token).tokens.createPersonalAccessToken({ name: "weak pat" });
      const res = await as(manager.token).tokens.revokePersonalAccessToken({ id: pat.id });
      expect(res.token?.revoked).toBe(true);
      expect((await rejection(as(pat.token).users.getCurrentUser({}))).code).toBe(Code.Unauthenticated);
    });
  });

  describe("machine users", () => {
    it("an admin:machine-users holder cannot rotate, update, delete, bind or unbind a machine user holding a scope it lacks", async () => {
      const attacker = await userWith(["admin:machine-users"]);
      const target = await machineWith(["swarm:deploy"]);
      const san = `spiffe://tessera.test/${short()}`;
      await as(root).machines.bindCertificate({
        machineUserId: target.id,
        identity: { case: "sanUri", value: san },
      });
      const m = as(attacker.token).machines;
      await denied(m.rotateMachineUserCredentials({ id: target.id }));
      await denied(m.updateMachineUser({ id: target.id, disabled: true }));
      await denied(m.updateMachineUser({ id: target.id, name: `renamed-${short()}` }));
      await denied(m.updateMachineUser({ id: target.id, scopes: { scopes: [] } }));
      await denied(m.updateMachineUser({ id: target.id, applicationIds: { applicationIds: [] } }));
      await denied(m.deleteMachineUser({ id: target.id }));
      await denied(
        m.bindCertificate({
          machineUserId: target.id,
          identity: { case: "sha256Fingerprint", value: ts.certs.clientFingerprint },
        }),
      );
      await denied(
        m.unbindCertificate({ machineUserId: target.id, identity: { case: "sanUri", value: san } }),
      );
      // Untouched: the old credential still authenticates, with its scope, and the binding stays.
      const check = await as(target.token).machines.checkAuthentication({});
      expect(check.machineUserId).toBe(target.id);
      const after = (await as(root).machines.getMachineUser({ id: target.id })).machineUser!;
      expect(after.scopes).toEqual(["swarm:deploy"]);
      expect(after.disabled).toBe(false);
      expect(after.applicationIds).toEqual([applicationId]);
      expect(after.certificates.map((c) => c.sanUri)).toEqual([san]);
    });

    it("an admin:machine-users holder cannot deregister the backend of a stronger machine user", async () => {
      const attacker = await userWith(["admin:machine-users"]);
      const target = await machineWith(["swarm:deploy"]);
      const { backendId } = await as(target.token).machines.registerBackend({
        callbackUrl: `https://${short()}.example.com/triggers`,
        version: "1",
        applicationId,
      });
      await denied(as(attacker.token).machines.deregisterBackend({ id: backendId }));
      const listed = await as(root).machines.listBackends({ machineUserId: target.id });
      expect(listed.backends.map((b) => b.id)).toEqual([backendId]);
    });

    it("an admin:machine-users holder cannot take a stronger machine user's backend over through a machine user of its own", async () => {
      const attacker = await userWith(["admin:machine-users"]);
      const target = await machineWith(["swarm:deploy"]);
      const callbackUrl = `https://${short()}.example.com/triggers`;
      const { backendId } = await as(target.token).machines.registerBackend({
        callbackUrl,
        version: "1",
        applicationId,
      });
      // A machine user of no scope, assigned to the application: the attacker may create it.
      const pawn = await as(attacker.token).machines.createMachineUser({
        name: `pawn-${short()}`,
        authType: MachineAuthType.BEARER,
        applicationIds: [applicationId],
      });
      // Registering the same URL again would make the backend the pawn's, which the attacker
      // then manages (and deregisters).
      await denied(as(pawn.token).machines.registerBackend({ callbackUrl, version: "2", applicationId }));
      await denied(as(attacker.token).machines.deregisterBackend({ id: backendId }));
      const listed = await as(root).machines.listBackends({ machineUserId: target.id });
      expect(listed.backends.map((b) => [b.id, b.version])).toEqual([[backendId, "1"]]);
      // A peer holding what the registrant holds (a replacement of the same service) takes it over.
      const peer = await machineWith(["swarm:deploy"]);
      const again = await as(peer.token).machines.registerBackend({
        callbackUrl,
        version: "3",
        applicationId,
      });
      expect(again.backendId).toBe(backendId);
    });

    it("an admin:tenants holder cannot delete an application a stronger machine user is assigned to", async () => {
      const attacker = await userWith(["admin:tenants"]);
      const { application } = await as(root).tenants.createApplication({ name: `app-${short()}` });
      const target = await as(root).machines.createMachineUser({
        name: `mu-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["swarm:deploy"],
        applicationIds: [application!.id],
      });
      await denied(as(attacker.token).tenants.deleteApplication({ id: application!.id }));
      const after = await as(root).machines.getMachineUser({ id: target.machineUser!.id });
      expect(after.machineUser?.applicationIds).toEqual([application!.id]);
      // One whose machine users it may manage (none holding more than it) it deletes.
      const { application: spare } = await as(root).tenants.createApplication({ name: `app-${short()}` });
      await as(root).machines.createMachineUser({
        name: `mu-${short()}`,
        authType: MachineAuthType.BEARER,
        applicationIds: [spare!.id],
      });
      await as(attacker.token).tenants.deleteApplication({ id: spare!.id });
    });

    it("an admin:tenants holder can neither rename its tenant nor disable or enable it (it holds a * user)", async () => {
      const attacker = await userWith(["admin:tenants"]);
      const me = await as(attacker.token).users.getCurrentUser({});
      const t = as(attacker.token).tenants;
      expect((await rejection(t.updateTenant({ id: me.tenantId, disabled: true }))).code).toBe(
        Code.FailedPrecondition,
      );
      await denied(t.updateTenant({ id: me.tenantId, disabled: false }));
      // Renaming is a platform-wide namespace change, like creating a tenant: `*` only.
      const { tenant } = await as(root).tenants.getTenant({ id: me.tenantId });
      await denied(t.updateTenant({ id: me.tenantId, name: `${tenant!.name}-x` }));
      expect((await as(root).tenants.getTenant({ id: me.tenantId })).tenant?.name).toBe(tenant!.name);
    });

    it("an admin:machine-users holder cannot create a machine user with a scope it lacks", async () => {
      const attacker = await userWith(["admin:machine-users"]);
      await denied(
        as(attacker.token).machines.createMachineUser({
          name: `mu-${short()}`,
          authType: MachineAuthType.BASIC,
          scopes: ["swarm:deploy"],
        }),
      );
    });

    it("an admin:machine-users holder manages a machine user whose scopes it holds", async () => {
      const manager = await userWith(["admin:machine-users", "swarm:deploy"]);
      const target = await machineWith(["swarm:deploy"]);
      const m = as(manager.token).machines;
      const { backendId } = await as(target.token).machines.registerBackend({
        callbackUrl: `https://${short()}.example.com/triggers`,
        version: "1",
        applicationId,
      });
      await m.deregisterBackend({ id: backendId });
      const san = `spiffe://tessera.test/${short()}`;
      await m.bindCertificate({ machineUserId: target.id, identity: { case: "sanUri", value: san } });
      await m.unbindCertificate({ machineUserId: target.id, identity: { case: "sanUri", value: san } });
      await m.updateMachineUser({ id: target.id, scopes: { scopes: [] } });
      const rotated = await m.rotateMachineUserCredentials({ id: target.id });
      expect((await as(rotated.token).machines.checkAuthentication({})).machineUserId).toBe(target.id);
      await m.deleteMachineUser({ id: target.id });
      expect((await rejection(m.getMachineUser({ id: target.id }))).code).toBe(Code.NotFound);
    });
  });

  describe("a * caller", () => {
    it("the static admin token (scope *) resets the bootstrap admin's password and demotes and restores it", async () => {
      const admin = as(STATIC_ADMIN_TOKEN).users;
      const temporary = "a temporary admin password";
      await admin.updateUser({ id: rootId, password: temporary });
      await admin.updateUser({ id: rootId, password: ADMIN_PASSWORD });
      await admin.updateUser({ id: rootId, scopes: { scopes: ["admin:users"] } });
      const restored = await admin.updateUser({ id: rootId, scopes: { scopes: ["*"] } });
      expect(restored.user?.permissions).toEqual(["*"]);
      root = await adminLogin(t);
    });

    it("a * user manages stronger-than-admin principals: users, tokens, machine users", async () => {
      const strong = await userWith(["admin:*", "cluster:write"]);
      const key = await as(strong.token).tokens.createApiKey({ name: "strong key" });
      const r = as(root);
      await r.users.updateUser({ id: strong.id, password: NEW_PASSWORD, disabled: true });
      expect((await r.tokens.revokeApiKey({ id: key.id })).apiKey?.revoked).toBe(true);
      await r.users.deleteUser({ id: strong.id });

      const machine = await machineWith(["swarm:deploy", "admin:*"]);
      const rotated = await r.machines.rotateMachineUserCredentials({ id: machine.id });
      expect((await as(rotated.token).machines.checkAuthentication({})).machineUserId).toBe(machine.id);
      await r.machines.updateMachineUser({ id: machine.id, disabled: true });
      await r.machines.deleteMachineUser({ id: machine.id });
    });
  });

  describe("a promotion racing the change", () => {
    /**
     * Promote `id` (raw SQL, another statement than the request's) at the moment the
     * request's own flush of an `entity` change starts (or, `entity` null, its transaction
     * does): after its authority check, before its write. That is the ~200 ms PBKDF2 window
     * a password reset or a rotation leaves. (A rotation locks the machine user's row FOR
     * UPDATE first thing in its transaction: a promotion after that waits for its commit.)
     */
    function promoteBeforeWrite(entity: string | null, id: string, table: string) {
      const subscribers = ts.app.storage.em.getEventManager().getSubscribers();
      let fired = false;
      const promote = async () => {
        fired = true;
        await ts.app.sql.run(`update ${table} set scopes = ? where id = ?`, ["*", id]);
      };
      const subscriber: EventSubscriber = {
        async onFlush({ uow }) {
          if (fired || entity === null) return;
          if (uow.getChangeSets().some((c) => c.name === entity)) await promote();
        },
        async afterTransactionStart() {
          if (!fired && entity === null) await promote();
        },
      };
      subscribers.add(subscriber);
      return {
        fired: () => fired,
        stop: () => subscribers.delete(subscriber),
      };
    }

    it("a password reset of a user promoted to * while it was being hashed is not written", async () => {
      const attacker = await userWith(["admin:users", "cluster:read"]);
      const target = await userWith(["cluster:read"]);
      const race = promoteBeforeWrite("User", target.id, "users");
      const r = await rejection(
        as(attacker.token).users.updateUser({ id: target.id, password: NEW_PASSWORD }),
      ).finally(race.stop);
      expect(race.fired()).toBe(true);
      expect({ code: r.code, reason: r.reason }).toEqual({
        code: Code.FailedPrecondition,
        reason: "FAILED_PRECONDITION",
      });
      // The attacker's password does not sign in; the target's own still does.
      expect((await rejection(login(target.username, NEW_PASSWORD))).reason).toBe("CREDENTIALS_INVALID");
      expect(await login(target.username)).toBeTruthy();
    });

    it("a credential rotation of a machine user promoted to * meanwhile hands out nothing", async () => {
      const attacker = await userWith(["admin:machine-users", "swarm:deploy"]);
      const target = await machineWith(["swarm:deploy"]);
      const race = promoteBeforeWrite(null, target.id, "machine_users");
      const r = await rejection(
        as(attacker.token).machines.rotateMachineUserCredentials({ id: target.id }),
      ).finally(race.stop);
      expect(race.fired()).toBe(true);
      expect(r.code).toBe(Code.FailedPrecondition);
      // Rolled back: the previous token is still the machine user's credential.
      expect((await as(target.token).machines.checkAuthentication({})).machineUserId).toBe(target.id);
    });
  });

  it("a token cut down to admin:users cannot manage its own owner's stronger peers", async () => {
    // The caller's authority is its effective scopes for this request, not its owner's.
    const owner = await userWith(["admin:users", "cluster:write"]);
    const weakToken = await as(owner.token).tokens.createPersonalAccessToken({
      name: "users only",
      scopes: ["admin:users"],
    });
    const peer = await userWith(["cluster:write"]);
    await denied(as(weakToken.token).users.updateUser({ id: peer.id, password: NEW_PASSWORD }));
    await as(owner.token).users.updateUser({ id: peer.id, password: NEW_PASSWORD });
    // And over HTTP Basic the peer's new password works.
    const me = await clients(t, basic(peer.username, NEW_PASSWORD)).users.getCurrentUser({});
    expect(me.id).toBe(peer.id);
  });
});
