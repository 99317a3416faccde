import { type DescMessage, type MessageShape, toBinary } from "@bufbuild/protobuf";

// The pages of a list command, read until the server says the list ends: bounded, since a
// server the CLI was pointed at decides what "ends" means.

/**
 * The most a listing reads in all pages together (items encoded, and their page tokens):
 * four answers at the bound of one (16 MiB), some 300,000 users or 100,000 audit events
 * of Tessera's, past what a terminal table is read for; and what the CLI then holds (the
 * items, their rows or JSON) stays within a few hundred MiB whatever a server sends.
 */
export const LIST_MAX_BYTES = 64 * 1024 * 1024;

/** The most pages a listing reads (200 items each from Tessera: two million). */
export const LIST_MAX_PAGES = 10_000;

/** A listing the server would not end (exit 1). */
export class ListingError extends Error {
  override readonly name = "ListingError";
}

/** One page as a list command sees it: its items and the next page's token ("" on the last). */
export interface Page<T> {
  items: T[];
  next: string;
}

/**
 * What a listing read: its items, the token of the page not read (when capped, of the page
 * cut, "" for the first), and why it stopped early.
 */
export interface Listing<T> extends Page<T> {
  /** Set when {@link LIST_MAX_BYTES} or {@link LIST_MAX_PAGES} stopped it: the bound, for a note. */
  capped?: string;
}

/**
 * Read the pages `fetch` returns (given the page token and how many items were read so far)
 * until one has no next token or `enough` says so. Past {@link LIST_MAX_BYTES} or
 * {@link LIST_MAX_PAGES} it stops with what it read (the items within the bound) and says so
 * in `capped`: a big honest list is printed in part, as `audit list --limit` does.
 * @returns The items, and the token of the page not read ("" when the list ended).
 * @throws ListingError on a page token given twice or an empty page that asks for another
 * (the list would never end).
 */
export async function readPages<D extends DescMessage>(
  schema: D,
  fetch: (pageToken: string, read: number) => Promise<Page<MessageShape<D>>>,
  enough: (read: number) => boolean = () => false,
): Promise<Listing<MessageShape<D>>> {
  const items: MessageShape<D>[] = [];
  const seen = new Set<string>();
  let bytes = 0;
  let next = "";
  for (let pages = 1; ; pages++) {
    const page = await fetch(next, items.length);
    bytes += page.next.length;
    for (const item of page.items) {
      // Two bytes for each item's tag and length on the wire: empty items are not free either.
      bytes += toBinary(schema, item).length + 2;
      if (bytes > LIST_MAX_BYTES) return { items, next, capped: `${LIST_MAX_BYTES / 1024 / 1024} MiB` };
      items.push(item);
    }
    next = page.next;
    if (!next || enough(items.length)) return { items, next };
    if (page.items.length === 0)
      throw new ListingError(
        "the server answered an empty page with a token for another: its list would not end",
      );
    if (seen.has(next))
      throw new ListingError("the server answered a page token it had given before: its list would not end");
    if (pages >= LIST_MAX_PAGES)
      return { items, next, capped: `${LIST_MAX_PAGES.toLocaleString("en")} pages` };
    seen.add(next);
  }
}
