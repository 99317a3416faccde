import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";

/** The rejection of a call as { code, reason, message }, or a failure if it resolved. */
export async function rejection(
  promise: Promise<unknown>,
): Promise<{ code: Code; reason: string | undefined; message: string; error: ConnectError }> {
  try {
    await promise;
  } catch (err) {
    const ce = ConnectError.from(err);
    return {
      code: ce.code,
      reason: ce.findDetails(ErrorInfoSchema)[0]?.reason,
      message: ce.rawMessage,
      error: ce,
    };
  }
  throw new Error("expected the call to fail, but it succeeded");
}

export { Code };

/**
 * What became of a call: "ok", or its refusal as the reason (its code's name when it has
 * none); with `withCode`, as "Code/REASON", for tables where the code matters too.
 */
export async function outcome(call: Promise<unknown>, options: { withCode?: boolean } = {}): Promise<string> {
  try {
    await call;
    return "ok";
  } catch (err) {
    const r = await rejection(Promise.reject(err));
    return options.withCode ? `${Code[r.code]}/${r.reason ?? ""}` : r.reason || Code[r.code];
  }
}
