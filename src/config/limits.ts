// The rate limits: request budgets, the brute-force lockouts, and the Redis that shares them
// between instances.
import { z } from "zod";
import { configKeys } from "./key-docs.js";

const seconds = z.number().int().positive();

/** `rateLimit.*`: per-IP and per-principal budgets, failed-login lockouts, Redis. */
export const rateLimitSchema = z
  .object({
    enabled: z
      .boolean()
      .default(true)
      .register(configKeys, { env: "TESSERA_RATE_LIMIT", description: "Enforce rate limits." }),
    perIpPerMinute: z.number().int().positive().default(600).register(configKeys, {
      env: "TESSERA_RATE_LIMIT_PER_IP",
      description: "Requests per minute per client IP.",
    }),
    perPrincipalPerMinute: z.number().int().positive().default(1200).register(configKeys, {
      env: "TESSERA_RATE_LIMIT_PER_PRINCIPAL",
      description: "Requests per minute per authenticated principal.",
    }),
    authFailuresPerIpPerMinute: z.number().int().positive().default(20).register(configKeys, {
      env: "TESSERA_RATE_LIMIT_AUTH_FAILURES",
      description:
        "Failed logins/credentials per minute per IP before refusing. Budget is reserved before a password is verified and refunded on success.",
    }),
    verifyFailuresPerCallerPerMinute: z.number().int().positive().default(600).register(configKeys, {
      env: "TESSERA_RATE_LIMIT_VERIFY_FAILURES_PER_CALLER",
      description:
        "Failed VerifyCredential verifications per minute per verifying caller across all the client addresses it names (`client_address`), each of which has its own budget of `rateLimit.authFailuresPerIpPerMinute`: bounds the PBKDF2 work one caller can cause. Reserved before the hash and refunded on success, as the per-IP budget. Verifications without a client address spend the caller's per-IP-sized budget alone, as before.",
    }),
    authFailuresPerUsernamePerHour: z.number().int().positive().default(100).register(configKeys, {
      env: "TESSERA_RATE_LIMIT_AUTH_FAILURES_PER_USERNAME",
      description:
        "Failed password checks per hour for one username, from all addresses together, before the username is refused until the hour ends. Not counted for a machine user's Basic username (`mu_…`): its password is generated (192 random bits), and the budget would only let whoever knows the username refuse a credential not yet verified.",
    }),
    authFailuresPerUsernamePerIp: z.number().int().positive().default(5).register(configKeys, {
      env: "TESSERA_RATE_LIMIT_AUTH_FAILURES_PER_USERNAME_IP",
      description:
        "Consecutive failed password checks for one username from one IP, within an hour, before that IP is locked out of that username.",
    }),
    passwordChecksPerUsernamePerMinute: z.number().int().positive().default(10).register(configKeys, {
      env: "TESSERA_RATE_LIMIT_PASSWORD_CHECKS_PER_USERNAME",
      description:
        "Password checks per minute for one username, from all addresses together, right passwords included (Login, ChangePassword): each is a PBKDF2, so one account's holder cannot keep the hash pool busy with its own logins. Reserved before the hash; a wrong password gives its check back (the failure budgets count it), so guessing cannot use this budget to lock the owner out. HTTP Basic is not counted: a right Basic password is verified once, then cached.",
    }),
    credentialCreationsPerHour: z.number().int().positive().default(60).register(configKeys, {
      env: "TESSERA_RATE_LIMIT_CREDENTIAL_CREATIONS",
      description:
        "New secrets one principal may create per hour, each a PBKDF2: personal access tokens, API keys, machine-user credentials (creation and rotation) and passwords (CreateUser, UpdateUser setting one, ChangePassword; a wrong current password is given back).",
    }),
    lockoutSeconds: seconds.default(60).register(configKeys, {
      env: "TESSERA_RATE_LIMIT_LOCKOUT_SECONDS",
      description: "First lockout of an IP from a username; each further lockout within a day doubles it.",
    }),
    maxLockoutSeconds: seconds.default(3600).register(configKeys, {
      env: "TESSERA_RATE_LIMIT_MAX_LOCKOUT_SECONDS",
      description: "Longest lockout of an IP from a username.",
    }),
    redisUrl: z.string().optional().register(configKeys, {
      env: "TESSERA_REDIS_URL",
      description:
        "redis://… to share rate limits between instances. The start waits for the first connection before listening (up to max(1000, rateLimit.redisTimeoutMs) ms); refused or unanswered, the instance starts limiting per instance and logs it once.",
    }),
    redisTimeoutMs: z.number().int().positive().max(10_000).default(50).register(configKeys, {
      env: "TESSERA_REDIS_TIMEOUT_MS",
      description:
        "Deadline in milliseconds of every Redis call; past it (or with Redis down) limits fall back to per-instance counting, and Redis is tried again at most once a second.",
    }),
  })
  .strict()
  .prefault({});
