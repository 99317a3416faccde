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

/**
 * Parse a list request's paging fields, before anything else of the request is looked at
 * (a malformed token is InvalidArgument whatever else the request holds).
 */
export function pageParams(pageSize: number, pageToken: string): PageParams {
  const limit = pageLimit(pageSize);
  if (!pageToken) return { limit, after: null };
  const after = Buffer.from(pageToken, "base64url").toString("utf8");
  if (!UUID_RE.test(after)) throw badPageToken();
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
    nextPageToken: items.length === limit && last ? Buffer.from(last.id, "utf8").toString("base64url") : "",
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
