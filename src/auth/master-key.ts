import { createCipheriv, createDecipheriv, createHash, randomBytes } from "node:crypto";
import { closeSync, constants, fchmodSync, fstatSync, openSync, readFileSync, writeSync } from "node:fs";
import { dirname, join } from "node:path";
import type { Logger } from "pino";
import type { Config } from "../config.js";
import { assertOwnerOf, refuseOpenToOthers } from "../private-files.js";
import { SigningKey } from "../storage/entities.js";
import { loggableError } from "../storage/errors.js";
import type { DatabaseTarget, Storage } from "../storage/orm.js";
import { clearSharedDigests } from "../storage/repositories/credentials.js";

/**
 * The key-encryption key ("master key") that seals private signing keys at rest, with
 * AES-256-GCM from `node:crypto` (no library adds anything for one AEAD call).
 */
export interface MasterKey {
  /** Short public id of the key (a hash of it), written into every envelope it seals. */
  readonly id: string;
  /** Where the key came from, for messages: a config key, a file, or "ephemeral". */
  readonly source: string;
  readonly key: Buffer;
}

/** A missing or wrong master key: start-up stops with this message. */
export class MasterKeyError extends Error {
  override readonly name = "MasterKeyError";
}

/** Name of the master key file generated next to an SQLite database. */
export const MASTER_KEY_FILE_NAME = "master.key";

const ENVELOPE_VERSION = "v1";
/** Between the envelopes of one row sealed under several master keys (not in base64url). */
const ENVELOPE_SEPARATOR = ",";
const IV_BYTES = 12;
const TAG_BYTES = 16;

function masterKeyOf(key: Buffer, source: string): MasterKey {
  if (key.length !== 32) throw new MasterKeyError(`${source}: the master key must be 32 bytes (base64)`);
  // A hash, never the key: the id only tells which key sealed an envelope.
  const id = createHash("sha256")
    .update("tessera-master-key-id:")
    .update(key)
    .digest("base64url")
    .slice(0, 11);
  return { id, source, key };
}

/** Parse the base64 (or base64url) text of a 32-byte key. */
export function parseMasterKey(text: string, source: string): MasterKey {
  const trimmed = text.trim();
  if (!/^[A-Za-z0-9+/_-]{43}={0,1}$/.test(trimmed))
    throw new MasterKeyError(
      `${source}: expected the base64 of 32 random bytes (e.g. openssl rand -base64 32)`,
    );
  return masterKeyOf(Buffer.from(trimmed, "base64"), source);
}

/**
 * The master key the configuration names: `auth.masterKey`, else `auth.masterKeyFile`.
 * With neither, an SQLite database file gets `<its folder>/master.key` (0600), generated
 * on first start; an in-memory database an ephemeral key (its keys die with the process);
 * PostgreSQL refuses to start, since the key must not sit next to a shared database.
 */
export function loadMasterKey(auth: Config["auth"], target: DatabaseTarget): MasterKey {
  if (auth.masterKey !== undefined && auth.masterKeyFile !== undefined)
    throw new MasterKeyError(
      "set only one of auth.masterKey (TESSERA_MASTER_KEY) and auth.masterKeyFile (TESSERA_MASTER_KEY_FILE)",
    );
  if (auth.masterKey !== undefined)
    return parseMasterKey(auth.masterKey, "auth.masterKey (TESSERA_MASTER_KEY)");
  if (auth.masterKeyFile !== undefined) return readKeyFile(auth.masterKeyFile, false);
  if (target.kind === "postgresql")
    throw new MasterKeyError(
      "PostgreSQL needs a master key to encrypt signing keys at rest: set TESSERA_MASTER_KEY (base64 of 32 bytes, e.g. openssl rand -base64 32) or TESSERA_MASTER_KEY_FILE",
    );
  if (target.location === ":memory:") return masterKeyOf(randomBytes(32), "ephemeral");
  return readKeyFile(join(dirname(target.location), MASTER_KEY_FILE_NAME), true);
}

function readKeyFile(path: string, generate: boolean): MasterKey {
  const source = `master key file ${path}`;
  if (generate) return parseMasterKey(readGeneratedKey(path, source), source);
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new MasterKeyError(`cannot read ${source}: ${(err as Error).message}`);
  }
  // The operator's file: never altered, but refused while anyone on the machine can read it.
  try {
    refuseOpenToOthers(path, "master key file");
  } catch (err) {
    throw new MasterKeyError((err as Error).message);
  }
  return parseMasterKey(text, source);
}

/** Open flags of the generated key file: a link is not followed, a FIFO does not block the open. */
const NO_FOLLOW = (constants.O_NOFOLLOW ?? 0) | (constants.O_NONBLOCK ?? 0);

/**
 * The text of the key generated beside the database, made on first start. The file lies in
 * the database's folder, where one another user planted (before this start, or just before
 * its exclusive create) is a key they know: it is opened once, without following a link,
 * and its owner and mode are checked and fixed on that descriptor, which is the one read
 * (checked by path, the file could be swapped between the check and the read).
 */
function readGeneratedKey(path: string, source: string, retried = false): string {
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | NO_FOLLOW);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // ELOOP on Linux and macOS, EMLINK on FreeBSD: the path is a link, not followed.
    if (code === "ELOOP" || code === "EMLINK")
      throw new MasterKeyError(
        `${source} is a symbolic link, which the generated key is not read through: name the key's file with auth.masterKeyFile (TESSERA_MASTER_KEY_FILE)`,
      );
    if (code !== "ENOENT") throw new MasterKeyError(`cannot read ${source}: ${(err as Error).message}`);
    const text = `${randomBytes(32).toString("base64")}\n`;
    try {
      // Exclusive: two processes starting at once never overwrite each other's key.
      fd = openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | NO_FOLLOW, 0o600);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
      // Another process created it meanwhile: read theirs, once. Missing to open and present
      // to create again is a dangling link where O_NOFOLLOW is 0 (Windows): it would loop.
      if (retried)
        throw new MasterKeyError(
          `${source} cannot be opened, nor created as it exists: a dangling symbolic link? Remove it, or name the key's file with auth.masterKeyFile (TESSERA_MASTER_KEY_FILE)`,
        );
      return readGeneratedKey(path, source, true);
    }
    try {
      writeSync(fd, text);
    } finally {
      closeSync(fd);
    }
    return text;
  }
  try {
    const stats = fstatSync(fd);
    if (!stats.isFile()) throw new MasterKeyError(`${source} is not a regular file`);
    assertOwnerOf(stats, path, "master key file");
    // An older file may have been created readable by others: their bits are taken, the
    // owner's kept (a 0400 key stays read-only, and one on a read-only mount is not written).
    if (process.platform !== "win32" && (stats.mode & 0o077) !== 0) fchmodSync(fd, stats.mode & 0o700);
    return readFileSync(fd, "utf8");
  } finally {
    closeSync(fd);
  }
}

/** Seal a private JWK (its JSON text) for the row of signing key `kid`: `v1:<master key id>:<iv>:<ciphertext+tag>`. */
export function sealPrivateJwk(mk: MasterKey, kid: string, plaintext: string): string {
  const iv = randomBytes(IV_BYTES);
  const cipher = createCipheriv("aes-256-gcm", mk.key, iv);
  // The kid as AAD: an envelope moved to another row does not open.
  cipher.setAAD(Buffer.from(kid, "utf8"));
  const ct = Buffer.concat([cipher.update(plaintext, "utf8"), cipher.final(), cipher.getAuthTag()]);
  return [ENVELOPE_VERSION, mk.id, iv.toString("base64url"), ct.toString("base64url")].join(":");
}

/** Whether a stored `private_jwk` is sealed (else it is a clear JWK from before encryption). */
export function isSealed(stored: string): boolean {
  return stored.startsWith(`${ENVELOPE_VERSION}:`);
}

/**
 * Seal a private JWK for a key this instance creates: under `mk`, and under each of `previous`
 * too (a rolling master-key rotation), so an instance still on one of them opens it and signs
 * with it when it activates. The envelopes are joined by ","; the current key's comes first.
 */
export function sealForFleet(
  mk: MasterKey,
  previous: readonly MasterKey[],
  kid: string,
  plaintext: string,
): string {
  const keys = [
    mk,
    ...previous.filter((p, i) => p.id !== mk.id && previous.findIndex((q) => q.id === p.id) === i),
  ];
  return keys.map((k) => sealPrivateJwk(k, kid, plaintext)).join(ENVELOPE_SEPARATOR);
}

/**
 * Open what {@link sealPrivateJwk} (or {@link sealForFleet}) sealed for `kid`, with `mk` or
 * else one of `previous` (master keys being rotated out: a key an instance still on one of
 * them sealed).
 * @throws MasterKeyError when another master key sealed it, or the envelope does not authenticate.
 */
export function openPrivateJwk(
  mk: MasterKey,
  kid: string,
  stored: string,
  previous: readonly MasterKey[] = [],
): string {
  const envelopes = stored.split(ENVELOPE_SEPARATOR);
  const mine = envelopes.find((e) => sealedWith(e) === mk.id);
  if (mine !== undefined) return openWith(mk, kid, mine);
  for (const p of previous) {
    const theirs = envelopes.find((e) => sealedWith(e) === p.id);
    if (theirs !== undefined) return openWith(p, kid, theirs);
  }
  return openWith(mk, kid, envelopes[0] ?? "");
}

function openWith(mk: MasterKey, kid: string, stored: string): string {
  const parts = stored.split(":");
  if (parts.length !== 4 || parts[0] !== ENVELOPE_VERSION)
    throw new MasterKeyError(`signing key ${kid}: unknown private key envelope`);
  const [, keyId, ivText, ctText] = parts as [string, string, string, string];
  const wrong = () =>
    new MasterKeyError(
      `signing key ${kid} was encrypted with master key ${keyId}, which is not the configured one (${mk.id}, from ${mk.source}): set the master key the keys were encrypted with (to rotate it, name it in TESSERA_PREVIOUS_MASTER_KEYS)`,
    );
  if (keyId !== mk.id) throw wrong();
  const iv = Buffer.from(ivText, "base64url");
  const ct = Buffer.from(ctText, "base64url");
  if (iv.length !== IV_BYTES || ct.length <= TAG_BYTES) throw wrong();
  try {
    const decipher = createDecipheriv("aes-256-gcm", mk.key, iv);
    decipher.setAAD(Buffer.from(kid, "utf8"));
    decipher.setAuthTag(ct.subarray(ct.length - TAG_BYTES));
    return Buffer.concat([decipher.update(ct.subarray(0, ct.length - TAG_BYTES)), decipher.final()]).toString(
      "utf8",
    );
  } catch {
    throw wrong();
  }
}

/** The previous master keys of `auth.previousMasterKeys` (a rotation in progress). */
export function loadPreviousMasterKeys(auth: Config["auth"]): MasterKey[] {
  return auth.previousMasterKeys.map((k, i) =>
    parseMasterKey(k, `auth.previousMasterKeys[${i}] (TESSERA_PREVIOUS_MASTER_KEYS)`),
  );
}

/** The master key id an envelope names. */
function sealedWith(envelope: string): string | undefined {
  return envelope.split(":")[1];
}

/** The previous keys that count: the current key among them is no previous key. */
function othersThan(mk: MasterKey, previous: readonly MasterKey[]): Set<string> {
  return new Set(previous.filter((p) => p.id !== mk.id).map((p) => p.id));
}

/**
 * Whether {@link resealed} would change `stored` (no crypto: the ring asks on every read).
 * Envelopes are newest first (sealForFleet puts the current key first, a reseal prepends):
 * an instance whose envelope is not the first is an old one and leaves the row alone.
 */
export function needsReseal(mk: MasterKey, previous: readonly MasterKey[], stored: string): boolean {
  if (!isSealed(stored)) return true;
  const ids = stored.split(ENVELOPE_SEPARATOR).map(sealedWith);
  if (ids[0] === mk.id) {
    const kept = othersThan(mk, previous);
    return ids.some((id, i) => i > 0 && !kept.has(id ?? ""));
  }
  return !ids.includes(mk.id);
}

/**
 * What a row sealed as `stored` should hold for an instance on `mk` with `previous`, or
 * undefined when it is right already. A row lacking an envelope under `mk` gains one, first.
 * When `mk`'s envelope is first, the others are kept only under a configured previous key:
 * instances not yet restarted open it with theirs, and a key rotated out before (K1 of a
 * K1→K2→K3 chain) or once the roll is over (no previous key) opens nothing any more. An
 * instance whose envelope is not first is one still on an older key (during the roll, or
 * restarted in it): it must not strip the newer instances' envelopes.
 * @throws MasterKeyError when no envelope opens with `mk` or `previous` (a wrong master key).
 */
export function resealed(
  mk: MasterKey,
  previous: readonly MasterKey[],
  kid: string,
  stored: string,
): { text: string; fromPrevious: boolean } | undefined {
  const kept = othersThan(mk, previous);
  const others = previous.filter((p) => kept.has(p.id));
  if (!isSealed(stored)) return { text: sealForFleet(mk, others, kid, stored), fromPrevious: false };
  const clear = openPrivateJwk(mk, kid, stored, others);
  if (!needsReseal(mk, previous, stored)) return undefined;
  const envelopes = stored.split(ENVELOPE_SEPARATOR);
  const theirs = envelopes.filter((e) => kept.has(sealedWith(e) ?? ""));
  if (sealedWith(envelopes[0] ?? "") === mk.id)
    return { text: [envelopes[0], ...theirs].join(ENVELOPE_SEPARATOR), fromPrevious: false };
  return {
    text: [sealPrivateJwk(mk, kid, clear), ...theirs].join(ENVELOPE_SEPARATOR),
    fromPrevious: true,
  };
}

/**
 * Store {@link resealed}'s text for each of `rows` that needs it, each only while the row
 * still holds what was read (concurrent instances and starts are safe). Every row's text is
 * computed before any is written: a row that does not open stops it with all rows untouched.
 * Returns how many rows gained an envelope under `mk` from one under a previous key.
 */
export async function resealRows(
  storage: Storage,
  mk: MasterKey,
  previous: readonly MasterKey[],
  rows: readonly Pick<SigningKey, "kid" | "privateJwk">[],
): Promise<number> {
  const writes = rows.flatMap((row) => {
    const next = resealed(mk, previous, row.kid, row.privateJwk);
    return next === undefined ? [] : [{ row, next }];
  });
  const em = storage.em.fork();
  for (const { row, next } of writes)
    await em.nativeUpdate(
      SigningKey,
      { kid: row.kid, privateJwk: row.privateJwk },
      { privateJwk: next.text },
    );
  return writes.filter((w) => w.next.fromPrevious).length;
}

/**
 * The key ring's step on every read: a key an instance still on a previous key created
 * after this one started gets an envelope under `mk`, so the start that drops the previous
 * keys opens it; a row whose first envelope is `mk`'s loses those no configured previous key
 * needs (one an instance not yet restarted created, after the previous key was dropped). A
 * row that does not open (said by the ring itself) or cannot be written now is tried again
 * at the next read; a write failure is said once per key.
 */
export async function resealReadRows(
  storage: Storage,
  mk: MasterKey,
  previous: readonly MasterKey[],
  rows: readonly Pick<SigningKey, "kid" | "privateJwk">[],
  warned: Set<string>,
  log?: Pick<Logger, "warn">,
): Promise<void> {
  for (const row of rows) {
    if (!needsReseal(mk, previous, row.privateJwk)) continue;
    try {
      await resealRows(storage, mk, previous, [row]);
      warned.delete(row.kid);
    } catch (err) {
      if (err instanceof MasterKeyError || warned.has(row.kid)) continue;
      warned.add(row.kid);
      log?.warn(
        { kid: row.kid, err: loggableError(err) },
        "cannot reseal a signing key under the master key",
      );
    }
  }
}

/**
 * Start-up step: seal every signing key still stored in clear, give those sealed only with
 * one of the `previous` master keys (a rotation) an envelope under `mk` ({@link resealed}),
 * drop the envelopes no configured key needs, and check that every sealed one opens, so a
 * wrong master key stops the start with a clear message rather than letting the service
 * generate a new key. Idempotent; concurrent starts are safe.
 */
export async function sealStoredSigningKeys(
  storage: Storage,
  mk: MasterKey,
  previous: readonly MasterKey[] = [],
): Promise<{ resealed: number; digestsCleared: number }> {
  const rows = await storage.em.fork().find(SigningKey, {});
  const resealedRows = await resealRows(storage, mk, previous, rows);
  // A rotation (keys sealed under a previous master key were found): the shared digests of
  // verified secrets were keyed from that key (sharedDigestKey), and whoever holds it could
  // test guesses against them; they are cleared, and the next verification of each secret
  // stores one keyed from the new key. A digest an instance still on the previous key
  // stores later is never matched by the new key's instances, which replace it on use.
  const digestsCleared = resealedRows > 0 ? await clearSharedDigests(storage) : 0;
  return { resealed: resealedRows, digestsCleared };
}
