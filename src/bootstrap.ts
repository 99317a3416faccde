import { randomBytes, randomUUID } from "node:crypto";
import type { EntityManager } from "@mikro-orm/knex";
import { hashSecret } from "./auth/password.js";
import { Tenant, User } from "./storage/entities.js";

/** Name of the tenant the bootstrap admin belongs to. */
export const DEFAULT_TENANT_NAME = "default";

/** Create the default tenant if missing; returns its id. */
export async function ensureDefaultTenant(em: EntityManager): Promise<string> {
  const existing = await em.findOne(Tenant, { name: DEFAULT_TENANT_NAME });
  if (existing) return existing.id;
  const now = new Date();
  const tenant = em.create(Tenant, {
    id: randomUUID(),
    name: DEFAULT_TENANT_NAME,
    disabled: false,
    createdAt: now,
    updatedAt: now,
  });
  await em.flush();
  return tenant.id;
}

/** What {@link ensureAdmin} did. The generated password is shown once by the caller, never logged. */
export interface BootstrapResult {
  created: boolean;
  username: string;
  /** Set only when the admin was created with a generated password. */
  generatedPassword?: string;
}

/**
 * Create the bootstrap admin (scope `*`, default tenant) unless a user of that name
 * exists. The password comes from configuration or is generated.
 */
export async function ensureAdmin(
  em: EntityManager,
  options: { username: string; password?: string | undefined; iterations: number },
): Promise<BootstrapResult> {
  const tenantId = await ensureDefaultTenant(em);
  if (await em.findOne(User, { username: options.username }))
    return { created: false, username: options.username };
  const generated = options.password ? undefined : randomBytes(18).toString("base64url");
  const password = options.password ?? generated!;
  const now = new Date();
  em.create(User, {
    id: randomUUID(),
    tenantId,
    username: options.username,
    passwordHash: await hashSecret(password, options.iterations),
    scopes: "*",
    disabled: false,
    createdAt: now,
    updatedAt: now,
  });
  await em.flush();
  return {
    created: true,
    username: options.username,
    ...(generated ? { generatedPassword: generated } : {}),
  };
}
