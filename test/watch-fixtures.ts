import { createCipheriv, createHash, randomBytes } from "node:crypto";
import { type Client, createClient, type Transport } from "@connectrpc/connect";
import {
  RevocationKind,
  VerificationService,
  type WatchRevocationsResponse,
} from "../gen/tessera/v1/verification_service_pb.js";
import type { App } from "../src/app.js";
import type { NotificationHandler } from "../src/storage/pg-notify.js";
import { withHeaders } from "./helpers.js";

/** Shared by the WatchRevocations tests (one server, two instances). */

/** An event as the tests compare them: `KIND:id`. */
export const ev = (kind: RevocationKind, id: string) => `${RevocationKind[kind]}:${id}`;

/** One open WatchRevocations stream, its messages collected as they arrive. */
export class Watcher {
  readonly messages: (WatchRevocationsResponse & { at: number })[] = [];
  /** How the stream ended: undefined while open, null when it ended cleanly, else the error. */
  ended: unknown = undefined;
  private readonly abort = new AbortController();
  private waiters: (() => void)[] = [];

  constructor(client: Client<typeof VerificationService>, cursor = "") {
    void (async () => {
      try {
        for await (const m of client.watchRevocations({ cursor }, { signal: this.abort.signal }))
          this.push(Object.assign(m, { at: performance.now() }));
        this.ended = null;
      } catch (err) {
        this.ended = err;
      }
      this.push(undefined);
    })();
  }

  /** A watcher calling as `token` (a bearer) or with `headers`. */
  static open(transport: Transport, auth: string | Record<string, string>, cursor = ""): Watcher {
    const headers = typeof auth === "string" ? { authorization: `Bearer ${auth}` } : auth;
    return new Watcher(createClient(VerificationService, withHeaders(transport, headers)), cursor);
  }

  /** Every event received, in order, as `KIND:id`. */
  get events(): string[] {
    return this.messages.flatMap((m) => m.events.map((e) => ev(e.kind, e.id)));
  }

  /** The cursor of the last message. */
  get cursor(): string {
    return this.messages[this.messages.length - 1]?.cursor ?? "";
  }

  /** Wait until `done()` holds (checked on each message and on the end), at most `ms`. */
  async until(done: () => boolean, ms = 10_000, what = "the expected message"): Promise<void> {
    const deadline = Date.now() + ms;
    while (!done()) {
      if (this.ended !== undefined) throw new Error(`stream ended (${String(this.ended)}) before ${what}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}; got ${JSON.stringify(this.events)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** Wait for the first message. */
  first(ms = 10_000): Promise<void> {
    return this.until(() => this.messages.length > 0, ms, "the first message");
  }

  /** Wait for an event, returning the message that carried it. */
  async event(
    kind: RevocationKind,
    id: string,
    ms = 10_000,
  ): Promise<WatchRevocationsResponse & { at: number }> {
    const key = ev(kind, id);
    await this.until(() => this.events.includes(key), ms, key);
    return this.messages.find((m) => m.events.some((e) => ev(e.kind, e.id) === key))!;
  }

  /** Wait for the stream's end. */
  async end(ms = 10_000): Promise<unknown> {
    await this.until(() => this.ended !== undefined, ms, "the end").catch((err: Error) => {
      if (this.ended === undefined) throw err;
    });
    return this.ended;
  }

  close(): void {
    this.abort.abort();
  }

  private push(m: (WatchRevocationsResponse & { at: number }) | undefined): void {
    if (m) this.messages.push(m);
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }
}

/** A cursor as the version before marks sealed it: 48 characters, the position alone. */
export function earlierCursor(databaseId: string, position: number): string {
  const key = createHash("sha256").update(`tessera revocation cursor\0${databaseId}`).digest();
  const iv = randomBytes(12);
  const cipher = createCipheriv("aes-256-gcm", key, iv);
  const plain = Buffer.alloc(8);
  plain.writeBigUInt64BE(BigInt(position));
  const body = Buffer.concat([cipher.update(plain), cipher.final()]);
  return Buffer.concat([iv, body, cipher.getAuthTag()]).toString("base64url");
}

/** Hold every notification an instance's listening session receives until the returned function is called. */
export function holdNotifications(app: App): () => void {
  const handlers = (app.notifier as unknown as { handlers: Map<string, Set<NotificationHandler>> }).handlers;
  const queue: (() => void)[] = [];
  let holding = true;
  const restore: (() => void)[] = [];
  for (const set of handlers.values()) {
    const fns = [...set];
    const gate: NotificationHandler = (payload, pid) => {
      const deliver = () => {
        for (const fn of fns) fn(payload, pid);
      };
      if (holding) queue.push(deliver);
      else deliver();
    };
    set.clear();
    set.add(gate);
    restore.push(() => {
      set.delete(gate);
      for (const fn of fns) set.add(fn);
    });
  }
  return () => {
    holding = false;
    for (const deliver of queue.splice(0)) deliver();
    for (const fn of restore) fn();
  };
}

/** Unary calls (VerifyCredential) to `unary`, streams (WatchRevocations) to `stream`: a load balancer's choice. */
export function splitTransport(unary: Transport, stream: Transport): Transport {
  return { unary: unary.unary.bind(unary), stream: stream.stream.bind(stream) };
}
