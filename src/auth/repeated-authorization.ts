/**
 * A repeated Authorization header, found in Node's raw header list. Node keeps only the first
 * value of a header it holds to be single (Authorization among them, over HTTP/1.1 and HTTP/2
 * alike), so a proxy or WAF in front that reads another of them would disagree with us on who
 * is calling: two Authorization headers are refused, never resolved to one. Shared by the
 * server's transports, its OAuth endpoints and the SDK, whose package builds this file too:
 * it imports nothing.
 */

const NAME = "authorization";

/** The refusal's message, the same wherever a repeat is refused. */
export const ONE_AUTHORIZATION = "send one Authorization header";

/**
 * Every value of the Authorization header in `rawHeaders` (Node's `rawHeaders`: names and
 * values alternating), joined with ", " as fetch Headers joins a repeated header, when it was
 * sent more than once (identical values too: two credentials all the same); else undefined.
 * Names are compared by length first, then without case, allocating nothing.
 */
export function repeatedAuthorization(rawHeaders: readonly string[]): string | undefined {
  let first: string | undefined;
  let joined: string | undefined;
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!;
    if (name.length !== NAME.length || !isAuthorization(name)) continue;
    if (first === undefined) first = rawHeaders[i + 1]!;
    else joined = `${joined ?? first}, ${rawHeaders[i + 1]}`;
  }
  return joined;
}

/** Whether `name` (13 characters) is "authorization" in any case: a letter's case is its 0x20 bit. */
function isAuthorization(name: string): boolean {
  for (let i = 0; i < NAME.length; i++) if ((name.charCodeAt(i) | 0x20) !== NAME.charCodeAt(i)) return false;
  return true;
}
