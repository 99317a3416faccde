import { create, toBinary, toJsonString } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  type GetCurrentUserResponse,
  GetCurrentUserResponseSchema,
} from "../gen/tessera/v1/user_service_pb.js";

/**
 * The constant answer of the reference servers: a GetCurrentUserResponse shaped like the
 * one Tessera returns for the benchmark user, so every server serialises a comparable body.
 */
export const CONSTANT_USER: GetCurrentUserResponse = create(GetCurrentUserResponseSchema, {
  id: "0b9f8a52-58a3-4a57-9d52-1c7f0f6b1e2a",
  username: "bench-user",
  tenantId: "5d0c1c1e-3f0b-4c4e-9a59-0f3c7c2a9d11",
  permissions: ["bench:read"],
  createdAt: timestampFromDate(new Date("2026-01-01T00:00:00Z")),
});

/** The Connect JSON body of {@link CONSTANT_USER}. */
export const CONSTANT_USER_JSON = toJsonString(GetCurrentUserResponseSchema, CONSTANT_USER);

/** The gRPC length-prefixed message of {@link CONSTANT_USER}: flag byte, 4-byte length, protobuf. */
export const CONSTANT_USER_GRPC_FRAME = grpcFrame(toBinary(GetCurrentUserResponseSchema, CONSTANT_USER));

/** Frame one protobuf message for gRPC (uncompressed). */
export function grpcFrame(message: Uint8Array): Buffer {
  const frame = Buffer.alloc(5 + message.length);
  frame.writeUInt8(0, 0);
  frame.writeUInt32BE(message.length, 1);
  frame.set(message, 5);
  return frame;
}
