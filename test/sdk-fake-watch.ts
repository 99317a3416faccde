import { create } from "@bufbuild/protobuf";
import {
  type WatchRevocationsResponse,
  WatchRevocationsResponseSchema,
} from "../gen/tessera/v1/verification_service_pb.js";

/** A WatchRevocations message as a test writes it. */
export type Message = Partial<Omit<WatchRevocationsResponse, "$typeName">>;

/** One in-memory WatchRevocations stream: messages pushed by the test, or a failure (which ends it). */
export class FakeStream {
  readonly #queue: (Message | Error)[] = [];
  #wake: (() => void) | undefined;
  push(m: Message | Error): void {
    this.#queue.push(m);
    this.#wake?.();
  }
  async *messages(signal: AbortSignal): AsyncGenerator<WatchRevocationsResponse> {
    while (!signal.aborted) {
      const next = this.#queue.shift();
      if (next === undefined) {
        await new Promise<void>((resolve) => {
          this.#wake = resolve;
          signal.addEventListener("abort", () => resolve(), { once: true });
        });
        continue;
      }
      if (next instanceof Error) throw next;
      yield create(WatchRevocationsResponseSchema, next as never);
    }
  }
}
