// What one instance at a time does at start, under the start-up lock: migrate, check the
// master key, make the bootstrap admin and the first signing key.
import type { Logger } from "pino";
import { createJwtService, type JwtService } from "./auth/jwt.js";
import { loadMasterKey, loadPreviousMasterKeys, sealStoredSigningKeys } from "./auth/master-key.js";
import { sharedDigestKey } from "./auth/secret-cache.js";
import { type BootstrapResult, ensureAdmin } from "./bootstrap.js";
import type { Clock } from "./clock.js";
import type { Config } from "./config.js";
import type { Storage } from "./storage/orm.js";

/** What {@link bootstrapUnderLock} needs besides the configuration. */
export interface StartupOptions {
  logger: Logger;
  clock: Clock;
  /** Run once the database is migrated, before anything is created (see CreateAppOptions). */
  beforeBootstrap?: (() => Promise<void>) | undefined;
  /** Told the admin made with a generated password at once (see CreateAppOptions.onAdminCreated). */
  onAdminCreated?: ((bootstrap: BootstrapResult) => void) | undefined;
}

/**
 * Migrate and bootstrap under the start-up lock: instances started together find each
 * other's work done, not half done.
 */
export async function bootstrapUnderLock(
  storage: Storage,
  config: Config,
  options: StartupOptions,
): Promise<{ bootstrap: BootstrapResult; jwt: JwtService; digestKey: Buffer }> {
  const { logger, clock } = options;
  return storage.withStartupLock(async (held) => {
    await held.migrate();
    await options.beforeBootstrap?.();
    // Before any key is read: clear rows sealed, and a wrong master key stops the start here,
    // before the admin is made.
    const masterKey = loadMasterKey(config.auth, storage.target);
    const previousMasterKeys = loadPreviousMasterKeys(config.auth);
    const sealed = await sealStoredSigningKeys(storage, masterKey, previousMasterKeys);
    if (sealed.resealed > 0)
      logger.info(
        { resealed: sealed.resealed, digestsCleared: sealed.digestsCleared },
        "master key rotated: signing keys resealed, shared digests of the previous key cleared",
      );
    const bootstrap = await ensureAdmin(storage.em.fork(), {
      username: config.admin.username,
      password: config.admin.password,
      iterations: config.auth.passwordIterations,
    });
    // Committed, and in no other place: told now, since every later step of the start (here
    // or in createApp) can still fail, and a later start finds the admin made.
    if (bootstrap.generatedPassword) options.onAdminCreated?.(bootstrap);
    const jwt = await createJwtService({
      config: config.auth.jwt,
      storage,
      masterKey,
      previousMasterKeys,
      maxTokenTtlSeconds: config.auth.maxTokenTtl,
      clock,
      logger,
    });
    return { bootstrap, jwt, digestKey: sharedDigestKey(masterKey.key) };
  });
}
