import { PassThrough } from "node:stream";
import { Code, ConnectError } from "@connectrpc/connect";
import { readAllBytes } from "@connectrpc/connect/protocol";
import { describe, expect, it } from "vitest";
import { bodyOf } from "../src/transport/node-bridge.js";
import { readOneEnvelopedMessage } from "../src/transport/unary-core.js";

/**
 * A unary Connect call reads its body with `readAll` (one promise for the whole body) rather
 * than Connect's `readAllBytes` over the body's iterator: the answers must be the same, bytes
 * and errors alike, and so must what is left of the request (paused once reading stopped).
 */

type Step = { data: string } | { end: true } | { close: true };

interface Case {
  name: string;
  steps: Step[];
  readMaxBytes: number;
  lengthHint: string | null;
  /** The body cap of the adapter (maxBodyBytes). */
  maxBytes?: number;
}

/**
 * A case: `chunks` arrive in order, then the body ends (or the client leaves, `close`);
 * readMaxBytes 100 and no length hint unless given.
 */
function bodyCase(
  name: string,
  chunks: string[],
  o: { readMaxBytes?: number; lengthHint?: string; maxBytes?: number; close?: boolean } = {},
): Case {
  const steps: Step[] = chunks.map((data) => ({ data }));
  steps.push(o.close ? { close: true } : { end: true });
  const c: Case = { name, steps, readMaxBytes: o.readMaxBytes ?? 100, lengthHint: o.lengthHint ?? null };
  if (o.maxBytes !== undefined) c.maxBytes = o.maxBytes;
  return c;
}

const CASES: Case[] = [
  bodyCase("one chunk, no length", ["{}"]),
  bodyCase("several chunks, the promised length", ["abc", "defg"], { lengthHint: "7" }),
  bodyCase("an empty body", [], { lengthHint: "0" }),
  bodyCase("a length over readMaxBytes", ["x"], { readMaxBytes: 10, lengthHint: "11" }),
  bodyCase("more than promised", ["abcd"], { lengthHint: "3" }),
  bodyCase("less than promised", ["ab"], { lengthHint: "3" }),
  bodyCase("no length, past readMaxBytes", ["abcdef", "ghijkl"], { readMaxBytes: 10 }),
  bodyCase("a length that is no number", ["ab"], { lengthHint: "x" }),
  bodyCase("the client gone mid-body", ["ab"], { close: true }),
  bodyCase("past the body cap", ["abcdef", "ghijkl"], { maxBytes: 8 }),
];

/** Feed `steps` to a fresh request, one per event-loop turn, while `read` reads it. */
async function outcome(c: Case, read: (req: PassThrough) => Promise<Uint8Array>) {
  const req = new PassThrough();
  const result = read(req).then(
    (bytes) => ({ bytes: Buffer.from(bytes).toString("latin1"), type: bytes.constructor.name }),
    (e: unknown) => ({ code: ConnectError.from(e).code, message: ConnectError.from(e).rawMessage }),
  );
  for (const step of c.steps) {
    await new Promise((r) => setImmediate(r));
    if ("data" in step) req.write(step.data);
    else if ("end" in step) req.end();
    else req.destroy();
  }
  const settled = await result;
  return { settled, paused: req.isPaused() };
}

describe("a request body read whole", () => {
  it.each(CASES)("answers as Connect's readAllBytes does: $name", async (c) => {
    const maxBytes = c.maxBytes ?? 1024;
    const whole = await outcome(c, (req) =>
      bodyOf(req, true, maxBytes).readAll(c.readMaxBytes, c.lengthHint),
    );
    const iterated = await outcome(c, (req) =>
      readAllBytes(bodyOf(req, true, maxBytes), c.readMaxBytes, c.lengthHint),
    );
    expect(whole).toEqual(iterated);
  });

  it("refuses a body past readMaxBytes with ResourceExhausted and stops reading it", async () => {
    const c = CASES.find((x) => x.name === "no length, past readMaxBytes")!;
    const { settled, paused } = await outcome(c, (req) => bodyOf(req, true, 1024).readAll(10, null));
    expect(settled).toEqual({
      code: Code.ResourceExhausted,
      message: "message size is larger than configured readMaxBytes 10",
    });
    expect(paused).toBe(true);
  });

  it("gives a copy of the bytes, never a view of the chunks received", async () => {
    const req = new PassThrough();
    const chunk = Buffer.from("{}");
    const read = bodyOf(req, true, 1024).readAll(100, null);
    req.end(chunk);
    const bytes = await read;
    chunk[0] = 0;
    expect(Buffer.from(bytes).toString()).toBe("{}");
    expect(bytes.buffer).not.toBe(chunk.buffer);
  });
});

/** A gRPC envelope: flags, big-endian length, data. */
function envelope(flags: number, data: string): Buffer {
  const bytes = Buffer.from(data, "latin1");
  const head = Buffer.alloc(5);
  head[0] = flags;
  head.writeUInt32BE(bytes.length, 1);
  return Buffer.concat([head, bytes]);
}

/** A parser refusing messages that start with "!", as a malformed message is refused. */
const parser = {
  parse(bytes: Uint8Array): string {
    const text = Buffer.from(bytes).toString("latin1");
    if (text.startsWith("!")) throw new ConnectError("cannot parse", Code.InvalidArgument);
    return text;
  },
  serialize: (text: string) => Buffer.from(text, "latin1"),
};

const GRPC_CASES: Array<{ name: string; chunks: Buffer[]; end?: false; skipFlag?: number }> = [
  { name: "one message", chunks: [envelope(0, "hello")] },
  { name: "an empty message", chunks: [envelope(0, "")] },
  {
    name: "one message split across chunks",
    chunks: (() => {
      const e = envelope(0, "split message");
      return [e.subarray(0, 3), e.subarray(3, 9), e.subarray(9)];
    })(),
  },
  { name: "two messages", chunks: [envelope(0, "one"), envelope(0, "two")] },
  { name: "a second message that does not parse", chunks: [envelope(0, "one"), envelope(0, "!two")] },
  { name: "a message that does not parse", chunks: [envelope(0, "!one")] },
  { name: "an incomplete envelope", chunks: [envelope(0, "hello").subarray(0, 7)] },
  { name: "no message", chunks: [] },
  { name: "a message over readMaxBytes", chunks: [envelope(0, "x".repeat(40)).subarray(0, 5)], end: false },
  { name: "a compressed message", chunks: [envelope(1, "zz")] },
  {
    name: "a trailer frame skipped",
    chunks: [envelope(0, "msg"), envelope(0x80, "trailer")],
    skipFlag: 0x80,
  },
  { name: "the client gone mid-message", chunks: [envelope(0, "hello").subarray(0, 6)], end: false },
];

/** Read `c`'s body as a unary gRPC call does: from its chunks, or (`wrap`) through the body's iterator. */
async function readMessage(c: (typeof GRPC_CASES)[number], wrap: boolean) {
  const req = new PassThrough();
  const body = bodyOf(req, true, 1024);
  // Without readChunks, the reader takes its general path (the body's iterator).
  const read = readOneEnvelopedMessage(
    wrap ? { [Symbol.asyncIterator]: () => body[Symbol.asyncIterator]() } : body,
    32,
    null,
    parser,
    c.skipFlag,
  ).then(
    (message) => ({ message }),
    (e: unknown) => ({ code: ConnectError.from(e).code, error: ConnectError.from(e).rawMessage }),
  );
  for (const chunk of c.chunks) {
    await new Promise((r) => setImmediate(r));
    req.write(chunk);
  }
  await new Promise((r) => setImmediate(r));
  if (c.end === false) req.destroy();
  else req.end();
  return { outcome: await read, paused: req.isPaused() };
}

describe("a gRPC request's one message", () => {
  it.each(GRPC_CASES)("is read from the chunks as from the body's iterator: $name", async (c) => {
    expect(await readMessage(c, false)).toEqual(await readMessage(c, true));
  });

  it("is refused as the client's fault when compressed without a negotiated encoding, on both paths", async () => {
    const c = GRPC_CASES.find((x) => x.name === "a compressed message")!;
    for (const wrap of [false, true])
      expect((await readMessage(c, wrap)).outcome).toEqual({
        code: Code.InvalidArgument,
        error: "received compressed envelope, but do not know how to decompress",
      });
  });
});
