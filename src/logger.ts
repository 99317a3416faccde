import { type Logger, pino } from "pino";

/**
 * The service logger (JSON lines on stderr, so stdout stays for what commands print,
 * such as a generated password or token shown once). Credentials are never passed to
 * it; the redaction list is a second line of defence.
 */
export function createLogger(level: string): Logger {
  return pino(
    {
      level,
      base: { service: "tessera" },
      redact: {
        paths: [
          "password",
          "token",
          "*.password",
          "*.token",
          "*.authorization",
          "*.refreshToken",
          "*.accessToken",
          "headers.authorization",
          'headers["x-api-key"]',
        ],
        censor: "[redacted]",
      },
    },
    pino.destination(2),
  );
}
