import { createCipheriv, createDecipheriv, createHash, randomBytes } from "node:crypto";

const IV_BYTES = 12;
const TAG_BYTES = 16;
const POSITION_BYTES = 8;
/** 36 bytes in base64url, no padding. */
const CURSOR_CHARS = ((IV_BYTES + POSITION_BYTES + TAG_BYTES) * 4) / 3;

/**
 * The cursors of WatchRevocations: a position in one database's revocation feed (an event
 * id), sealed with AES-256-GCM under a key derived from the database's random id (stored
 * in `revocation_feed`, never sent out). So a cursor is opaque (a caller cannot read from
 * it how many events other tenants made), and one that was garbled, forged, or issued by
 * another deployment or database fails to open: the stream answers `reset: true` rather
 * than resume from a position that means nothing here.
 */
export class CursorCodec {
  private readonly key: Buffer;

  constructor(databaseId: string) {
    this.key = createHash("sha256").update(`tessera revocation cursor\0${databaseId}`).digest();
  }

  /** The cursor of a position (base64url, 48 characters). */
  seal(position: number): string {
    const iv = randomBytes(IV_BYTES);
    const cipher = createCipheriv("aes-256-gcm", this.key, iv);
    const plain = Buffer.alloc(POSITION_BYTES);
    plain.writeBigUInt64BE(BigInt(position));
    const body = Buffer.concat([cipher.update(plain), cipher.final()]);
    return Buffer.concat([iv, body, cipher.getAuthTag()]).toString("base64url");
  }

  /** The position of a cursor this database issued, or undefined for anything else. */
  open(cursor: string): number | undefined {
    // Exactly the length sealed: base64url decoders ignore trailing characters.
    if (cursor.length !== CURSOR_CHARS || !/^[A-Za-z0-9_-]+$/.test(cursor)) return undefined;
    const raw = Buffer.from(cursor, "base64url");
    try {
      const decipher = createDecipheriv("aes-256-gcm", this.key, raw.subarray(0, IV_BYTES));
      decipher.setAuthTag(raw.subarray(IV_BYTES + POSITION_BYTES));
      const plain = Buffer.concat([
        decipher.update(raw.subarray(IV_BYTES, IV_BYTES + POSITION_BYTES)),
        decipher.final(),
      ]);
      const position = plain.readBigUInt64BE();
      return position > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(position);
    } catch {
      return undefined;
    }
  }
}
