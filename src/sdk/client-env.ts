/**
 * Client-side environment variables (distinct from the server's TESSERA_HOST/TESSERA_PORT/
 * TESSERA_CERT_DIR). A module of their own, importing nothing, so that the command line's
 * tree (src/cli/client-commands.ts) names them in its help without loading the SDK.
 */
export const CLIENT_ENV = {
  token: "TESSERA_TOKEN",
  server: "TESSERA_SERVER",
  certFolder: "TESSERA_CERT_FOLDER",
  caFile: "TESSERA_CA_FILE",
  profile: "TESSERA_PROFILE",
  credentialsFile: "TESSERA_CREDENTIALS_FILE",
} as const;
