// The fetch API's `Headers`, as the CLI's bundle gives it to the Connect runtime in place of
// Node's global (scripts/bundle-cli.ts injects it for the free identifier `Headers`). The
// global is defined by Node's bundled undici, whose first use loads and runs all of undici
// (fetch, WebSocket, …): a large share of `tessera whoami`'s start-up (bench/results/2026-12-05-cli-sdk.md), spent on a class
// the runtime uses as a case-insensitive multimap. The SDK itself keeps the global: this
// class serves the CLI's process only. test/lean-headers.test.ts holds it to the global's
// behaviour.

const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
// biome-ignore lint/suspicious/noControlCharactersInRegex: NUL, CR and LF are what the fetch spec forbids in a value
const FORBIDDEN_VALUE = /[\u0000\r\n]/;

function headerName(name: string): string {
  const n = String(name);
  if (!TOKEN.test(n)) throw new TypeError(`Headers: invalid header name "${n}"`);
  return n.toLowerCase();
}

function headerValue(value: string): string {
  // Leading and trailing HTTP whitespace is not part of a value.
  const v = String(value).replace(/^[\t\n\r ]+|[\t\n\r ]+$/g, "");
  if (FORBIDDEN_VALUE.test(v)) throw new TypeError("Headers: invalid header value");
  return v;
}

/** A header list: lower-case names, values of one name combined with ", " except Set-Cookie's. */
export class LeanHeaders implements Headers {
  readonly #values = new Map<string, string[]>();

  constructor(init?: ConstructorParameters<typeof Headers>[0] | null) {
    if (init === undefined || init === null) return;
    if (typeof (init as Iterable<unknown>)[Symbol.iterator] === "function") {
      for (const pair of init as Iterable<Iterable<string>>) {
        const p = [...pair];
        if (p.length !== 2) throw new TypeError("Headers: each header must be a [name, value] pair");
        this.append(p[0]!, p[1]!);
      }
    } else if (typeof init === "object") {
      for (const name of Object.keys(init)) this.append(name, (init as Record<string, string>)[name]!);
    } else {
      throw new TypeError("Headers: init must be a sequence or a record");
    }
  }

  append(name: string, value: string): void {
    const n = headerName(name);
    const v = headerValue(value);
    const list = this.#values.get(n);
    if (list) list.push(v);
    else this.#values.set(n, [v]);
  }

  set(name: string, value: string): void {
    this.#values.set(headerName(name), [headerValue(value)]);
  }

  get(name: string): string | null {
    return this.#values.get(headerName(name))?.join(", ") ?? null;
  }

  getSetCookie(): string[] {
    return [...(this.#values.get("set-cookie") ?? [])];
  }

  has(name: string): boolean {
    return this.#values.has(headerName(name));
  }

  delete(name: string): void {
    this.#values.delete(headerName(name));
  }

  forEach(callback: (value: string, key: string, parent: Headers) => void, thisArg?: unknown): void {
    for (const [name, value] of this.entries()) callback.call(thisArg, value, name, this);
  }

  /** Sorted by name, as the fetch spec iterates; each Set-Cookie on its own. */
  *entries(): ReturnType<Headers["entries"]> {
    const names = [...this.#values.keys()].sort();
    for (const name of names) {
      const list = this.#values.get(name)!;
      if (name === "set-cookie") for (const v of list) yield [name, v];
      else yield [name, list.join(", ")];
    }
  }

  *keys(): ReturnType<Headers["keys"]> {
    for (const [name] of this.entries()) yield name;
  }

  *values(): ReturnType<Headers["values"]> {
    for (const [, value] of this.entries()) yield value;
  }

  [Symbol.iterator](): ReturnType<Headers["entries"]> {
    return this.entries();
  }

  get [Symbol.toStringTag](): string {
    return "Headers";
  }
}

export { LeanHeaders as Headers };
