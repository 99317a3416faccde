import { Code } from "@connectrpc/connect";
import {
  AlreadyExistsError,
  AuthenticationError,
  ClientConfigError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  RateLimitedError,
  TesseraClientError,
  UnavailableError,
} from "../sdk/errors.js";
import type { ExitCodes } from "./exit-codes.js";
import { printable } from "./output.js";
import { PromptError } from "./prompt.js";

/**
 * The SDK's option names as the CLI spells them: an SDK message names the option a
 * program passes (`caFile`), a CLI user needs the flag (`--ca-file`).
 */
const FLAG_NAMES: [RegExp, string][] = [
  [/\bcaFile\b/g, "--ca-file"],
  [/\bcertFolder\b/g, "--cert-folder"],
];

/** `message` with the SDK's option names replaced by the CLI flags. */
export function withFlagNames(message: string): string {
  return FLAG_NAMES.reduce((m, [re, flag]) => m.replace(re, flag), message);
}

/**
 * The exit code and message for an error a client command raised, or undefined when
 * it is not a client error. Messages carry the server's reason and request id; they
 * never carry a credential (the SDK guarantees that for its errors).
 */
export function describeClientError(
  err: unknown,
  exit: ExitCodes,
): { code: number; message: string } | undefined {
  if (err instanceof PromptError) return { code: exit.usage, message: err.message };
  if (err instanceof ClientConfigError)
    return { code: exit.usage, message: printable(withFlagNames(err.message)) };
  if (!(err instanceof TesseraClientError)) return undefined;
  // The server's words (message, reason, request id, scopes) as text, newlines included:
  // one that rewrote the terminal, or added a line, would pass for the CLI's own.
  const extra = [err.reason, err.requestId ? `request id ${err.requestId}` : undefined]
    .filter(Boolean)
    .map((part) => printable(part!))
    .join(", ");
  let message = `${printable(withFlagNames(err.message))}${extra ? ` (${extra})` : ""}`;
  let code: number = exit.error;
  if (err instanceof AuthenticationError) {
    code = exit.unauthenticated;
    const sessionOver =
      err.reason === "TOKEN_EXPIRED" || err.reason === "AUTH_REQUIRED" || err.reason === "TOKEN_REVOKED";
    if (sessionOver && !err.message.includes("tessera login")) {
      message += "\nhint: run `tessera login`, or set TESSERA_TOKEN";
    }
  } else if (err instanceof PermissionDeniedError) {
    code = exit.permissionDenied;
    if (err.requiredScopes.length > 0)
      message += `\nrequired scopes: ${printable(err.requiredScopes.join(" "))}`;
  } else if (err instanceof NotFoundError) code = exit.notFound;
  else if (err instanceof RateLimitedError) {
    code = exit.rateLimited;
    const retryAfter = err.retryAfter ?? err.metadata.get("retry-after") ?? undefined;
    message = `rate limited: ${message}`;
    if (retryAfter !== undefined) message += `\nRetry-After: ${printable(String(retryAfter))}`;
  } else if (err instanceof AlreadyExistsError) code = exit.alreadyExists;
  else if (err instanceof UnavailableError || err.code === Code.DeadlineExceeded) {
    code = exit.unavailable;
    message = `server unavailable: ${message}`;
  } else if (err instanceof InvalidArgumentError) code = exit.usage;
  return { code, message };
}
