import { EntitySchema } from "@mikro-orm/core";

/** The two kinds of long-lived user credential; one table holds both. */
export type ApiTokenKind = "pat" | "api_key";

/**
 * A personal access token or an API key. The token itself is never stored: `publicId`
 * is the 16-character identifier embedded in it (found with one indexed look-up) and
 * `secretHash` the self-describing PBKDF2 string of its secret part
 * (`pbkdf2-sha256$<iterations>$<salt>$<hash>`). `scopes` is the explicit, normalised
 * list chosen at creation (never "inherit"); on each request it is intersected with
 * the owner's current scopes.
 */
export class ApiToken {
  id!: string;
  publicId!: string;
  kind!: ApiTokenKind;
  tenantId!: string;
  ownerUserId!: string;
  name!: string;
  scopes = "";
  secretHash!: string;
  /** Prefix and last four characters, for display. */
  hint!: string;
  createdAt: Date = new Date();
  expiresAt?: Date | null = null;
  lastUsedAt?: Date | null = null;
  revokedAt?: Date | null = null;
  /** The token of this table it was made with (its revocation revokes this one), if any. */
  madeWithTokenId?: string | null = null;
}

export const ApiTokenSchema = new EntitySchema<ApiToken>({
  class: ApiToken,
  tableName: "api_tokens",
  properties: {
    id: { type: "string", primary: true, length: 36 },
    publicId: { type: "string", length: 16, unique: true },
    kind: { type: "string", length: 16 },
    tenantId: { type: "string", length: 36, index: true },
    ownerUserId: { type: "string", length: 36, index: true },
    name: { type: "string", length: 100 },
    scopes: { type: "text", default: "" },
    secretHash: { type: "string", length: 255 },
    hint: { type: "string", length: 64 },
    createdAt: { type: "Date" },
    expiresAt: { type: "Date", nullable: true },
    lastUsedAt: { type: "Date", nullable: true },
    revokedAt: { type: "Date", nullable: true },
    madeWithTokenId: { type: "string", length: 36, nullable: true },
  },
});
