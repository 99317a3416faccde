#!/usr/bin/env bash
# The README's quick start with the CLI: log in (a profile), look, tokens, a second profile for a
# user of another tenant, log out. test/examples.test.ts runs it against a fresh server.
#
#   TESSERA_ADMIN_PASSWORD=… examples/quick-start-cli.sh      # from the checkout, server running
#
# Settings (environment): TESSERA_CA (certs/ca.crt), TESSERA_SERVER (localhost:50052), TESSERA
# (the CLI, `npx tessera`). It logs in to the profiles "default" and "alice-…" of
# ~/.tessera/credentials. Names get a unique suffix, so it runs again on the same server; the
# secrets it keeps go to a new folder under examples/.secrets/ (git-ignored).
set -euo pipefail

CA=${TESSERA_CA:-certs/ca.crt}
TESSERA=${TESSERA:-npx tessera}
: "${TESSERA_ADMIN_PASSWORD:?set TESSERA_ADMIN_PASSWORD to the admin password printed at first start}"
SUFFIX=$(date +%s)-$$
SECRETS=examples/.secrets/quick-start-cli-$SUFFIX
mkdir -p -m 700 "$SECRETS"

# profile "default"; without --password-stdin, login prompts for the password without echo
printf '%s\n' "$TESSERA_ADMIN_PASSWORD" | $TESSERA login --username admin --ca-file "$CA" --password-stdin
$TESSERA whoami

# a personal access token and an API key: each secret is printed once, under the RPC's own field name
$TESSERA token create --name "CI $SUFFIX" --scopes cluster:read --expires-in 30d --output json > "$SECRETS/pat.json"
$TESSERA api-key create --name "integration $SUFFIX" --output json > "$SECRETS/api-key.json"   # {"id","key",…}
# any token works through TESSERA_TOKEN, with no profile at all
TESSERA_TOKEN=$(jq -er .token "$SECRETS/pat.json") $TESSERA --ca-file "$CA" whoami
TESSERA_TOKEN=$(jq -er .key "$SECRETS/api-key.json") $TESSERA --ca-file "$CA" whoami
$TESSERA token list                                                   # never shows secrets
$TESSERA token revoke "$(jq -er .id "$SECRETS/pat.json")"

# a user outside the default tenant names it at login (name or id); a named profile keeps her session
TENANT=$($TESSERA tenant create "acme-$SUFFIX" --output json | jq -er .id)
printf '%s\n' "alice's password $SUFFIX" \
  | $TESSERA user create alice --tenant "$TENANT" --scopes cluster:read --password-stdin
printf '%s\n' "alice's password $SUFFIX" \
  | $TESSERA --profile "alice-$SUFFIX" login --username alice --tenant "acme-$SUFFIX" --ca-file "$CA" --password-stdin
$TESSERA --profile "alice-$SUFFIX" whoami                             # or TESSERA_PROFILE=alice-… tessera whoami

$TESSERA --profile "alice-$SUFFIX" logout                             # ends the session on the server too
$TESSERA logout
