import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  type GetCurrentUserResponse,
  GetCurrentUserResponseSchema,
} from "../../../gen/tessera/v1/user_service_pb.js";
import type { Principal } from "../../auth/principal.js";
import { frozenAnswer } from "../../transport/index.js";

/** The user row GetCurrentUser answers from (`createdAt` in epoch ms, or a Date from the ORM). */
export interface CurrentUserRow {
  id: string;
  username: string;
  tenantId: string;
  createdAt: number | Date;
}

/** GetCurrentUser's answer for a user principal and its row. */
export type CurrentUserAnswer = (
  principal: Principal,
  row: CurrentUserRow,
) => GetCurrentUserResponse | MessageInitShape<typeof GetCurrentUserResponseSchema>;

/**
 * GetCurrentUser's answer, made once per principal and user row when both are frozen: the
 * state cache hands out the same frozen row, and the verifiers the same frozen principal made
 * from it (auth/user-principal.ts, auth/token-verifier.ts), until either changes, so the
 * answer (a pure function of the two: nothing in it is per request) is the same object too,
 * frozen, and the transport encodes it once per encoding (transport/frozen-answers.ts). A
 * changed row is a new row object, hence a new principal and a new answer; a row or principal
 * that is not frozen (no state cache, or a Basic principal) gets a new answer per call.
 */
export function createCurrentUserAnswer(): CurrentUserAnswer {
  const made = new WeakMap<Principal, { row: CurrentUserRow; answer: GetCurrentUserResponse }>();
  return (principal, row) => {
    const certificate = principal.certificate;
    const lasting =
      Object.isFrozen(principal) &&
      Object.isFrozen(principal.scopes) &&
      Object.isFrozen(row) &&
      (!certificate || (Object.isFrozen(certificate) && Object.isFrozen(certificate.sanUris)));
    if (!lasting) return answerOf(principal, row);
    const last = made.get(principal);
    if (last !== undefined && last.row === row) return last.answer;
    const answer = frozenAnswer(GetCurrentUserResponseSchema, answerOf(principal, row));
    made.set(principal, { row, answer });
    return answer;
  };
}

function answerOf(
  principal: Principal,
  row: CurrentUserRow,
): MessageInitShape<typeof GetCurrentUserResponseSchema> {
  const certificate = principal.certificate;
  return {
    id: row.id,
    username: row.username,
    tenantId: row.tenantId,
    permissions: [...principal.scopes],
    createdAt: timestampFromDate(new Date(row.createdAt)),
    ...(certificate
      ? {
          clientCertificate: {
            sha256Fingerprint: certificate.sha256Fingerprint,
            commonName: certificate.commonName ?? "",
            sanUris: [...certificate.sanUris],
          },
        }
      : {}),
  };
}
