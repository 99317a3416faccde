import { randomBytes, randomUUID } from "node:crypto";
import { MACHINE_USERNAME_PREFIX } from "../../auth/machine-principal.js";
import { hashSecret } from "../../auth/password.js";
import { generateToken, tokenHint } from "../../auth/token-format.js";
import type { MachineAuthKind, MachineCredential } from "../../storage/machine-entities.js";

/** A new credential: the row to store, and what to show the caller once. */
export interface NewMachineCredential {
  row: Omit<MachineCredential, "lastUsedAt">;
  /** Shown once. Bearer: the token. */
  token: string;
  /** Shown once. Basic: the generated username and password. */
  username: string;
  password: string;
}

/**
 * Generate a credential of `kind` for a machine user: a `tsr_mu_` token (same format,
 * checksum and PBKDF2-at-rest as personal access tokens; the token's id is the row's
 * public id) or a generated `mu_…` username with a 192-bit random password. Only the
 * PBKDF2 hash of the secret is kept.
 */
export async function newMachineCredential(
  machineUserId: string,
  kind: MachineAuthKind,
  options: { tokenPrefix: string; iterations: number; now: Date },
): Promise<NewMachineCredential> {
  if (kind === "bearer") {
    const t = generateToken(options.tokenPrefix);
    return {
      row: {
        id: randomUUID(),
        machineUserId,
        kind,
        publicId: t.id,
        secretHash: await hashSecret(t.secret, options.iterations),
        hint: tokenHint(t.token, options.tokenPrefix),
        createdAt: options.now,
        expiresAt: null,
      },
      token: t.token,
      username: "",
      password: "",
    };
  }
  // base64url: no ':' (Basic splits on the first one), 16 characters, 96 random bits.
  const username = `${MACHINE_USERNAME_PREFIX}${randomBytes(12).toString("base64url")}`;
  const password = randomBytes(24).toString("base64url");
  return {
    row: {
      id: randomUUID(),
      machineUserId,
      kind,
      publicId: username,
      secretHash: await hashSecret(password, options.iterations),
      hint: "",
      createdAt: options.now,
      expiresAt: null,
    },
    token: "",
    username,
    password,
  };
}
