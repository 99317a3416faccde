import type * as http2 from "node:http2";

/**
 * What runs when an HTTP/2 stream closes, from one "close" listener per stream: the parts that
 * keep something per stream (the calls in flight a shutdown waits for, the stream's deadlines
 * and the idle timeout's open streams, a call's cancellation and its body) each register a hook
 * here rather than a listener of their own. Each listener added to an Http2Stream also emits
 * "newListener", and a second listener of one event makes the emitter keep (and clone, to emit)
 * an array per stream: a cost every call paid four times over.
 */

/** Run once, with its stream, when the stream closes. */
export type CloseHook = (stream: http2.Http2Stream) => void;

const kHooks = Symbol("tessera.closeHooks");
type HookedStream = http2.Http2Stream & { [kHooks]?: CloseHook[] };

/**
 * Run `hook` when `stream` closes, after the hooks registered before it (the order their
 * listeners ran in). As a "close" listener, a hook registered once the stream has closed never runs.
 */
export function whenStreamCloses(stream: http2.Http2Stream, hook: CloseHook): void {
  const hooked = stream as HookedStream;
  const hooks = hooked[kHooks];
  if (hooks !== undefined) {
    hooks.push(hook);
    return;
  }
  hooked[kHooks] = [hook];
  // "on", not "once": a stream closes once, and once's wrapper is a cost per call.
  stream.on("close", runHooks);
}

/** The one "close" listener, the same function for every stream. */
function runHooks(this: HookedStream): void {
  const hooks = this[kHooks]!;
  for (let i = 0; i < hooks.length; i++) hooks[i]!(this);
}
