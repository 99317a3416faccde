import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { retryRefusedStream } from "../src/sdk/refused-stream.js";

/** What connect-node throws for a stream the server refused (RST_STREAM or past a GOAWAY's last stream). */
function refused(): ConnectError {
  const cause = Object.assign(new Error("Stream closed with error code NGHTTP2_REFUSED_STREAM"), {
    code: "ERR_HTTP2_STREAM_ERROR",
  });
  return new ConnectError(cause.message, Code.Internal, undefined, undefined, cause);
}

/** A Health client whose first `failures` calls fail on the way out with `error()`, as the HTTP/2 layer would. */
function failingFirst(failures: number, error: () => Error) {
  let calls = 0;
  const transport = createRouterTransport(
    ({ service }) => service(Health, { check: () => ({ status: 1 }) }),
    {
      transport: {
        interceptors: [
          retryRefusedStream,
          (next) => async (req) => {
            calls++;
            if (calls <= failures) throw error();
            return next(req);
          },
        ],
      },
    },
  );
  return { client: createClient(Health, transport), calls: () => calls };
}

describe("the SDK's retry of a refused HTTP/2 stream", () => {
  it("sends a unary call again once when its stream was refused", async () => {
    const { client, calls } = failingFirst(1, refused);
    expect((await client.check({})).status).toBe(1);
    expect(calls()).toBe(2);
  });

  it("retries only once (RFC 9113 8.7)", async () => {
    const { client, calls } = failingFirst(2, refused);
    await expect(client.check({})).rejects.toThrow(/REFUSED_STREAM/);
    expect(calls()).toBe(2);
  });

  it("does not retry any other failure", async () => {
    const { client, calls } = failingFirst(1, () => new ConnectError("down", Code.Unavailable));
    await expect(client.check({})).rejects.toThrow(/down/);
    expect(calls()).toBe(1);
  });
});
