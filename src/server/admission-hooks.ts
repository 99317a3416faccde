import type { DescMethod } from "@bufbuild/protobuf";
import { Code, type ConnectError } from "@connectrpc/connect";
import { type AdmissionDeps, admit, admitFailedCall, BEFORE_BODY } from "../admission/index.js";
import type { App } from "../app.js";
import { type RequestState, requestState } from "../context.js";
import { isRefusal, TesseraError, tesseraErrorInfo } from "../errors.js";
import { toWireError } from "../interceptors/errors.js";
import type { WireError } from "../transport/early-answers.js";
import { refusalOnTheWire } from "../transport/error-wire.js";
import type { TransportOptions } from "../transport/index.js";
import { nodeHeaderSource, stateOf } from "./request-facts.js";

/**
 * The transport's two admission hooks, the glue between a call on the wire and the one
 * admission path (src/admission/): `admit`, asked before a call's body is read, and
 * `callError`, for a call Connect failed itself before the interceptors ran.
 */
export function createAdmissionHooks(
  app: App,
  admission: AdmissionDeps,
): Required<Pick<TransportOptions, "callError" | "admit">> {
  /** Admission's refusal of a call, answered before the pipeline. */
  function earlyRefusal(refusal: unknown, state: RequestState, method: DescMethod): ConnectError | WireError {
    // A refusal (not a fault, which is logged) in wire form, without a ConnectError (transport/error-wire.ts).
    if (refusal instanceof TesseraError && isRefusal(refusal.code)) {
      // As the error interceptor keeps it, for the access log and metrics (call-observer.ts).
      state.errorInfo = { reason: refusal.reason, requestId: state.requestId };
      return refusalOnTheWire(refusal, state.requestId, state.responseHeaders);
    }
    return toWireError(refusal, state, `${method.parent.typeName}/${method.name}`, app.logger);
  }

  return {
    // An error Connect raised itself (no ErrorInfo: a body that does not parse, too large…,
    // before the interceptors): admission first finishes what it left for the pipeline
    // (admitFailedCall), so its refusal is the answer and is audited; else Connect's own
    // InvalidArgument gets the reason and request id every other refusal carries.
    callError: (error, values, method, headers) => {
      if (tesseraErrorInfo(error) !== undefined) return error;
      const state = requestState(values);
      const name = `${method.parent.typeName}/${method.name}`;
      const answer = (decided: unknown): ConnectError =>
        decided !== error || error.code === Code.InvalidArgument
          ? toWireError(decided, state, name, app.logger)
          : error;
      const decided = admitFailedCall(admission, method, headers, state, error);
      return decided instanceof Promise ? decided.then(answer) : answer(decided);
    },
    // Asked only about calls that can be answered before their body; the others are admitted in
    // the pipeline (the admission interceptor), as is the authentication of an audited call
    // (admission/index.ts).
    admit: (req, method) => {
      const state = stateOf(req);
      // A password check the full hash pool would refuse anyway: answered now, body unread.
      const shed = app.shedding.shed(method, state);
      if (shed !== undefined) return shed;
      const refusal = admit(admission, method, nodeHeaderSource(req.headers), state, BEFORE_BODY);
      // Decided synchronously (or nothing to decide): no promise.
      if (refusal === undefined) return undefined;
      if (refusal instanceof Promise)
        return refusal.then((r: unknown) => (r === undefined ? undefined : earlyRefusal(r, state, method)));
      return earlyRefusal(refusal, state, method);
    },
  };
}
