import { createCipheriv, createDecipheriv, createHash, randomBytes } from "node:crypto";
import type { RevocationRecord } from "../storage/repositories/revocation-events.js";

const IV_BYTES = 12;
const TAG_BYTES = 16;
const POSITION_BYTES = 8;
const MARK_BYTES = 8;
const PLAIN_BYTES = POSITION_BYTES + MARK_BYTES;
/** 44 bytes in base64url, no padding. */
const CURSOR_CHARS = Math.ceil(((IV_BYTES + PLAIN_BYTES + TAG_BYTES) * 4) / 3);
/**
 * An earlier version's cursor: 36 bytes, a position alone. Opened for one release, so that a
 * client moving between instances of a rolling upgrade is not reset at each move.
 */
const LEGACY_CHARS = ((IV_BYTES + POSITION_BYTES + TAG_BYTES) * 4) / 3;

/** The event a position names (none: the start of an empty feed). */
export type FeedAnchor = Pick<RevocationRecord, "id" | "kind" | "subjectId" | "tenantId" | "occurredAt">;

/**
 * A cursor opened: the id of the event it resumes after, and that event's {@link markOf}
 * (none: an earlier version's cursor, resumed by its position alone, as that version did).
 */
export interface OpenedCursor {
  position: number;
  mark?: Buffer;
}

/**
 * What tells one event from another taking the same id: after a restore from a backup the
 * ids go back and are drawn again, for other events (a later `occurred_at` at least).
 */
export function markOf(anchor: FeedAnchor | undefined): Buffer {
  if (!anchor) return Buffer.alloc(MARK_BYTES);
  return createHash("sha256")
    .update(`${anchor.id}\0${anchor.kind}\0${anchor.subjectId}\0${anchor.tenantId}\0${anchor.occurredAt}`)
    .digest()
    .subarray(0, MARK_BYTES);
}

/** Whether `anchor` (the event now at an id, or none) is the event a position was taken at. */
export function sameEvent(a: FeedAnchor | undefined, b: FeedAnchor | undefined): boolean {
  if (!a || !b) return a === b;
  return (
    a.id === b.id &&
    a.kind === b.kind &&
    a.subjectId === b.subjectId &&
    a.tenantId === b.tenantId &&
    a.occurredAt === b.occurredAt
  );
}

/**
 * The cursors of WatchRevocations: a position in one database's revocation feed (an event
 * id, and the {@link markOf} the event at it, so that a cursor taken before the feed's ids
 * went back does not resume over events it never saw), sealed with AES-256-GCM under a key
 * derived from the database's random id (stored in `revocation_feed`, never sent out). So
 * a cursor is opaque (a caller cannot read from it how many events other tenants made),
 * and one that was garbled, forged, or issued by another deployment or database fails to
 * open: the stream answers `reset: true` rather than resume from a position that means
 * nothing here.
 */
export class CursorCodec {
  private readonly key: Buffer;

  constructor(databaseId: string) {
    this.key = createHash("sha256").update(`tessera revocation cursor\0${databaseId}`).digest();
  }

  /** The cursor of the position at `anchor` (base64url, 59 characters). */
  seal(anchor: FeedAnchor | undefined): string {
    const iv = randomBytes(IV_BYTES);
    const cipher = createCipheriv("aes-256-gcm", this.key, iv);
    const plain = Buffer.alloc(PLAIN_BYTES);
    plain.writeBigUInt64BE(BigInt(anchor?.id ?? 0));
    markOf(anchor).copy(plain, POSITION_BYTES);
    const body = Buffer.concat([cipher.update(plain), cipher.final()]);
    return Buffer.concat([iv, body, cipher.getAuthTag()]).toString("base64url");
  }

  /** The position of a cursor this database issued, or undefined for anything else. */
  open(cursor: string): OpenedCursor | undefined {
    // Exactly the length sealed: base64url decoders ignore trailing characters.
    const legacy = cursor.length === LEGACY_CHARS;
    if ((!legacy && cursor.length !== CURSOR_CHARS) || !/^[A-Za-z0-9_-]+$/.test(cursor)) return undefined;
    const raw = Buffer.from(cursor, "base64url");
    const plainBytes = legacy ? POSITION_BYTES : PLAIN_BYTES;
    try {
      const decipher = createDecipheriv("aes-256-gcm", this.key, raw.subarray(0, IV_BYTES));
      decipher.setAuthTag(raw.subarray(IV_BYTES + plainBytes));
      const plain = Buffer.concat([
        decipher.update(raw.subarray(IV_BYTES, IV_BYTES + plainBytes)),
        decipher.final(),
      ]);
      const position = plain.readBigUInt64BE();
      if (position > BigInt(Number.MAX_SAFE_INTEGER)) return undefined;
      if (legacy) return { position: Number(position) };
      return { position: Number(position), mark: plain.subarray(POSITION_BYTES) };
    } catch {
      return undefined;
    }
  }
}
