import { createContextKey, createContextValues } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { CallValues } from "../src/context.js";

describe("CallValues", () => {
  it("keeps values as Connect's createContextValues does: defaults, set, replaced, deleted", () => {
    const key = createContextKey<string>("default");
    const other = createContextKey<number | undefined>(undefined);
    const seen = (values: ReturnType<typeof createContextValues>) => {
      const read = [values.get(key), values.get(other)];
      values.set(key, "set").set(other, 0);
      read.push(values.get(key), values.get(other));
      values.set(key, "replaced").delete(other);
      read.push(values.get(key), values.get(other));
      values.delete(key);
      read.push(values.get(key));
      return read;
    };
    expect(seen(new CallValues())).toEqual(seen(createContextValues()));
    expect(seen(new CallValues())).toEqual([
      "default",
      undefined,
      "set",
      0,
      "replaced",
      undefined,
      "default",
    ]);
  });

  it("has its methods on the prototype: no function is made per call", () => {
    expect(new CallValues().get).toBe(new CallValues().get);
  });
});
