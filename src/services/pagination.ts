import type { EntityName, FilterQuery } from "@mikro-orm/core";
import type { EntityManager } from "@mikro-orm/knex";
import { errors } from "../errors.js";

/** Rows per page when the request names no size, and the most a request may ask for. */
export const DEFAULT_PAGE_SIZE = 50;
export const MAX_PAGE_SIZE = 200;

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Where a list request starts: its page size and the id its page token resumes after. */
export interface PageParams {
  limit: number;
  after: string | null;
}

/** One page of a list, with the token of the next (empty on the last page) and the total. */
export interface Page<T> {
  items: T[];
  nextPageToken: string;
  totalSize: number;
}

/** A request's `page_size`: default {@link DEFAULT_PAGE_SIZE}, at most {@link MAX_PAGE_SIZE}. */
export function pageLimit(pageSize: number): number {
  if (pageSize < 0) throw errors.invalidArgument("page_size must not be negative", "page_size");
  return pageSize === 0 ? DEFAULT_PAGE_SIZE : Math.min(pageSize, MAX_PAGE_SIZE);
}

/** The page token that does not parse (malformed, or naming no row of the list): one answer for all. */
export function badPageToken() {
  return errors.invalidArgument("page_token is not valid", "page_token");
}

/** One key column of a keyset page token: how its value is written into the token and read back. */
export interface KeyPart<V> {
  write(value: V): string;
  /** The value, or undefined when `text` is not one (the token is then refused). */
  read(text: string): V | undefined;
}

/** A row id (UUID, lower case). */
export const uuidKey: KeyPart<string> = {
  write: (id) => id,
  read: (text) => (UUID_RE.test(text) ? text : undefined),
};

/**
 * The last instant a google.protobuf.Timestamp holds (9999-12-31T23:59:59.999Z), in
 * milliseconds since the epoch. Later ones are no Date at all past 8.64e15, and a database
 * refuses what an Invalid Date is sent as: a token naming one is refused, not a 500.
 */
export const MAX_TIMESTAMP_MS = 253_402_300_799_999;

/** An instant in milliseconds since the epoch, at most {@link MAX_TIMESTAMP_MS}. */
export const epochMsKey: KeyPart<number> = {
  write: (ms) => String(ms),
  read: (text) => (/^\d{1,15}$/.test(text) && Number(text) <= MAX_TIMESTAMP_MS ? Number(text) : undefined),
};

type KeyValues<P extends readonly KeyPart<unknown>[]> = {
  [I in keyof P]: P[I] extends KeyPart<infer V> ? V : never;
};

/** The page token of a keyset over some key columns (see {@link keysetToken}). */
export interface KeysetToken<P extends readonly KeyPart<unknown>[]> {
  encode(key: KeyValues<P>): string;
  /** The key a token resumes after; a token that does not parse is {@link badPageToken}. */
  decode(token: string): KeyValues<P>;
}

/**
 * The page token of a keyset over `parts`: the last row's key columns joined by "." and
 * base64url-encoded, so that clients treat it as opaque. Not signed: it only says where to
 * resume, and every list applies its tenant wall to each page's query whatever the token
 * says. With one id column it is the id's base64url, the format lists have always used.
 */
export function keysetToken<const P extends readonly KeyPart<unknown>[]>(...parts: P): KeysetToken<P> {
  return {
    encode: (key) =>
      Buffer.from(parts.map((part, i) => part.write(key[i])).join("."), "utf8").toString("base64url"),
    decode(token) {
      const texts = Buffer.from(token, "base64url").toString("utf8").split(".");
      if (texts.length !== parts.length) throw badPageToken();
      return parts.map((part, i) => {
        const value = part.read(texts[i]!);
        if (value === undefined) throw badPageToken();
        return value;
      }) as KeyValues<P>;
    },
  };
}

/**
 * One page cut from `rows`, read with one row more than `limit` (its presence says another
 * page follows), with the token of the next page (empty on the last).
 */
export function keysetPage<T, P extends readonly KeyPart<unknown>[]>(
  rows: readonly T[],
  limit: number,
  token: KeysetToken<P>,
  keyOf: (row: T) => KeyValues<P>,
): { items: T[]; nextPageToken: string } {
  const items = rows.slice(0, limit);
  const last = items[items.length - 1];
  return { items, nextPageToken: rows.length > limit && last ? token.encode(keyOf(last)) : "" };
}

/** The page token of the lists in id order. */
const idToken = keysetToken(uuidKey);

/**
 * Parse a list request's paging fields, before anything else of the request is looked at
 * (a malformed token is InvalidArgument whatever else the request holds).
 */
export function pageParams(pageSize: number, pageToken: string): PageParams {
  const limit = pageLimit(pageSize);
  if (!pageToken) return { limit, after: null };
  const [after] = idToken.decode(pageToken);
  return { limit, after };
}

/**
 * One page of `entity`'s rows matching `where`, in id order (keyset pagination: a page
 * costs one indexed range read however deep it is, and rows inserted meanwhile are neither
 * skipped nor repeated), with the total count of `where`.
 *
 * The page token is the last id of the previous page. It must name a row that `where`
 * matches now: a token naming another tenant's object (or any object this list does not
 * hold, such as one deleted since) is refused exactly like a malformed one, so that a
 * token says nothing about objects behind the tenant wall. A client whose token was
 * refused starts again from the first page.
 */
export async function listPage<T extends { id: string }>(
  em: EntityManager,
  entity: EntityName<T>,
  where: FilterQuery<T>,
  page: PageParams,
): Promise<Page<T>> {
  const { limit, after } = page;
  if (after !== null && (await em.count(entity, { $and: [where, { id: after }] } as FilterQuery<T>)) !== 1)
    throw badPageToken();
  const query = (after === null ? where : { $and: [where, { id: { $gt: after } }] }) as FilterQuery<T>;
  const items = (await em.find(entity, query, {
    orderBy: { id: "asc" } as never,
    limit,
  })) as T[];
  const totalSize = await em.count(entity, where);
  const last = items[items.length - 1];
  return {
    items,
    nextPageToken: items.length === limit && last ? idToken.encode([last.id]) : "",
    totalSize,
  };
}

/**
 * One page of a list RPC: its paging fields parsed first (a malformed token is refused
 * whatever else the request holds), then `where` (a function where it looks rows up and
 * may refuse), then {@link listPage}.
 */
export async function listRequest<T extends { id: string }>(
  em: EntityManager,
  entity: EntityName<T>,
  req: { pageSize: number; pageToken: string },
  where: FilterQuery<T> | (() => Promise<FilterQuery<T>>),
): Promise<Page<T>> {
  const paging = pageParams(req.pageSize, req.pageToken);
  return listPage(em, entity, typeof where === "function" ? await where() : where, paging);
}
