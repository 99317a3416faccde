import { randomUUID } from "node:crypto";
import { decodeJwt } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import type { App } from "../src/app.js";
import { parseToken } from "../src/auth/token-format.js";
import { Code, rejection } from "./errors-util.js";
import { createTestApp, DATABASES, memoryTransport } from "./helpers.js";
import {
  adminLogin,
  basic,
  basicMachine,
  bearerMachine,
  clients,
  short,
  tenantWithAdmin,
} from "./machine-fixtures.js";

const bigints = (_: string, v: unknown) => (typeof v === "bigint" ? v.toString() : v);

describe.each(DATABASES)("MachineUserService on $name", (db) => {
  let app: App;
  let root: string;
  const as = (auth?: string | Record<string, string>) => clients(memoryTransport(app), auth);
  const tenant = () => tenantWithAdmin(memoryTransport(app), root);

  beforeAll(async () => {
    app = await createTestApp(db, { server: { allowLoopbackHttpCallbacks: false } });
    root = await adminLogin(memoryTransport(app));
  });
  afterAll(async () => {
    await app.close();
  });

  describe("creating and reading machine users", () => {
    it("creates a bearer machine user and shows its token once, in the configured format", async () => {
      const b = await tenant();
      // Scopes the tenant admin does not hold are granted by the superuser.
      const res = await as(root).machines.createMachineUser({
        tenantId: b.tenant.id,
        name: "deployer",
        authType: MachineAuthType.BEARER,
        scopes: ["swarm:deploy"],
        applicationIds: [b.application.id],
      });
      const parsed = parseToken(res.token, ["tsr_mu_"]);
      expect(parsed).not.toBeNull();
      expect(parsed).not.toBe("malformed");
      expect(res.username).toBe("");
      expect(res.password).toBe("");
      const mu = res.machineUser!;
      expect(mu.tenantId).toBe(b.tenant.id);
      expect(mu.authType).toBe(MachineAuthType.BEARER);
      expect(mu.scopes).toEqual(["swarm:deploy"]);
      expect(mu.applicationIds).toEqual([b.application.id]);
      expect(mu.tokenHint).toBe(`tsr_mu_…${res.token.slice(-4)}`);
      const again = await as(b.token).machines.getMachineUser({ id: mu.id });
      expect(JSON.stringify(again, bigints)).not.toContain(res.token);
      expect(again.machineUser?.name).toBe("deployer");
    });

    it("creates a Basic machine user with a generated mu_ username and password", async () => {
      const b = await tenant();
      const res = await as(b.token).machines.createMachineUser({
        name: "legacy",
        authType: MachineAuthType.BASIC,
      });
      expect(res.username).toMatch(/^mu_[A-Za-z0-9_-]{16}$/);
      expect(res.password.length).toBeGreaterThanOrEqual(32);
      expect(res.token).toBe("");
      expect(res.machineUser?.username).toBe(res.username);
      const got = await as(b.token).machines.getMachineUser({ id: res.machineUser!.id });
      expect(JSON.stringify(got, bigints)).not.toContain(res.password);
    });

    it("stores only PBKDF2 hashes of machine secrets", async () => {
      const b = await tenant();
      const bearer = await bearerMachine(memoryTransport(app), b.token, []);
      const basicOne = await basicMachine(memoryTransport(app), b.token, []);
      const rows = await app.sql.all<{ secret_hash: string; public_id: string }>(
        "select c.secret_hash, c.public_id from machine_credentials c where c.machine_user_id in (?, ?)",
        [bearer.machine.id, basicOne.machine.id],
      );
      expect(rows).toHaveLength(2);
      for (const r of rows) {
        expect(r.secret_hash).toMatch(/^pbkdf2-sha256\$1000\$/);
        expect(r.secret_hash).not.toContain(basicOne.password);
        expect(bearer.token).not.toContain(r.secret_hash);
      }
    });

    it("refuses a missing auth type, a duplicate name, scopes the caller lacks and another tenant's applications", async () => {
      const a = await tenant();
      const b = await tenant();
      const noType = await rejection(as(b.token).machines.createMachineUser({ name: "x" }));
      expect(noType.code).toBe(Code.InvalidArgument);
      await as(b.token).machines.createMachineUser({ name: "same", authType: MachineAuthType.BEARER });
      const dup = await rejection(
        as(b.token).machines.createMachineUser({ name: "same", authType: MachineAuthType.BEARER }),
      );
      expect(dup.code).toBe(Code.AlreadyExists);
      const escalate = await rejection(
        as(b.token).machines.createMachineUser({
          name: "esc",
          authType: MachineAuthType.BEARER,
          scopes: ["*"],
        }),
      );
      expect(escalate.code).toBe(Code.PermissionDenied);
      expect(escalate.reason).toBe("ACCESS_DENIED");
      const foreignApp = await rejection(
        as(b.token).machines.createMachineUser({
          name: "fa",
          authType: MachineAuthType.BEARER,
          applicationIds: [a.application.id],
        }),
      );
      const missingApp = await rejection(
        as(b.token).machines.createMachineUser({
          name: "fa",
          authType: MachineAuthType.BEARER,
          applicationIds: [randomUUID()],
        }),
      );
      expect(foreignApp.code).toBe(Code.NotFound);
      expect({ reason: foreignApp.reason, message: foreignApp.message }).toEqual({
        reason: missingApp.reason,
        message: missingApp.message,
      });
      const foreignTenant = await rejection(
        as(b.token).machines.createMachineUser({
          name: "ft",
          authType: MachineAuthType.BEARER,
          tenantId: a.tenant.id,
        }),
      );
      expect(foreignTenant.code).toBe(Code.NotFound);
    });

    it("lets a superuser create a machine user in any tenant, and lists per tenant with pagination", async () => {
      const b = await tenant();
      for (let i = 0; i < 3; i++)
        await bearerMachine(memoryTransport(app), root, [b.application.id], { tenantId: b.tenant.id });
      const seen: string[] = [];
      let pageToken = "";
      do {
        const page = await as(b.token).machines.listMachineUsers({ pageSize: 2, pageToken });
        seen.push(...page.machineUsers.map((m) => m.id));
        expect(page.totalSize).toBe(3);
        pageToken = page.nextPageToken;
      } while (pageToken);
      expect(new Set(seen).size).toBe(3);
      const bySuper = await as(root).machines.listMachineUsers({ tenantId: b.tenant.id });
      expect(bySuper.machineUsers.map((m) => m.id).sort()).toEqual([...seen].sort());
    });
  });

  describe("machine principals", () => {
    it("answers CheckAuthentication for a bearer token with seed 000's shape", async () => {
      const b = await tenant();
      const { machine, token } = await bearerMachine(memoryTransport(app), b.token, [b.application.id]);
      const res = await as(token).machines.checkAuthentication({});
      expect(res).toMatchObject({
        authenticated: true,
        machineUserId: machine.id,
        tenantId: b.tenant.id,
        message: "Authentication successful",
      });
    });

    it("answers CheckAuthentication for Basic credentials", async () => {
      const b = await tenant();
      const m = await basicMachine(memoryTransport(app), b.token, [b.application.id]);
      const res = await as(basic(m.username, m.password)).machines.checkAuthentication({});
      expect(res.machineUserId).toBe(m.machine.id);
      const wrong = await rejection(as(basic(m.username, "wrong password")).machines.checkAuthentication({}));
      expect(wrong.code).toBe(Code.Unauthenticated);
      expect(wrong.reason).toBe("CREDENTIALS_INVALID");
      const unknown = await rejection(
        as(basic("mu_doesnotexist00", m.password)).machines.checkAuthentication({}),
      );
      expect({ code: unknown.code, reason: unknown.reason, message: unknown.message }).toEqual({
        code: wrong.code,
        reason: wrong.reason,
        message: wrong.message,
      });
    });

    it("refuses a token with a bad checksum, an unknown token, and a Basic machine's username used as a bearer", async () => {
      const b = await tenant();
      const { token } = await bearerMachine(memoryTransport(app), b.token, []);
      const typo = `${token.slice(0, -1)}${token.endsWith("A") ? "B" : "A"}`;
      const r1 = await rejection(as(typo).machines.checkAuthentication({}));
      expect(r1.reason).toBe("TOKEN_INVALID");
      expect(r1.message).not.toContain(token);
      const { generateToken } = await import("../src/auth/token-format.js");
      const r2 = await rejection(as(generateToken("tsr_mu_").token).machines.checkAuthentication({}));
      expect(r2.reason).toBe("TOKEN_INVALID");
    });

    it("gives machine principals their tenant, scopes and assigned applications only", async () => {
      const b = await tenant();
      const { application: other } = await as(b.token).tenants.createApplication({ name: "unassigned" });
      const { token } = await bearerMachine(memoryTransport(app), root, [b.application.id], {
        tenantId: b.tenant.id,
        scopes: ["swarm:deploy"],
      });
      const ok = await as(token).machines.registerBackend({
        callbackUrl: "https://backend.example.com/triggers",
        version: "1.0.0",
        applicationId: b.application.id,
      });
      expect(ok).toMatchObject({ success: true, message: "Backend registered successfully" });
      expect(ok.backendId).toMatch(/^[0-9a-f-]{36}$/);
      const unassigned = await rejection(
        as(token).machines.registerBackend({
          callbackUrl: "https://backend.example.com/t",
          version: "1",
          applicationId: other!.id,
        }),
      );
      expect(unassigned.code).toBe(Code.PermissionDenied);
      expect(unassigned.reason).toBe("ACCESS_DENIED");
    });

    it("keeps machine principals away from every admin and user RPC", async () => {
      const b = await tenant();
      const { machine, token } = await bearerMachine(memoryTransport(app), root, [b.application.id], {
        tenantId: b.tenant.id,
        scopes: ["admin:machine-users", "admin:users", "admin:tenants"],
      });
      const m = as(token);
      const calls: (() => Promise<unknown>)[] = [
        () => m.users.getCurrentUser({}),
        () => m.users.listUsers({}),
        () => m.machines.listMachineUsers({}),
        () => m.machines.getMachineUser({ id: machine.id }),
        () => m.machines.rotateMachineUserCredentials({ id: machine.id }),
        () => m.machines.listBackends({}),
        () => m.tenants.getTenant({ id: b.tenant.id }),
      ];
      for (const call of calls) {
        const r = await rejection(call());
        expect(r.code).toBe(Code.PermissionDenied);
        expect(r.reason).toBe("PRINCIPAL_NOT_ALLOWED");
      }
    });

    it("records when a machine user was last used (coalesced writes)", async () => {
      const b = await tenant();
      const { machine, token } = await bearerMachine(memoryTransport(app), b.token, []);
      expect(
        (await as(b.token).machines.getMachineUser({ id: machine.id })).machineUser?.lastUsedAt,
      ).toBeUndefined();
      const before = Date.now() - 1000;
      await as(token).machines.checkAuthentication({});
      await app.lastUsed.flush();
      const used = (await as(b.token).machines.getMachineUser({ id: machine.id })).machineUser?.lastUsedAt;
      expect(Number(used?.seconds) * 1000).toBeGreaterThanOrEqual(Math.floor(before / 1000) * 1000);
    });

    it("keeps users away from the machine RPCs", async () => {
      const r = await rejection(as(root).machines.checkAuthentication({}));
      expect(r.code).toBe(Code.PermissionDenied);
      expect(r.reason).toBe("PRINCIPAL_NOT_ALLOWED");
    });
  });

  describe("RegisterBackend", () => {
    it("updates the same backend when the same callback URL is registered again for the application", async () => {
      const b = await tenant();
      const { token } = await bearerMachine(memoryTransport(app), b.token, [b.application.id]);
      const m = as(token).machines;
      const first = await m.registerBackend({
        callbackUrl: "https://backend.example.com/triggers",
        version: "1.0.0",
        applicationId: b.application.id,
      });
      const second = await m.registerBackend({
        callbackUrl: "https://BACKEND.example.com:443/triggers",
        version: "1.1.0",
        applicationId: b.application.id,
      });
      expect(second.backendId).toBe(first.backendId);
      const third = await m.registerBackend({
        callbackUrl: "https://backend.example.com/other",
        version: "1.0.0",
        applicationId: b.application.id,
      });
      expect(third.backendId).not.toBe(first.backendId);
      const list = await as(b.token).machines.listBackends({ applicationId: b.application.id });
      expect(list.totalSize).toBe(2);
      const updated = list.backends.find((x) => x.id === first.backendId)!;
      expect(updated.version).toBe("1.1.0");
      expect(updated.callbackUrl).toBe("https://backend.example.com/triggers");
      expect(updated.tenantId).toBe(b.tenant.id);
    });

    it("refuses callback URLs that are not absolute https URLs without user info", async () => {
      const b = await tenant();
      const { token } = await bearerMachine(memoryTransport(app), b.token, [b.application.id]);
      for (const callbackUrl of [
        "",
        "http://backend.example.com/triggers",
        "http://127.0.0.1:8080/triggers",
        "https://user:pass@backend.example.com/triggers",
        "https://user@backend.example.com/triggers",
        "/triggers",
        "backend.example.com/triggers",
        "https:backend.example.com",
        "ftp://backend.example.com/",
        "javascript://alert(1)",
        `https://example.com/${"a".repeat(2100)}`,
      ]) {
        const r = await rejection(
          as(token).machines.registerBackend({ callbackUrl, version: "1", applicationId: b.application.id }),
        );
        expect(r.code, callbackUrl).toBe(Code.InvalidArgument);
        expect(r.reason).toBe("INVALID_ARGUMENT");
      }
    });

    it("answers PermissionDenied alike for another tenant's application, a missing one and a malformed id", async () => {
      const a = await tenant();
      const b = await tenant();
      const { token } = await bearerMachine(memoryTransport(app), b.token, [b.application.id]);
      const results = [];
      for (const applicationId of [a.application.id, randomUUID(), "nope"]) {
        results.push(
          await rejection(
            as(token).machines.registerBackend({
              callbackUrl: "https://x.example.com/",
              version: "1",
              applicationId,
            }),
          ),
        );
      }
      for (const r of results) {
        expect(r.code).toBe(Code.PermissionDenied);
        expect({ reason: r.reason, message: r.message }).toEqual({
          reason: results[0]!.reason,
          message: results[0]!.message,
        });
      }
      expect((await as(root).machines.listBackends({ applicationId: a.application.id })).totalSize).toBe(0);
    });

    it("stops a machine user from registering for an application unassigned on its next request", async () => {
      const b = await tenant();
      const { machine, token } = await bearerMachine(memoryTransport(app), b.token, [b.application.id]);
      await as(b.token).machines.updateMachineUser({
        id: machine.id,
        applicationIds: { applicationIds: [] },
      });
      const r = await rejection(
        as(token).machines.registerBackend({
          callbackUrl: "https://x.example.com/",
          version: "1",
          applicationId: b.application.id,
        }),
      );
      expect(r.code).toBe(Code.PermissionDenied);
    });

    it("lets an admin deregister a backend of its tenant", async () => {
      const b = await tenant();
      const { token } = await bearerMachine(memoryTransport(app), b.token, [b.application.id]);
      const { backendId } = await as(token).machines.registerBackend({
        callbackUrl: "https://x.example.com/",
        version: "1",
        applicationId: b.application.id,
      });
      await as(b.token).machines.deregisterBackend({ id: backendId });
      expect((await as(b.token).machines.listBackends({})).totalSize).toBe(0);
      expect((await rejection(as(b.token).machines.deregisterBackend({ id: backendId }))).code).toBe(
        Code.NotFound,
      );
    });
  });

  describe("updating, disabling, deleting", () => {
    it("applies scope changes on the next request and refuses escalation", async () => {
      const b = await tenant();
      const { machine } = await bearerMachine(memoryTransport(app), b.token, []);
      const up = await as(b.token).machines.updateMachineUser({
        id: machine.id,
        scopes: { scopes: ["admin:machine-users"] },
        name: "renamed",
      });
      expect(up.machineUser?.scopes).toEqual(["admin:machine-users"]);
      expect(up.machineUser?.name).toBe("renamed");
      const esc = await rejection(
        as(b.token).machines.updateMachineUser({ id: machine.id, scopes: { scopes: ["cluster:write"] } }),
      );
      expect(esc.code).toBe(Code.PermissionDenied);
    });

    it("cuts off a disabled machine user's token and Basic credentials on the next request, and restores them on enable", async () => {
      const b = await tenant();
      const t = await bearerMachine(memoryTransport(app), b.token, []);
      const p = await basicMachine(memoryTransport(app), b.token, []);
      const creds = [t.token, basic(p.username, p.password)];
      for (const c of creds) await as(c).machines.checkAuthentication({});
      for (const id of [t.machine.id, p.machine.id])
        await as(b.token).machines.updateMachineUser({ id, disabled: true });
      // Basic answers a disabled machine user's correct password like a wrong one (no oracle).
      for (const [c, reason] of [
        [creds[0]!, "PRINCIPAL_DISABLED"],
        [creds[1]!, "CREDENTIALS_INVALID"],
      ] as const) {
        const r = await rejection(as(c).machines.checkAuthentication({}));
        expect(r.code).toBe(Code.Unauthenticated);
        expect(r.reason).toBe(reason);
      }
      for (const id of [t.machine.id, p.machine.id])
        await as(b.token).machines.updateMachineUser({ id, disabled: false });
      for (const c of creds) expect((await as(c).machines.checkAuthentication({})).authenticated).toBe(true);
    });

    it("cuts off a deleted machine user's credentials on the next request", async () => {
      const b = await tenant();
      const t = await bearerMachine(memoryTransport(app), b.token, [b.application.id]);
      const p = await basicMachine(memoryTransport(app), b.token, []);
      await as(t.token).machines.registerBackend({
        callbackUrl: "https://x.example.com/",
        version: "1",
        applicationId: b.application.id,
      });
      for (const id of [t.machine.id, p.machine.id]) await as(b.token).machines.deleteMachineUser({ id });
      expect((await rejection(as(t.token).machines.checkAuthentication({}))).reason).toBe("TOKEN_INVALID");
      expect(
        (await rejection(as(basic(p.username, p.password)).machines.checkAuthentication({}))).reason,
      ).toBe("CREDENTIALS_INVALID");
      expect((await rejection(as(b.token).machines.getMachineUser({ id: t.machine.id }))).code).toBe(
        Code.NotFound,
      );
      expect((await as(b.token).machines.listBackends({})).totalSize).toBe(0);
    });
  });

  describe("rotation", () => {
    it("replaces a bearer token at once without a grace period", async () => {
      const b = await tenant();
      const { machine, token } = await bearerMachine(memoryTransport(app), b.token, []);
      const rotated = await as(b.token).machines.rotateMachineUserCredentials({ id: machine.id });
      expect(rotated.token).not.toBe(token);
      expect(rotated.machineUser?.tokenHint).toBe(`tsr_mu_…${rotated.token.slice(-4)}`);
      const old = await rejection(as(token).machines.checkAuthentication({}));
      expect(old.code).toBe(Code.Unauthenticated);
      expect(old.reason).toBe("TOKEN_INVALID");
      expect((await as(rotated.token).machines.checkAuthentication({})).machineUserId).toBe(machine.id);
    });

    it("keeps the old token working for the grace period and refuses it once the period is over", async () => {
      const b = await tenant();
      const { machine, token } = await bearerMachine(memoryTransport(app), b.token, []);
      const rotated = await as(b.token).machines.rotateMachineUserCredentials({
        id: machine.id,
        gracePeriodSeconds: 3600,
      });
      const expires = Number(rotated.previousCredentialsExpireAt!.seconds) * 1000;
      expect(expires).toBeGreaterThan(Date.now() + 3500_000);
      expect((await as(token).machines.checkAuthentication({})).machineUserId).toBe(machine.id);
      expect((await as(rotated.token).machines.checkAuthentication({})).machineUserId).toBe(machine.id);
      // The grace period ends (moved into the past rather than waited for).
      await app.sql.run(
        "update machine_credentials set expires_at = ? where machine_user_id = ? and expires_at is not null",
        [new Date(Date.now() - 1000), machine.id],
      );
      const old = await rejection(as(token).machines.checkAuthentication({}));
      expect(old.code).toBe(Code.Unauthenticated);
      expect(old.reason).toBe("TOKEN_REVOKED");
      expect((await as(rotated.token).machines.checkAuthentication({})).authenticated).toBe(true);
    });

    it("gives a Basic machine user a new username and password, the old ones refused at once", async () => {
      const b = await tenant();
      const p = await basicMachine(memoryTransport(app), b.token, []);
      await as(basic(p.username, p.password)).machines.checkAuthentication({});
      const rotated = await as(b.token).machines.rotateMachineUserCredentials({ id: p.machine.id });
      expect(rotated.username).toMatch(/^mu_/);
      expect(rotated.username).not.toBe(p.username);
      expect(rotated.machineUser?.username).toBe(rotated.username);
      const old = await rejection(as(basic(p.username, p.password)).machines.checkAuthentication({}));
      expect(old.code).toBe(Code.Unauthenticated);
      expect(
        (await as(basic(rotated.username, rotated.password)).machines.checkAuthentication({})).machineUserId,
      ).toBe(p.machine.id);
    });

    it("refuses a negative or too long grace period", async () => {
      const b = await tenant();
      const { machine } = await bearerMachine(memoryTransport(app), b.token, []);
      for (const gracePeriodSeconds of [-1, 31 * 24 * 3600]) {
        const r = await rejection(
          as(b.token).machines.rotateMachineUserCredentials({ id: machine.id, gracePeriodSeconds }),
        );
        expect(r.code).toBe(Code.InvalidArgument);
      }
    });
  });

  describe("access tokens", () => {
    it("issues a short-lived machine JWT that CheckAuthentication accepts", async () => {
      const b = await tenant();
      const { machine, token } = await bearerMachine(memoryTransport(app), root, [b.application.id], {
        tenantId: b.tenant.id,
        scopes: ["swarm:deploy"],
      });
      const issued = await as(token).machines.issueAccessToken({});
      expect(issued.tokenType).toBe("Bearer");
      expect(issued.certificateBound).toBe(false);
      const claims = decodeJwt(issued.accessToken);
      expect(claims.sub).toBe(machine.id);
      expect(claims.pk).toBe("machine");
      expect(claims.tid).toBe(b.tenant.id);
      expect(claims.scope).toBe("swarm:deploy");
      expect(claims.cnf).toBeUndefined();
      expect(Number(issued.expiresAt!.seconds)).toBe(claims.exp);
      const res = await as(issued.accessToken).machines.checkAuthentication({});
      expect(res.machineUserId).toBe(machine.id);
      await as(issued.accessToken).machines.registerBackend({
        callbackUrl: "https://x.example.com/",
        version: "1",
        applicationId: b.application.id,
      });
    });

    it("does not let an access token issue another", async () => {
      const b = await tenant();
      const { token } = await bearerMachine(memoryTransport(app), b.token, []);
      const { accessToken } = await as(token).machines.issueAccessToken({});
      const r = await rejection(as(accessToken).machines.issueAccessToken({}));
      expect(r.code).toBe(Code.PermissionDenied);
      expect(r.reason).toBe("ACCESS_DENIED");
    });

    it("refuses a machine JWT once its machine user is disabled or deleted", async () => {
      const b = await tenant();
      const { machine, token } = await bearerMachine(memoryTransport(app), b.token, []);
      const { accessToken } = await as(token).machines.issueAccessToken({});
      await as(b.token).machines.updateMachineUser({ id: machine.id, disabled: true });
      expect((await rejection(as(accessToken).machines.checkAuthentication({}))).reason).toBe(
        "PRINCIPAL_DISABLED",
      );
      await as(b.token).machines.deleteMachineUser({ id: machine.id });
      expect((await rejection(as(accessToken).machines.checkAuthentication({}))).reason).toBe(
        "TOKEN_REVOKED",
      );
    });

    it("refuses machine JWTs issued before a rotation, and accepts those issued after it", async () => {
      const b = await tenant();
      const { machine, token } = await bearerMachine(memoryTransport(app), b.token, []);
      const before = (await as(token).machines.issueAccessToken({})).accessToken;
      const rotated = await as(b.token).machines.rotateMachineUserCredentials({ id: machine.id });
      const r = await rejection(as(before).machines.checkAuthentication({}));
      expect(r.code).toBe(Code.Unauthenticated);
      expect(r.reason).toBe("TOKEN_REVOKED");
      const after = (await as(rotated.token).machines.issueAccessToken({})).accessToken;
      expect((await as(after).machines.checkAuthentication({})).machineUserId).toBe(machine.id);
    });

    it("keeps pre-rotation JWTs during the grace period, and caps tokens issued by a credential in its grace period", async () => {
      const b = await tenant();
      const { machine, token } = await bearerMachine(memoryTransport(app), b.token, []);
      const before = (await as(token).machines.issueAccessToken({})).accessToken;
      await as(b.token).machines.rotateMachineUserCredentials({ id: machine.id, gracePeriodSeconds: 120 });
      expect((await as(before).machines.checkAuthentication({})).machineUserId).toBe(machine.id);
      const fromOld = await as(token).machines.issueAccessToken({});
      const exp = decodeJwt(fromOld.accessToken).exp!;
      expect(exp * 1000).toBeLessThanOrEqual(Date.now() + 121_000);
      // The grace period ends: the pre-rotation token stops with the old credential.
      await app.sql.run("update machine_users set rotation_grace_until = ? where id = ?", [
        new Date(Date.now() - 1000),
        machine.id,
      ]);
      expect((await rejection(as(before).machines.checkAuthentication({}))).reason).toBe("TOKEN_REVOKED");
    });
  });

  describe("certificate bindings", () => {
    it("binds fingerprints (normalised) and SAN URIs, each to one machine user only", async () => {
      const b = await tenant();
      const one = await bearerMachine(memoryTransport(app), b.token, []);
      const two = await bearerMachine(memoryTransport(app), b.token, []);
      const fp = `${"AB:".repeat(31)}AB`;
      const { binding } = await as(b.token).machines.bindCertificate({
        machineUserId: one.machine.id,
        identity: { case: "sha256Fingerprint", value: fp },
      });
      expect(binding?.sha256Fingerprint).toBe("ab".repeat(32));
      const san = `spiffe://example.org/${short()}`;
      await as(b.token).machines.bindCertificate({
        machineUserId: one.machine.id,
        identity: { case: "sanUri", value: san },
      });
      const got = await as(b.token).machines.getMachineUser({ id: one.machine.id });
      expect(got.machineUser?.certificates.map((c) => c.sha256Fingerprint || c.sanUri).sort()).toEqual(
        ["ab".repeat(32), san].sort(),
      );
      for (const identity of [
        { case: "sha256Fingerprint" as const, value: "ab".repeat(32) },
        { case: "sanUri" as const, value: san },
      ]) {
        const dup = await rejection(
          as(b.token).machines.bindCertificate({ machineUserId: two.machine.id, identity }),
        );
        expect(dup.code).toBe(Code.AlreadyExists);
      }
      for (const identity of [
        { case: "sha256Fingerprint" as const, value: "xyz" },
        { case: "sanUri" as const, value: "not a uri" },
        { case: undefined },
      ]) {
        const bad = await rejection(
          as(b.token).machines.bindCertificate({ machineUserId: two.machine.id, identity }),
        );
        expect(bad.code).toBe(Code.InvalidArgument);
      }
      await as(b.token).machines.unbindCertificate({
        machineUserId: one.machine.id,
        identity: { case: "sanUri", value: san },
      });
      await as(b.token).machines.unbindCertificate({
        machineUserId: one.machine.id,
        identity: { case: "bindingId", value: binding!.id },
      });
      expect(
        (await as(b.token).machines.getMachineUser({ id: one.machine.id })).machineUser?.certificates,
      ).toEqual([]);
      const gone = await rejection(
        as(b.token).machines.unbindCertificate({
          machineUserId: one.machine.id,
          identity: { case: "sanUri", value: san },
        }),
      );
      expect(gone.code).toBe(Code.NotFound);
    });
  });

  describe("tenant isolation", () => {
    it("answers NotFound for another tenant's machine users and backends exactly as for missing ids", async () => {
      const a = await tenant();
      const b = await tenant();
      const victim = await bearerMachine(memoryTransport(app), a.token, [a.application.id]);
      const { backendId } = await as(victim.token).machines.registerBackend({
        callbackUrl: "https://a.example.com/",
        version: "1",
        applicationId: a.application.id,
      });
      await as(a.token).machines.bindCertificate({
        machineUserId: victim.machine.id,
        identity: { case: "sanUri", value: `spiffe://a/${short()}` },
      });
      const m = as(b.token).machines;
      const missing = randomUUID();
      const probes: ((id: string) => Promise<unknown>)[] = [
        (id) => m.getMachineUser({ id }),
        (id) => m.updateMachineUser({ id, disabled: true }),
        (id) => m.updateMachineUser({ id, scopes: { scopes: [] } }),
        (id) => m.rotateMachineUserCredentials({ id }),
        (id) => m.deleteMachineUser({ id }),
        (id) =>
          m.bindCertificate({
            machineUserId: id,
            identity: { case: "sanUri", value: `spiffe://b/${short()}` },
          }),
        (id) =>
          m.unbindCertificate({ machineUserId: id, identity: { case: "bindingId", value: randomUUID() } }),
        (id) => m.listBackends({ machineUserId: id }),
      ];
      for (const probe of probes) {
        const f = await rejection(probe(victim.machine.id));
        const n = await rejection(probe(missing));
        expect(f.code).toBe(Code.NotFound);
        expect({ code: f.code, reason: f.reason, message: f.message }).toEqual({
          code: n.code,
          reason: n.reason,
          message: n.message,
        });
      }
      const idProbes: [() => Promise<unknown>, () => Promise<unknown>][] = [
        [() => m.deregisterBackend({ id: backendId }), () => m.deregisterBackend({ id: missing })],
        [
          () => m.listBackends({ applicationId: a.application.id }),
          () => m.listBackends({ applicationId: missing }),
        ],
        [
          () => m.listMachineUsers({ tenantId: a.tenant.id }),
          () => m.listMachineUsers({ tenantId: missing }),
        ],
        [() => m.listBackends({ tenantId: a.tenant.id }), () => m.listBackends({ tenantId: missing })],
        [
          () => m.updateMachineUser({ id: victim.machine.id, applicationIds: { applicationIds: [] } }),
          () => m.updateMachineUser({ id: missing, applicationIds: { applicationIds: [] } }),
        ],
      ];
      for (const [foreign, absent] of idProbes) {
        const f = await rejection(foreign());
        const n = await rejection(absent());
        expect(f.code).toBe(Code.NotFound);
        expect({ code: f.code, reason: f.reason, message: f.message }).toEqual({
          code: n.code,
          reason: n.reason,
          message: n.message,
        });
      }
      // B's lists neither return nor count A's rows.
      const mine = await m.listMachineUsers({});
      expect(mine.machineUsers.map((x) => x.tenantId)).toEqual([]);
      expect(mine.totalSize).toBe(0);
      expect((await m.listBackends({})).totalSize).toBe(0);
      // A's machine user is untouched and still works.
      const still = await as(a.token).machines.getMachineUser({ id: victim.machine.id });
      expect(still.machineUser?.disabled).toBe(false);
      expect(still.machineUser?.certificates).toHaveLength(1);
      expect((await as(victim.token).machines.checkAuthentication({})).authenticated).toBe(true);
      expect((await as(a.token).machines.listBackends({})).backends.map((x) => x.id)).toEqual([backendId]);
    });

    it("does not let an admin assign another tenant's application to its machine user", async () => {
      const a = await tenant();
      const b = await tenant();
      const { machine } = await bearerMachine(memoryTransport(app), b.token, []);
      const r = await rejection(
        as(b.token).machines.updateMachineUser({
          id: machine.id,
          applicationIds: { applicationIds: [a.application.id] },
        }),
      );
      expect(r.code).toBe(Code.NotFound);
      expect(
        (await as(b.token).machines.getMachineUser({ id: machine.id })).machineUser?.applicationIds,
      ).toEqual([]);
    });

    it("needs admin:machine-users for administration", async () => {
      const b = await tenantWithAdmin(memoryTransport(app), root, ["admin:tenants"]);
      const r = await rejection(as(b.token).machines.listMachineUsers({}));
      expect(r.code).toBe(Code.PermissionDenied);
      expect(r.reason).toBe("ACCESS_DENIED");
    });
  });
});
