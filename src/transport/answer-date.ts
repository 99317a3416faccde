/**
 * The `date` header of an HTTP/2 answer Tessera writes onto the stream itself, the value
 * node:http2 would add (`Date#toUTCString` of the current second).
 *
 * Why Tessera adds it: node:http2's `processHeaders` adds a missing `date` with a keyed store
 * whose key, a constant of Node's binding, is a string V8 only made "thin" (not the
 * internalized string the store's inline cache holds) once the application had used "date"
 * before; that store then misses its cache on every answer, and each miss resets the
 * function's tier-up count, so `processHeaders` never leaves the baseline tier. With `date`
 * already in the answer's headers the store is skipped.
 */

let second = Number.NaN;
let value = "";

/** The current second as an HTTP date (IMF-fixdate), made once per second. */
export function answerDate(): string {
  const now = Date.now();
  const s = Math.floor(now / 1000);
  if (s !== second) {
    second = s;
    value = new Date(now).toUTCString();
  }
  return value;
}
