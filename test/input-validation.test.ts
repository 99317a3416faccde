import { create } from "@bufbuild/protobuf";
import { ListValueSchema, StructSchema, ValueSchema } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { TesseraError } from "../src/errors.js";
import { assertInputMessage, invalidCharacterAt, MAX_STRING_LENGTH } from "../src/interceptors/input.js";

describe("input strings", () => {
  it("find control characters and lone surrogates, and nothing in printable Unicode", () => {
    expect(invalidCharacterAt("plain ascii, spaces & symbols ~")).toBe(-1);
    expect(invalidCharacterAt("pässwörd 漢字 🔑🔑")).toBe(-1);
    expect(invalidCharacterAt("a\u0000b")).toBe(1);
    expect(invalidCharacterAt("\tab")).toBe(0);
    expect(invalidCharacterAt("ab\u007f")).toBe(2);
    expect(invalidCharacterAt("a\u009fb")).toBe(1);
    expect(invalidCharacterAt("a\ud83d")).toBe(1);
    expect(invalidCharacterAt("\udd11a")).toBe(0);
    expect(invalidCharacterAt("\ud83d\udd11\ud83d")).toBe(2);
  });

  it("are checked in nested, repeated and map fields of recursive types, naming the field", () => {
    const deep = (s: string) =>
      create(ValueSchema, {
        kind: {
          case: "listValue",
          value: create(ListValueSchema, {
            values: [create(ValueSchema, { kind: { case: "stringValue", value: s } })],
          }),
        },
      });
    expect(() => assertInputMessage(ValueSchema, deep("fine"))).not.toThrow();
    let thrown: unknown;
    try {
      assertInputMessage(ValueSchema, deep("bad\u0000"));
    } catch (err) {
      thrown = err;
    }
    expect(thrown).toBeInstanceOf(TesseraError);
    expect((thrown as TesseraError).reason).toBe("INVALID_ARGUMENT");
    expect((thrown as TesseraError).metadata.field).toBe("list_value.values.string_value");
    expect(() =>
      assertInputMessage(StructSchema, create(StructSchema, { fields: { "k\u0001": deep("x") } })),
    ).toThrow(TesseraError);
    expect(() =>
      assertInputMessage(ListValueSchema, create(ListValueSchema, { values: [deep("\u001b")] })),
    ).toThrow(TesseraError);
  });

  it("are refused past the longest any field may hold", () => {
    const at = (n: number) => create(ValueSchema, { kind: { case: "stringValue", value: "x".repeat(n) } });
    expect(() => assertInputMessage(ValueSchema, at(MAX_STRING_LENGTH))).not.toThrow();
    expect(() => assertInputMessage(ValueSchema, at(MAX_STRING_LENGTH + 1))).toThrow(TesseraError);
  });
});
