// The keys that decide who may call: the bootstrap admin, JWT signing and its key rotation,
// credential formats and caches, password hashing, and the master key sealing signing keys.
import { z } from "zod";
import { MAX_TIMER_MS } from "../clock.js";
import { configKeys } from "./key-docs.js";

/** 100 years: past it a lifetime adds nothing, and a Date past ±8.64e15 ms is invalid (Internal). */
const MAX_LIFETIME_SECONDS = 100 * 366 * 24 * 3600;
const seconds = z.number().int().positive().max(MAX_LIFETIME_SECONDS);

/** `admin.*`: the bootstrap admin and the static superuser token. */
export const adminSchema = z
  .object({
    username: z.string().min(1).default("admin").register(configKeys, {
      env: "TESSERA_ADMIN_USERNAME",
      description: "Username of the bootstrap admin.",
    }),
    password: z
      .string()
      .min(12, "admin.password must be at least 12 characters")
      .optional()
      .register(configKeys, {
        env: "TESSERA_ADMIN_PASSWORD",
        description: "Password of the bootstrap admin when it is first created.",
        shownDefault: "(generated, printed once)",
      }),
    token: z
      .string()
      .min(32, "admin.token (TESSERA_ADMIN_TOKEN) must be at least 32 characters")
      .optional()
      .register(configKeys, {
        env: "TESSERA_ADMIN_TOKEN",
        description:
          "Static superuser bearer token, at least 32 characters; compared as SHA-256 in constant time.",
      }),
  })
  .strict()
  .prefault({});

const jwtSchema = z
  .object({
    secret: z
      .string()
      .min(32, "auth.jwt.secret (TESSERA_JWT_SECRET) must be at least 32 characters")
      .optional()
      .register(configKeys, {
        env: "TESSERA_JWT_SECRET",
        description:
          "HS256 signing secret (at least 32 characters); no key is published, so other services (`@tessera/sdk/server`) verify access tokens through VerifyCredential. Unset: asymmetric keys generated and served at /.well-known/jwks.json.",
      }),
    algorithm: z.enum(["EdDSA", "ES256"]).default("EdDSA").register(configKeys, {
      env: "TESSERA_JWT_ALGORITHM",
      description: "Asymmetric algorithm when no secret is set: EdDSA or ES256.",
    }),
    issuer: z.string().min(1).default("tessera").register(configKeys, {
      env: "TESSERA_JWT_ISSUER",
      description: "iss claim of issued tokens, checked on verification.",
    }),
    audience: z.string().min(1).default("tessera").register(configKeys, {
      env: "TESSERA_JWT_AUDIENCE",
      description: "aud claim of issued tokens, checked on verification.",
    }),
    accessTokenTtl: seconds.default(900).register(configKeys, {
      env: "TESSERA_ACCESS_TOKEN_TTL",
      description: "Access token lifetime in seconds.",
    }),
    refreshTokenTtl: seconds.default(30 * 24 * 3600).register(configKeys, {
      env: "TESSERA_REFRESH_TOKEN_TTL",
      description: "Refresh token lifetime in seconds.",
    }),
    clockSkew: z.number().int().min(0).max(300).default(30).register(configKeys, {
      env: "TESSERA_JWT_CLOCK_SKEW",
      description:
        "Tolerated clock skew in seconds for nbf/iat of access tokens (a token minted by an instance whose clock runs ahead is not refused as not yet valid). Never added to an expiry Tessera set: exp, grace periods and token lifetimes end exactly.",
    }),
    keyRotationInterval: seconds.default(30 * 24 * 3600).register(configKeys, {
      env: "TESSERA_JWT_KEY_ROTATION_INTERVAL",
      description:
        "Seconds each signing key signs before the next one takes over, checked while running (by exactly one instance of a fleet); retired keys stay published and verify until every token they signed has expired.",
    }),
    // Unset: DEFAULT_KEY_PRE_PUBLICATION, at most half the rotation interval (see keyPrePublicationSeconds).
    keyPrePublication: z.number().int().min(0).optional().register(configKeys, {
      env: "TESSERA_JWT_KEY_PRE_PUBLICATION",
      description:
        "Seconds a new signing key is published in the JWKS of every instance before it signs anything (longer than relying parties cache the JWKS); 0 activates it at once.",
      shownDefault: "3600 (at most half of auth.jwt.keyRotationInterval)",
    }),
    keyRefreshMs: z.number().int().min(10).max(60_000).default(500).register(configKeys, {
      env: "TESSERA_JWT_KEY_REFRESH_MS",
      description:
        "How often (ms) each instance re-reads the signing keys from the database (one small query): the bound on how long a key another instance created stays unknown here.",
    }),
  })
  .strict()
  .superRefine((jwt, ctx) => {
    const pre = jwt.keyPrePublication;
    if (pre === undefined) return;
    if (pre >= jwt.keyRotationInterval)
      ctx.addIssue({
        code: "custom",
        path: ["keyPrePublication"],
        message: `auth.jwt.keyPrePublication (${pre} s) must be shorter than auth.jwt.keyRotationInterval (${jwt.keyRotationInterval} s)`,
      });
    else if (pre > 0 && pre * 1000 < 2 * jwt.keyRefreshMs)
      ctx.addIssue({
        code: "custom",
        path: ["keyPrePublication"],
        message: `auth.jwt.keyPrePublication (${pre} s) must be at least twice auth.jwt.keyRefreshMs (${jwt.keyRefreshMs} ms), so every instance learns a key before it signs`,
      });
  })
  .prefault({});

const tokenPrefix = z.string().regex(/^[a-z0-9_]{2,16}_$/);

/** Refresh tokens' prefix: fixed, and no configured token prefix may claim it (see tokensSchema). */
export const REFRESH_TOKEN_PREFIX = "tsr_rt_";

const tokensSchema = z
  .object({
    patPrefix: tokenPrefix
      .default("tsr_pat_")
      .register(configKeys, { env: "TESSERA_PAT_PREFIX", description: "Prefix of personal access tokens." }),
    apiKeyPrefix: tokenPrefix
      .default("tsr_key_")
      .register(configKeys, { env: "TESSERA_API_KEY_PREFIX", description: "Prefix of API keys." }),
    machinePrefix: tokenPrefix.default("tsr_mu_").register(configKeys, {
      env: "TESSERA_MACHINE_TOKEN_PREFIX",
      description: "Prefix of machine-user bearer tokens.",
    }),
    lastUsedFlushSeconds: z.number().int().min(1).max(60).default(15).register(configKeys, {
      env: "TESSERA_LAST_USED_FLUSH_SECONDS",
      description: "How often last-used times are written (at most 60).",
    }),
    cacheMaxBytes: z
      .number()
      .int()
      .positive()
      .default(64 * 1024 * 1024)
      .register(configKeys, {
        env: "TESSERA_TOKEN_CACHE_MAX_BYTES",
        description:
          "Heap bytes of the in-process cache of verified secrets (tokens, API keys, machine credentials, Basic passwords) that spares PBKDF2 on re-use: an entry is counted as 160 bytes (131–155 measured), so 64 MiB hold about 420,000 credentials and 1,000,000 need about 153 MiB. Least recently used entries go first.",
        shownDefault: "67108864 (64 MiB)",
      }),
    // Unset: the memory bound alone decides (cacheMaxBytes).
    cacheSize: z.number().int().positive().optional().register(configKeys, {
      env: "TESSERA_TOKEN_CACHE_SIZE",
      description:
        "At most this many entries in that cache as well; unset, auth.tokens.cacheMaxBytes alone bounds it.",
    }),
    sharedDigests: z.boolean().default(true).register(configKeys, {
      env: "TESSERA_TOKEN_SHARED_DIGESTS",
      description:
        "After PBKDF2 verified a token's or machine credential's secret, store HMAC(key derived from the master key, credential, hash, secret) beside its row, so every instance (and this one after a restart or an eviction) recognises it with one HMAC instead of PBKDF2. A dump of the database cannot test guesses without the master key. Never done for human passwords. A digest that cannot be read costs a PBKDF2, never the call; a master-key rotation (auth.previousMasterKeys) clears the digests of the previous key at the first start that reseals the signing keys.",
    }),
  })
  .strict()
  .superRefine((tokens, ctx) => {
    // A token is told by its prefix: a prefix shared by two kinds hands one kind's tokens to
    // the other's verifier (never valid), and one that starts with the refresh tokens' is
    // read as a refresh token where both are taken (POST /oauth2/revoke revoked nothing).
    const keys = ["patPrefix", "apiKeyPrefix", "machinePrefix"] as const;
    for (const [i, key] of keys.entries()) {
      const prefix = tokens[key];
      if (prefix.startsWith(REFRESH_TOKEN_PREFIX))
        ctx.addIssue({
          code: "custom",
          path: [key],
          message: `auth.tokens.${key} (${prefix}) must not start with the refresh tokens' prefix ${REFRESH_TOKEN_PREFIX}`,
        });
      const same = keys.slice(0, i).find((other) => tokens[other] === prefix);
      if (same !== undefined)
        ctx.addIssue({
          code: "custom",
          path: [key],
          message: `auth.tokens.${key} must differ from auth.tokens.${same} (both ${prefix})`,
        });
    }
  })
  .prefault({});

/** A master key: the base64 of 32 random bytes. */
const MASTER_KEY = /^[A-Za-z0-9+/_-]{43}=?$/;

/** `auth.*`: signing, credentials, hashing and the master key. */
export const authSchema = z
  .object({
    jwt: jwtSchema,
    oauth: z
      .object({
        issuer: z
          .string()
          .refine(
            (v) => {
              try {
                const u = new URL(v);
                return (
                  (u.protocol === "https:" || u.protocol === "http:") && !u.search && !u.hash && !u.username
                );
              } catch {
                return false;
              }
            },
            {
              message:
                "auth.oauth.issuer (TESSERA_OAUTH_ISSUER) must be an https URL without query or fragment",
            },
          )
          .optional()
          .register(configKeys, {
            env: "TESSERA_OAUTH_ISSUER",
            description:
              "OAuth 2.0 issuer identifier (RFC 8414): the https URL clients reach this server at, e.g. https://tessera.example.com:50052. The discovery document (/.well-known/oauth-authorization-server) names it and builds the token, revocation and introspection endpoints and jwks_uri (none when signing with auth.jwt.secret) from it. Unset: taken from each request's Host (fine for one address; set it behind a proxy or load balancer).",
            shownDefault: "(the request's https://host)",
          }),
      })
      .strict()
      .prefault({}),
    basic: z
      .object({
        enabled: z.boolean().default(true).register(configKeys, {
          env: "TESSERA_BASIC_AUTH",
          description: "Accept Authorization: Basic for users.",
        }),
      })
      .strict()
      .prefault({}),
    tokens: tokensSchema,
    passwordIterations: z.number().int().min(1000).default(600_000).register(configKeys, {
      env: "TESSERA_PASSWORD_ITERATIONS",
      description:
        "PBKDF2-SHA256 iterations for new hashes (OWASP 2023: 600000). A user's password or a machine user's Basic secret hashed with a lower count is re-hashed at its next successful check (Login, HTTP Basic, OAuth client authentication, VerifyCredential); one with a higher count is left as it is. Raise it, do not lower it: an account still on a higher count refuses a wrong password more slowly than an unknown name is refused.",
    }),
    hashConcurrency: z.number().int().positive().optional().register(configKeys, {
      env: "TESSERA_HASH_CONCURRENCY",
      description:
        "PBKDF2 hashes computed at once (password checks, new secrets); the rest of the cores are left to serving requests.",
      shownDefault: "(cores − 1, at least 1)",
    }),
    hashQueue: z.number().int().min(0).optional().register(configKeys, {
      env: "TESSERA_HASH_QUEUE",
      description:
        "PBKDF2 hashes waiting for a slot; past it a password check is refused at once with Unavailable and Retry-After.",
      shownDefault: "(4 × hashConcurrency)",
    }),
    hashNice: z.number().int().min(0).max(19).default(19).register(configKeys, {
      env: "TESSERA_HASH_NICE",
      description:
        "Nice value (0–19) the PBKDF2 threads give themselves (Linux): at 19 hashing only gets CPU that serving requests leaves, so a flood of wrong passwords cannot starve authenticated calls. 0 hashes at the event loop's priority.",
    }),
    hashIdle: z.boolean().default(true).register(configKeys, {
      env: "TESSERA_HASH_IDLE",
      description:
        "Linux: the PBKDF2 threads also put themselves in the SCHED_IDLE scheduling class (through util-linux's chrt), so hashing runs only on CPU nothing else wants: under a wrong-password flood authenticated calls keep their CPU. Where it cannot be set, hashNice alone applies.",
    }),
    hashDeadlineMs: z.number().int().min(0).max(MAX_TIMER_MS).default(900).register(configKeys, {
      env: "TESSERA_HASH_DEADLINE_MS",
      description:
        "Milliseconds a password check may wait for its verdict (queue and hash); past it Unavailable with Retry-After. 0: no limit. Hashing a new secret is never cut short.",
    }),
    masterKey: z
      .string()
      .regex(
        MASTER_KEY,
        "auth.masterKey (TESSERA_MASTER_KEY) must be the base64 of 32 random bytes (openssl rand -base64 32)",
      )
      .optional()
      .register(configKeys, {
        env: "TESSERA_MASTER_KEY",
        description:
          "Base64 of 32 random bytes: the key-encryption key sealing private signing keys in the database (AES-256-GCM). Unset with SQLite: <database folder>/master.key, generated 0600 on first start. Required with PostgreSQL (or masterKeyFile).",
      }),
    masterKeyFile: z.string().min(1).optional().register(configKeys, {
      env: "TESSERA_MASTER_KEY_FILE",
      description:
        "File holding the master key (base64 of 32 bytes), instead of auth.masterKey. Refused when any user of the machine can read or write it (o+r, o+w): chmod 600 (640 for a group); a Kubernetes secret volume needs defaultMode: 0400 (or 0440 with fsGroup), a rootless podman bind mount --userns=keep-id.",
    }),
    previousMasterKeys: z
      .array(
        z
          .string()
          .regex(
            MASTER_KEY,
            "auth.previousMasterKeys (TESSERA_PREVIOUS_MASTER_KEYS) must each be the base64 of 32 bytes",
          ),
      )
      .default([])
      .register(configKeys, {
        env: "TESSERA_PREVIOUS_MASTER_KEYS",
        description:
          "Comma-separated master keys being rotated out: signing keys sealed with one gain an envelope under the current master key (at start, and when read), and keys created are sealed under both, so instances still on an old key sign on. Drop them once every instance runs with the new key; the start without them keeps the current key's envelopes only.",
      }),
    maxTokenTtl: seconds.default(24 * 3600).register(configKeys, {
      env: "TESSERA_MAX_TOKEN_TTL",
      description:
        "Cap in seconds on the lifetime of every access JWT minted (configured lifetime, machine tokens, rotation grace periods). PATs and API keys are checked on every use and revocable at once, so their expires_at is not capped.",
    }),
    sessionMaxLifetime: z
      .number()
      .int()
      .min(0)
      .max(MAX_LIFETIME_SECONDS)
      .default(30 * 24 * 3600)
      .register(configKeys, {
        env: "TESSERA_SESSION_MAX_LIFETIME",
        description:
          "Absolute lifetime of a user session in seconds (2592000: 30 days), from its login, however often it is refreshed: a refresh past it is refused with TOKEN_EXPIRED (the refresh token left unspent, as an expired one), and no refresh or access token it issues outlives it; an access token of it that outlives it (issued by an instance with no bound) is refused with TOKEN_EXPIRED from that end, on every call Tessera answers (the SDK's offline JWT check sees only exp). Applies to sessions opened before it was set, from their login. 0: no bound (a session refreshed within auth.jwt.refreshTokenTtl lasts forever).",
      }),
    sessionPruneInterval: z.number().int().min(0).default(3600).register(configKeys, {
      env: "TESSERA_SESSION_PRUNE_INTERVAL",
      description:
        "Seconds between prunings of ended sessions: a session revoked, or whose last refresh token expired, longer ago than the refresh-token lifetime (and never less than auth.maxTokenTtl + auth.jwt.clockSkew, so none of its access tokens can still verify) is deleted with its refresh tokens, in batches. 0: never.",
    }),
  })
  .strict()
  .prefault({});
