import type http2 from "node:http2";

/** One stream's place in its session's {@link OpenStreams}. */
export interface OpenStreamLink {
  readonly stream: http2.Http2Stream;
  prev: OpenStreamLink | undefined;
  next: OpenStreamLink | undefined;
}

/**
 * The open streams of one HTTP/2 session, as a list threaded through links the streams' own
 * bounds carry, not a Set. Why: once a Set's table is in V8's old generation (a session that
 * outlives two scavenges, or any full collection under load), each rehash (every few dozen
 * streams as they come and go) makes the new table old too and leaves the replaced one holding
 * the streams it held; until the next full collection those dead tables kept the streams, and
 * every call they reference, alive through each scavenge (bench/results/2026-12-09-pret2.md).
 * A removed link is cleared, so nothing but the open streams is reachable from the list.
 */
export class OpenStreams {
  #head: OpenStreamLink | undefined = undefined;

  add(link: OpenStreamLink): void {
    link.prev = undefined;
    link.next = this.#head;
    if (this.#head !== undefined) this.#head.prev = link;
    this.#head = link;
  }

  delete(link: OpenStreamLink): void {
    if (link.prev !== undefined) link.prev.next = link.next;
    else if (this.#head === link) this.#head = link.next;
    else return;
    if (link.next !== undefined) link.next.prev = link.prev;
    link.prev = undefined;
    link.next = undefined;
  }

  /** The open streams, newest first; a stream closed while they are walked does not end the walk. */
  *[Symbol.iterator](): IterableIterator<http2.Http2Stream> {
    const streams: http2.Http2Stream[] = [];
    for (let link = this.#head; link !== undefined; link = link.next) streams.push(link.stream);
    yield* streams;
  }
}
