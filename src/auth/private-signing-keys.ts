// The private halves of the stored signing keys: opened with the master key (or a previous
// one, during a rotation) ahead of their activation, and kept while their rows are unchanged.
import { type CryptoKey, importJWK } from "jose";
import type { Logger } from "pino";
import type { SigningKey } from "../storage/entities.js";
import type { Storage } from "../storage/orm.js";
import { type MasterKey, openPrivateJwk, resealReadRows } from "./master-key.js";

/** What {@link createPrivateKeyOpener} needs. */
export interface PrivateKeyOpenerOptions {
  storage: Storage;
  masterKey: MasterKey;
  previousMasterKeys?: readonly MasterKey[] | undefined;
  logger?: Pick<Logger, "warn" | "error"> | undefined;
}

/** Opens private keys for the key ring, at most once per stored text. */
export interface PrivateKeyOpener {
  /** Rows read without an envelope under this instance's key get one; envelopes no configured key needs go. */
  reseal(rows: readonly SigningKey[]): Promise<void>;
  /** The private key of `row`, or undefined (verify only) when it does not open and none opened before. */
  open(row: SigningKey): Promise<CryptoKey | undefined>;
  /** Forget the keys not in `kids` (retired, or gone). */
  keepOnly(kids: ReadonlySet<string>): void;
}

export function createPrivateKeyOpener(options: PrivateKeyOpenerOptions): PrivateKeyOpener {
  const { storage, masterKey, previousMasterKeys } = options;
  const log = options.logger;
  const opened = new Map<string, { sealed: string; key: CryptoKey }>();
  const unopenable = new Set<string>();
  const resealWarned = new Set<string>();
  return {
    async reseal(rows) {
      await resealReadRows(storage, masterKey, previousMasterKeys ?? [], rows, resealWarned, log);
    },
    async open(row) {
      let priv = opened.get(row.kid);
      if (priv?.sealed === row.privateJwk) return priv.key;
      try {
        const jwk = JSON.parse(openPrivateJwk(masterKey, row.kid, row.privateJwk, previousMasterKeys));
        priv = { sealed: row.privateJwk, key: (await importJWK(jwk, row.alg)) as CryptoKey };
        opened.set(row.kid, priv);
        unopenable.delete(row.kid);
      } catch (err) {
        // Resealed under a master key this instance lacks: the key opened before is the same
        // (kid: its thumbprint) and signs on. None opened: verify only (said once).
        const why = { kid: row.kid, err: (err as Error).message };
        if (!unopenable.has(row.kid))
          priv
            ? log?.warn(why, "signing key resealed; signing with the key opened before")
            : log?.error(why, "signing key cannot be opened");
        unopenable.add(row.kid);
      }
      return priv?.key;
    },
    keepOnly(kids) {
      for (const kid of opened.keys()) if (!kids.has(kid)) opened.delete(kid);
    },
  };
}
