import { describe, expect, it } from "vitest";
import { LeanHeaders } from "../src/cli/lean-headers.js";

// The CLI's bundle gives the Connect runtime LeanHeaders in place of Node's global Headers
// (scripts/bundle-cli.ts): every operation here must end as it does with the global.

type Op = (h: Headers) => unknown;
const OPS: [string, Op[]][] = [
  [
    "append combines values of one name with a comma",
    [(h) => h.append("X-A", "1"), (h) => h.append("x-a", "2")],
  ],
  ["set replaces", [(h) => h.append("x-a", "1"), (h) => h.set("X-A", "3")]],
  [
    "delete removes every value",
    [(h) => h.append("x-a", "1"), (h) => h.append("x-a", "2"), (h) => h.delete("X-a")],
  ],
  ["values lose surrounding whitespace", [(h) => h.append("x-b", "  v \t")]],
  [
    "Set-Cookie values stay apart",
    [(h) => h.append("Set-Cookie", "a=1"), (h) => h.append("set-cookie", "b=2"), (h) => h.append("x-c", "3")],
  ],
  [
    "iteration is sorted by name",
    [
      (h) => h.append("grpc-status", "0"),
      (h) => h.append("content-type", "application/grpc"),
      (h) => h.append("Retry-After", "17"),
    ],
  ],
];

function snapshot(h: Headers) {
  const forEach: [string, string][] = [];
  h.forEach((v, k) => {
    forEach.push([k, v]);
  });
  return {
    entries: [...h],
    keys: [...h.keys()],
    values: [...h.values()],
    forEach,
    getSetCookie: h.getSetCookie(),
    get: ["x-a", "X-A", "x-b", "set-cookie", "retry-after", "missing"].map((n) => h.get(n)),
    has: ["x-a", "X-B", "missing"].map((n) => h.has(n)),
  };
}

describe("the CLI's Headers", () => {
  it.each(OPS)("behaves as Node's: %s", (_name, ops) => {
    const lean = new LeanHeaders();
    const node = new Headers();
    for (const op of ops) {
      op(lean);
      op(node);
    }
    expect(snapshot(lean)).toEqual(snapshot(node));
  });

  it("builds from a record, from pairs and from another Headers as Node's does", () => {
    const record = { "Content-Type": "application/json", "x-request-id": "r1" };
    const pairs: [string, string][] = [
      ["a", "1"],
      ["A", "2"],
      ["b", "3"],
    ];
    expect(snapshot(new LeanHeaders(record))).toEqual(snapshot(new Headers(record)));
    expect(snapshot(new LeanHeaders(pairs))).toEqual(snapshot(new Headers(pairs)));
    expect(snapshot(new LeanHeaders(new LeanHeaders(pairs)))).toEqual(
      snapshot(new Headers(new Headers(pairs))),
    );
    expect(snapshot(new LeanHeaders(undefined))).toEqual(snapshot(new Headers(undefined)));
  });

  it("refuses what Node's refuses: a malformed name, a value with a line break, a pair of three", () => {
    for (const bad of [
      (H: typeof Headers) => new H({ "bad name": "x" }),
      (H: typeof Headers) => new H({ ok: "a\r\nInjected: 1" }),
      (H: typeof Headers) => new H([["a", "b", "c"]] as unknown as [string, string][]),
      (H: typeof Headers) => new H().append("", "x"),
    ]) {
      expect(() => bad(Headers)).toThrow(TypeError);
      expect(() => bad(LeanHeaders)).toThrow(TypeError);
    }
  });
});
