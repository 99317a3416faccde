#!/usr/bin/env bash
# The README's CLI walkthrough, runnable as written: log in, a tenant, an application, a
# user, tokens, a machine user with a certificate bound to it, and the cleanup.
# test/examples.test.ts runs it against a fresh server.
#
#   TESSERA_ADMIN_PASSWORD=… examples/cli.sh
#
# Settings (environment): TESSERA_SERVER (localhost:50052), TESSERA_CA (certs/ca.crt),
# TESSERA_CERT_DIR (certs: the development CA that signs the client certificate),
# TESSERA_PROFILE (examples: the credentials profile it logs in to), TESSERA (the CLI,
# `npx tessera`). Names get a unique suffix, so the script runs twice on one server (and
# after examples/curl.sh) without collisions; secrets go under examples/.secrets/ (git-ignored).
set -euo pipefail

CA=${TESSERA_CA:-certs/ca.crt}
TESSERA=${TESSERA:-npx tessera}
export TESSERA_PROFILE=${TESSERA_PROFILE:-examples}
: "${TESSERA_ADMIN_PASSWORD:?set TESSERA_ADMIN_PASSWORD to the admin password printed at first start}"
SUFFIX=${SUFFIX:-$(date +%s)-$$}
SECRETS=examples/.secrets/$SUFFIX
mkdir -p -m 700 "$SECRETS"

# log in (the session goes to the profile in ~/.tessera/credentials, mode 0600) and look
printf '%s\n' "$TESSERA_ADMIN_PASSWORD" | $TESSERA login --username admin --ca-file "$CA" --password-stdin
$TESSERA whoami

# a tenant, an application and a user in it (user commands need admin:users; you grant only scopes you hold)
TENANT=$($TESSERA tenant create "acme-$SUFFIX" --output json | jq -er .id)
APP=$($TESSERA app create payments --tenant "$TENANT" --output json | jq -er .id)
ALICE=$(printf '%s\n' "alice's password $SUFFIX" \
  | $TESSERA user create alice --tenant "$TENANT" --scopes cluster:read --password-stdin --output json | jq -er .id)
$TESSERA user get "$ALICE"

# a personal access token (printed once, under "token") and an API key (under "key"), both usable as TESSERA_TOKEN
$TESSERA token create --name "CI $SUFFIX" --scopes cluster:read --expires-in 30d --output json > "$SECRETS/pat.json"
TESSERA_TOKEN=$(jq -er .token "$SECRETS/pat.json") $TESSERA whoami
$TESSERA api-key create --name "integration $SUFFIX" --output json > "$SECRETS/api-key.json"
TESSERA_TOKEN=$(jq -er .key "$SECRETS/api-key.json") $TESSERA whoami --output json | jq -e .id
$TESSERA token list                                      # never shows secrets
$TESSERA token revoke "$(jq -er .id "$SECRETS/pat.json")"
$TESSERA api-key revoke "$(jq -er .id "$SECRETS/api-key.json")"

# a machine user for the application; its token is printed once, under "token"
$TESSERA machine-user create --name payments-backend --tenant "$TENANT" --app "$APP" --output json > "$SECRETS/mu.json"
MU=$(jq -er .machineUser.id "$SECRETS/mu.json")
jq -er .token "$SECRETS/mu.json" | $TESSERA machine-user check --token-stdin   # CheckAuthentication

# a certificate for the backend, bound to the machine user: then it needs no header at all
$TESSERA certs client payments-backend --out "$SECRETS/payments-backend" --san-uri "spiffe://acme-$SUFFIX/payments"
$TESSERA machine-user bind-cert "$MU" --san-uri "spiffe://acme-$SUFFIX/payments"
$TESSERA machine-user check --cert-folder "$SECRETS/payments-backend"
$TESSERA machine-user rotate "$MU" --grace-period 1h --output json > "$SECRETS/mu-rotated.json"

# the user's lifecycle: a password reset (ends its sessions), disable, delete
printf '%s\n' "alice's new password $SUFFIX" | $TESSERA user reset-password "$ALICE" --password-stdin
$TESSERA user disable "$ALICE"
$TESSERA user delete "$ALICE"

$TESSERA logout                                          # ends the session on the server too
echo "CLI walkthrough done: tenant acme-$SUFFIX; secrets in $SECRETS"
