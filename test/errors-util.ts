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
