import { randomUUID } from "node:crypto";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { UniqueConstraintViolationException } from "@mikro-orm/core";
import {
  type BackendSchema,
  type CertificateBindingSchema,
  MachineAuthType,
  type MachineUserSchema,
  type MachineUserService,
} from "../../../gen/tessera/v1/machine_user_service_pb.js";
import type { AuditLog } from "../../audit.js";
import { assertMayManage, NEW_PRINCIPAL } from "../../auth/authority.js";
import type { JwtService } from "../../auth/jwt.js";
import { formatScopes, parseScopeString } from "../../auth/scopes.js";
import { type Clock, systemClock } from "../../clock.js";
import { type RequestState, requestState } from "../../context.js";
import { errors, TesseraError } from "../../errors.js";
import { countCredentialCreation, type RateLimits } from "../../rate-limit.js";
import {
  Application,
  Backend,
  type MachineAuthKind,
  MachineCredential,
  MachineUser,
  MachineUserApplication,
  MachineUserCertificate,
} from "../../storage/machine-entities.js";
import type { Storage } from "../../storage/orm.js";
import { requestEms } from "../../storage/request-em.js";
import {
  assertId,
  assertScopesHold,
  canSeeTenant,
  principalChanged,
  principalOf,
  tenantScope,
  writeIfScopesHold,
} from "../common.js";
import { listPage, pageParams } from "../pagination.js";
import { assertDisplayName } from "../tenant/names.js";
import { targetTenantId, visibleTenant } from "../tenant/tenant-service.js";
import { issueMachineAccessToken } from "./access-token.js";
import { normaliseCallbackUrl } from "./callback-url.js";
import { newMachineCredential } from "./credentials.js";

/** Dependencies of the MachineUserService implementation. */
export interface MachineUserServiceDeps {
  storage: Storage;
  jwt: JwtService;
  /** auth.tokens.machinePrefix */
  tokenPrefix: string;
  /** auth.passwordIterations */
  passwordIterations: number;
  /** auth.jwt.accessTokenTtl */
  accessTokenTtlSeconds: number;
  /**
   * auth.jwt.clockSkew: how far another instance's clock may differ. Tokens expire exactly
   * (no tolerance on exp), so it only widens the fail-closed window in which a rotation
   * keeps an earlier rotation's cut-off.
   */
  clockSkewSeconds: number;
  /** The clock of rotations, grace periods and token lifetimes (tests pass a manual one). */
  clock?: Clock;
  /** server.allowLoopbackHttpCallbacks */
  allowLoopbackHttpCallbacks: boolean;
  defaultTenantId: () => Promise<string>;
  /** When set: new credentials counted per caller (`rateLimit.credentialCreationsPerHour`). */
  limits?: RateLimits | undefined;
  /** Where a displaced certificate binding is recorded (see BindCertificate). */
  audit?: Pick<AuditLog, "record"> | undefined;
}

/** The audit action of an unproven binding removed by a proven bind of its identity. */
export const DISPLACED_ACTION = "tessera.v1.MachineUserService/BindCertificate:displaced";

/**
 * Whether the bind request proves possession of the certificate it binds: its connection
 * presents a CA-verified client certificate (the TLS layer checked chain and CRL; an
 * untrusted one is never on the request) whose fingerprint is the one bound, or which
 * carries the SAN URI bound. Not from a request with an Origin header: a browser presents
 * its user's client certificate on any site's cross-origin call, so a page holding the
 * caller's token could prove a certificate its user never meant to bind. Not through a
 * trusted proxy: its connection and certificate are shared by every client behind it.
 */
export function possessionProven(
  state: RequestState,
  headers: Headers,
  identity: { sha256Fingerprint: string | null; sanUri: string | null },
): boolean {
  const cert = state.certificate;
  if (cert === null || state.viaProxy || headers.has("origin")) return false;
  if (identity.sha256Fingerprint !== null) return cert.sha256Fingerprint === identity.sha256Fingerprint;
  return identity.sanUri !== null && cert.sanUris.includes(identity.sanUri);
}

/** Longest grace period a rotation may give the previous credentials. */
export const MAX_GRACE_PERIOD_SECONDS = 30 * 24 * 3600;

const AUTH_TYPES: Record<MachineAuthKind, MachineAuthType> = {
  bearer: MachineAuthType.BEARER,
  basic: MachineAuthType.BASIC,
};

function authKind(type: MachineAuthType): MachineAuthKind {
  if (type === MachineAuthType.BEARER) return "bearer";
  if (type === MachineAuthType.BASIC) return "basic";
  throw errors.invalidArgument(
    "auth_type must be MACHINE_AUTH_TYPE_BEARER or MACHINE_AUTH_TYPE_BASIC",
    "auth_type",
  );
}

/** Rows shown with a machine user. */
interface MachineDetails {
  credentials: MachineCredential[];
  applicationIds: string[];
  certificates: MachineUserCertificate[];
}

export function bindingToProto(b: MachineUserCertificate): MessageInitShape<typeof CertificateBindingSchema> {
  return {
    id: b.id,
    sha256Fingerprint: b.sha256Fingerprint ?? "",
    sanUri: b.sanUri ?? "",
    createdAt: timestampFromDate(b.createdAt),
    proven: b.proven,
  };
}

export function machineUserToProto(
  mu: MachineUser,
  d: MachineDetails,
): MessageInitShape<typeof MachineUserSchema> {
  // The current credential is the one without an end; rotated-out ones are in their grace period.
  const current = d.credentials
    .filter((c) => !c.expiresAt)
    .sort((a, b) => b.createdAt.getTime() - a.createdAt.getTime())[0];
  return {
    id: mu.id,
    tenantId: mu.tenantId,
    name: mu.name,
    authType: AUTH_TYPES[mu.authType],
    scopes: parseScopeString(mu.scopes),
    applicationIds: [...d.applicationIds].sort(),
    disabled: mu.disabled,
    username: current && current.kind === "basic" ? current.publicId : "",
    tokenHint: current && current.kind === "bearer" ? current.hint : "",
    certificates: d.certificates.map(bindingToProto),
    createdAt: timestampFromDate(mu.createdAt),
    updatedAt: timestampFromDate(mu.updatedAt),
    ...(mu.lastUsedAt ? { lastUsedAt: timestampFromDate(mu.lastUsedAt) } : {}),
  };
}

export function backendToProto(b: Backend): MessageInitShape<typeof BackendSchema> {
  return {
    id: b.id,
    tenantId: b.tenantId,
    applicationId: b.applicationId,
    machineUserId: b.machineUserId,
    callbackUrl: b.callbackUrl,
    version: b.version,
    createdAt: timestampFromDate(b.createdAt),
    updatedAt: timestampFromDate(b.updatedAt),
  };
}

/** Lowercase hex without colons, or InvalidArgument. */
function normaliseFingerprint(raw: string): string {
  const hex = raw.replace(/:/g, "").toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(hex)) {
    throw errors.invalidArgument(
      "sha256_fingerprint must be 64 hex digits (colons allowed)",
      "sha256_fingerprint",
    );
  }
  return hex;
}

function assertSanUri(raw: string): string {
  if (raw.length > 2048 || !/^[a-z][a-z0-9+.-]*:\/\/\S+$/i.test(raw)) {
    throw errors.invalidArgument(
      "san_uri must be an absolute URI such as spiffe://example.org/backend",
      "san_uri",
    );
  }
  return raw;
}

/**
 * MachineUserService: administration of machine users (admins, within their tenant;
 * `*` across tenants) and the three RPCs machine principals call themselves.
 */
export function createMachineUserService(
  deps: MachineUserServiceDeps,
): ServiceImpl<typeof MachineUserService> {
  const em = requestEms(deps.storage.em);
  const clock = deps.clock ?? systemClock;

  /** A machine user visible to the caller, or NotFound (another tenant's reads as missing). */
  async function visibleMachineUser(ctx: HandlerContext, id: string, field = "id"): Promise<MachineUser> {
    assertId(id, "machine user", field);
    const mu = await em(ctx).findOne(MachineUser, { id });
    if (!mu || !canSeeTenant(principalOf(ctx), mu.tenantId)) throw errors.notFound("machine user");
    return mu;
  }

  /**
   * A visible machine user the caller may manage (assertMayManage: its current scopes and
   * `resulting` are covered by the caller's), for every RPC that changes it, its
   * credentials, bindings or backends.
   */
  async function managedMachineUser(
    ctx: HandlerContext,
    id: string,
    field = "id",
    resulting?: readonly string[],
  ): Promise<MachineUser> {
    const mu = await visibleMachineUser(ctx, id, field);
    assertMayManage(principalOf(ctx), { scopes: parseScopeString(mu.scopes) }, resulting);
    return mu;
  }

  async function details(
    ctx: HandlerContext,
    users: readonly MachineUser[],
  ): Promise<Map<string, MachineDetails>> {
    const ids = users.map((u) => u.id);
    const out = new Map<string, MachineDetails>(
      ids.map((id) => [id, { credentials: [], applicationIds: [], certificates: [] }]),
    );
    if (ids.length === 0) return out;
    const e = em(ctx);
    for (const c of await e.find(MachineCredential, { machineUserId: { $in: ids } }))
      out.get(c.machineUserId)!.credentials.push(c);
    for (const a of await e.find(MachineUserApplication, { machineUserId: { $in: ids } })) {
      out.get(a.machineUserId)!.applicationIds.push(a.applicationId);
    }
    for (const b of await e.find(
      MachineUserCertificate,
      { machineUserId: { $in: ids } },
      { orderBy: { createdAt: "asc", id: "asc" } },
    )) {
      out.get(b.machineUserId)!.certificates.push(b);
    }
    return out;
  }

  async function toProto(ctx: HandlerContext, mu: MachineUser) {
    return machineUserToProto(mu, (await details(ctx, [mu])).get(mu.id)!);
  }

  /** Application ids (deduplicated) that all exist in `tenantId`, or NotFound. */
  async function tenantApplications(
    ctx: HandlerContext,
    tenantId: string,
    ids: readonly string[],
  ): Promise<string[]> {
    const unique = [...new Set(ids)];
    for (const id of unique) assertId(id, "application", "application_ids");
    if (unique.length === 0) return [];
    const found = await em(ctx).count(Application, { id: { $in: unique }, tenantId });
    if (found !== unique.length) throw errors.notFound("application");
    return unique;
  }

  function listScope(ctx: HandlerContext): { tenantId?: string } {
    const scope = tenantScope(principalOf(ctx));
    return scope === null ? {} : { tenantId: scope };
  }

  return {
    async createMachineUser(req, ctx) {
      const principal = principalOf(ctx);
      const e = em(ctx);
      const tenantId = await targetTenantId(ctx, e, req.tenantId, deps.defaultTenantId);
      assertDisplayName(req.name);
      const kind = authKind(req.authType);
      assertMayManage(principal, NEW_PRINCIPAL, req.scopes);
      const applicationIds = await tenantApplications(ctx, tenantId, req.applicationIds);
      if (await e.count(MachineUser, { tenantId, name: req.name })) {
        throw errors.alreadyExists("a machine user with this name exists in the tenant");
      }
      await countCredentialCreation(deps.limits, principal);
      const now = new Date(clock());
      const id = randomUUID();
      const credential = await newMachineCredential(id, kind, {
        tokenPrefix: deps.tokenPrefix,
        iterations: deps.passwordIterations,
        now,
      });
      let created: MachineUser;
      try {
        created = await e.transactional(async (tx) => {
          const mu = tx.create(MachineUser, {
            id,
            tenantId,
            name: req.name,
            authType: kind,
            scopes: formatScopes(req.scopes),
            disabled: false,
            createdAt: now,
            updatedAt: now,
          });
          // The parent row first: entities are schemas without relations, so the ORM
          // cannot order the inserts by foreign key itself.
          await tx.flush();
          tx.create(MachineCredential, credential.row);
          for (const applicationId of applicationIds)
            tx.create(MachineUserApplication, { machineUserId: id, applicationId });
          await tx.flush();
          return mu;
        });
      } catch (err) {
        if (err instanceof UniqueConstraintViolationException) {
          throw errors.alreadyExists("a machine user with this name exists in the tenant");
        }
        throw err;
      }
      return {
        machineUser: await toProto(ctx, created),
        token: credential.token,
        username: credential.username,
        password: credential.password,
      };
    },

    async getMachineUser(req, ctx) {
      return { machineUser: await toProto(ctx, await visibleMachineUser(ctx, req.id)) };
    },

    async listMachineUsers(req, ctx) {
      const paging = pageParams(req.pageSize, req.pageToken);
      const where =
        req.tenantId !== undefined
          ? { tenantId: (await visibleTenant(ctx, em(ctx), req.tenantId, "tenant_id")).id }
          : listScope(ctx);
      const page = await listPage(em(ctx), MachineUser, where, paging);
      const d = await details(ctx, page.items);
      return {
        machineUsers: page.items.map((u) => machineUserToProto(u, d.get(u.id)!)),
        nextPageToken: page.nextPageToken,
        totalSize: page.totalSize,
      };
    },

    async updateMachineUser(req, ctx) {
      const e = em(ctx);
      const mu = await managedMachineUser(ctx, req.id, "id", req.scopes?.scopes);
      if (req.name !== undefined && req.name !== mu.name) {
        assertDisplayName(req.name);
        if (await e.count(MachineUser, { tenantId: mu.tenantId, name: req.name })) {
          throw errors.alreadyExists("a machine user with this name exists in the tenant");
        }
        mu.name = req.name;
      }
      if (req.scopes) mu.scopes = formatScopes(req.scopes.scopes);
      const applicationIds = req.applicationIds
        ? await tenantApplications(ctx, mu.tenantId, req.applicationIds.applicationIds)
        : null;
      if (req.disabled !== undefined) mu.disabled = req.disabled;
      mu.updatedAt = new Date();
      try {
        await e.transactional(async (tx) => {
          if (applicationIds) {
            await tx.nativeDelete(MachineUserApplication, { machineUserId: mu.id });
            for (const applicationId of applicationIds)
              tx.create(MachineUserApplication, { machineUserId: mu.id, applicationId });
          }
          await tx.flush();
          await assertScopesHold(tx, MachineUser, mu.id, mu.scopes);
        });
      } catch (err) {
        if (err instanceof UniqueConstraintViolationException) {
          throw errors.alreadyExists("a machine user with this name exists in the tenant");
        }
        throw err;
      }
      return { machineUser: await toProto(ctx, mu) };
    },

    async deleteMachineUser(req, ctx) {
      const mu = await managedMachineUser(ctx, req.id);
      // Credentials, assignments, certificate bindings and backends cascade. Deleted only
      // if it still holds the scopes checked (not promoted meanwhile).
      if ((await em(ctx).nativeDelete(MachineUser, { id: mu.id, scopes: mu.scopes })) === 0)
        throw principalChanged();
      return {};
    },

    async rotateMachineUserCredentials(req, ctx) {
      const e = em(ctx);
      const mu = await managedMachineUser(ctx, req.id);
      const grace = req.gracePeriodSeconds ?? 0;
      if (!Number.isInteger(grace) || grace < 0 || grace > MAX_GRACE_PERIOD_SECONDS) {
        throw errors.invalidArgument(
          `grace_period_seconds must be between 0 and ${MAX_GRACE_PERIOD_SECONDS}`,
          "grace_period_seconds",
        );
      }
      const now = new Date(clock());
      const graceUntil = new Date(now.getTime() + grace * 1000);
      await countCredentialCreation(deps.limits, principalOf(ctx));
      const credential = await newMachineCredential(mu.id, mu.authType, {
        tokenPrefix: deps.tokenPrefix,
        iterations: deps.passwordIterations,
        now,
      });
      // Access tokens issued before this rotation stop when the previous credentials do.
      // Only the latest rotation is remembered, so if the previous rotation's tokens may
      // still be unexpired, its (earlier) cut-off is kept: fail closed, never revive them.
      let tokenCutoff = graceUntil;
      if (
        mu.rotatedAt &&
        mu.rotationGraceUntil &&
        now.getTime() - mu.rotatedAt.getTime() < (deps.accessTokenTtlSeconds + deps.clockSkewSeconds) * 1000
      ) {
        if (mu.rotationGraceUntil < tokenCutoff) tokenCutoff = mu.rotationGraceUntil;
      }
      await e.transactional(async (tx) => {
        // Credentials already past their end are dropped; live ones end now or after the grace period.
        await tx.nativeDelete(MachineCredential, { machineUserId: mu.id, expiresAt: { $lte: now } });
        if (grace === 0) {
          await tx.nativeDelete(MachineCredential, { machineUserId: mu.id });
        } else {
          await tx.nativeUpdate(
            MachineCredential,
            { machineUserId: mu.id, expiresAt: null },
            { expiresAt: graceUntil },
          );
          await tx.nativeUpdate(
            MachineCredential,
            { machineUserId: mu.id, expiresAt: { $gt: graceUntil } },
            { expiresAt: graceUntil },
          );
        }
        tx.create(MachineCredential, credential.row);
        mu.rotatedAt = now;
        mu.rotationGraceUntil = tokenCutoff;
        mu.updatedAt = now;
        await tx.flush();
        // The new credential carries the scopes the caller was checked against, or nothing.
        await assertScopesHold(tx, MachineUser, mu.id, mu.scopes);
      });
      return {
        machineUser: await toProto(ctx, mu),
        token: credential.token,
        username: credential.username,
        password: credential.password,
        previousCredentialsExpireAt: timestampFromDate(graceUntil),
      };
    },

    async bindCertificate(req, ctx) {
      const mu = await managedMachineUser(ctx, req.machineUserId, "machine_user_id");
      let sha256Fingerprint: string | null = null;
      let sanUri: string | null = null;
      if (req.identity.case === "sha256Fingerprint")
        sha256Fingerprint = normaliseFingerprint(req.identity.value);
      else if (req.identity.case === "sanUri") sanUri = assertSanUri(req.identity.value);
      else throw errors.invalidArgument("one of sha256_fingerprint or san_uri is required", "identity");
      const proven = possessionProven(requestState(ctx.values), ctx.requestHeader, {
        sha256Fingerprint,
        sanUri,
      });
      const e = em(ctx);
      const existing = await e.findOne(
        MachineUserCertificate,
        sha256Fingerprint ? { sha256Fingerprint } : { sanUri },
      );
      // Identities are unique across tenants (a certificate names one principal); the refusal
      // is the same whichever tenant holds the binding, so it reveals no tenant, user or id.
      const conflict = "this certificate identity is already bound to a machine user";
      let displaced: { binding: MachineUserCertificate; tenantId: string } | null = null;
      if (existing) {
        if (!proven || existing.proven) throw errors.alreadyExists(conflict);
        if (existing.machineUserId === mu.id) {
          // The owner proves its own binding: it becomes proven (and can no longer be displaced).
          await writeIfScopesHold(e, MachineUser, mu.id, mu.scopes, (tx) =>
            tx.nativeUpdate(MachineUserCertificate, { id: existing.id }, { proven: true }),
          );
          existing.proven = true;
          return { binding: bindingToProto(existing) };
        }
        const holder = await e.findOne(MachineUser, { id: existing.machineUserId });
        // The caller's own tenant: it sees that binding and can remove it itself.
        if (!holder || holder.tenantId === mu.tenantId) throw errors.alreadyExists(conflict);
        displaced = { binding: existing, tenantId: holder.tenantId };
      }
      const binding = e.create(MachineUserCertificate, {
        id: randomUUID(),
        machineUserId: mu.id,
        sha256Fingerprint,
        sanUri,
        proven,
        createdAt: new Date(),
      });
      let removed = 0;
      try {
        await writeIfScopesHold(e, MachineUser, mu.id, mu.scopes, async (tx) => {
          // Only while it is still unproven: two provers racing for one identity, the loser
          // meets the unique constraint below (AlreadyExists), never displaces the winner.
          if (displaced)
            removed = await tx.nativeDelete(MachineUserCertificate, {
              id: displaced.binding.id,
              proven: false,
            });
          await tx.flush();
        });
      } catch (err) {
        if (err instanceof UniqueConstraintViolationException) throw errors.alreadyExists(conflict);
        throw err;
      }
      if (displaced && removed > 0) {
        // In the squatter's tenant, so its auditors see why its binding went; the answer to
        // this caller is the same whether a binding was displaced or not. The prover is of
        // another tenant: its id and address are not the squatter's to read (tenants are
        // walls), so the event names no actor. The prover's own BindCertificate event, in
        // its tenant, carries the same request id for an operator who needs both.
        const state = requestState(ctx.values);
        deps.audit?.record({
          requestId: state.requestId,
          tenantId: displaced.tenantId,
          actorKind: "system",
          actorId: null,
          action: DISPLACED_ACTION,
          targetId: displaced.binding.id,
          outcome: "success",
          reason: "PROVEN_BINDING",
          ip: null,
        });
      }
      return { binding: bindingToProto(binding) };
    },

    async unbindCertificate(req, ctx) {
      const mu = await managedMachineUser(ctx, req.machineUserId, "machine_user_id");
      const id = req.identity;
      let where: Record<string, string>;
      if (id.case === "bindingId") {
        assertId(id.value, "certificate binding", "binding_id");
        where = { id: id.value };
      } else if (id.case === "sha256Fingerprint")
        where = { sha256Fingerprint: normaliseFingerprint(id.value) };
      else if (id.case === "sanUri") where = { sanUri: id.value };
      else
        throw errors.invalidArgument(
          "one of binding_id, sha256_fingerprint or san_uri is required",
          "identity",
        );
      const removed = await em(ctx).nativeDelete(MachineUserCertificate, { ...where, machineUserId: mu.id });
      if (removed === 0) throw errors.notFound("certificate binding");
      return {};
    },

    async checkAuthentication(_req, ctx) {
      const principal = principalOf(ctx);
      return {
        authenticated: true,
        machineUserId: principal.id,
        tenantId: principal.tenantId ?? "",
        message: "Authentication successful",
      };
    },

    async registerBackend(req, ctx) {
      const principal = principalOf(ctx);
      const callbackUrl = normaliseCallbackUrl(req.callbackUrl, deps.allowLoopbackHttpCallbacks);
      if (req.version.length > 64)
        throw errors.invalidArgument("version must be at most 64 characters", "version");
      if (!req.applicationId) throw errors.invalidArgument("application_id is required", "application_id");
      const e = em(ctx);
      // One answer for an application that does not exist, belongs to another tenant, or
      // is not assigned to this machine user.
      const denied = () =>
        new TesseraError("ACCESS_DENIED", "the application is not assigned to this machine user");
      if (!principal.tenantId || !principal.applicationIds?.includes(req.applicationId)) throw denied();
      const app = await e.findOne(Application, { id: req.applicationId, tenantId: principal.tenantId });
      if (!app) throw denied();
      const now = new Date();
      const upsert = async (): Promise<Backend> => {
        const existing = await e.findOne(Backend, { applicationId: app.id, callbackUrl });
        if (existing) {
          existing.version = req.version;
          existing.machineUserId = principal.id;
          existing.updatedAt = now;
          await e.flush();
          return existing;
        }
        const created = e.create(Backend, {
          id: randomUUID(),
          tenantId: app.tenantId,
          applicationId: app.id,
          machineUserId: principal.id,
          callbackUrl,
          version: req.version,
          createdAt: now,
          updatedAt: now,
        });
        await e.flush();
        return created;
      };
      let backend: Backend;
      try {
        backend = await upsert();
      } catch (err) {
        // A concurrent registration of the same URL won the insert: update that one.
        if (!(err instanceof UniqueConstraintViolationException)) throw err;
        e.clear();
        backend = await upsert();
      }
      return { success: true, backendId: backend.id, message: "Backend registered successfully" };
    },

    async issueAccessToken(_req, ctx) {
      const issued = await issueMachineAccessToken(
        { jwt: deps.jwt, accessTokenTtlSeconds: deps.accessTokenTtlSeconds, clock },
        em(ctx),
        principalOf(ctx),
        requestState(ctx.values).certificate,
      );
      return {
        accessToken: issued.token,
        expiresAt: timestampFromDate(issued.expiresAt),
        tokenType: "Bearer",
        certificateBound: issued.certificateBound,
      };
    },

    async listBackends(req, ctx) {
      const paging = pageParams(req.pageSize, req.pageToken);
      const e = em(ctx);
      const where: { tenantId?: string; applicationId?: string; machineUserId?: string } =
        req.tenantId !== undefined
          ? { tenantId: (await visibleTenant(ctx, e, req.tenantId, "tenant_id")).id }
          : listScope(ctx);
      if (req.applicationId !== undefined) {
        assertId(req.applicationId, "application", "application_id");
        const app = await e.findOne(Application, { id: req.applicationId });
        if (!app || !canSeeTenant(principalOf(ctx), app.tenantId)) throw errors.notFound("application");
        where.applicationId = app.id;
      }
      if (req.machineUserId !== undefined)
        where.machineUserId = (await visibleMachineUser(ctx, req.machineUserId, "machine_user_id")).id;
      const { items, nextPageToken, totalSize } = await listPage(e, Backend, where, paging);
      return { backends: items.map(backendToProto), nextPageToken, totalSize };
    },

    async deregisterBackend(req, ctx) {
      assertId(req.id, "backend");
      const e = em(ctx);
      const backend = await e.findOne(Backend, { id: req.id });
      if (!backend || !canSeeTenant(principalOf(ctx), backend.tenantId)) throw errors.notFound("backend");
      // Deregistering cuts the backend's machine user off its callbacks: a change to it.
      const owner = await e.findOne(MachineUser, { id: backend.machineUserId });
      if (owner) assertMayManage(principalOf(ctx), { scopes: parseScopeString(owner.scopes) });
      await e.nativeDelete(Backend, { id: backend.id });
      return {};
    },
  };
}
