#!/usr/bin/env bash
# The README's audit log walkthrough with the CLI: a token is created and revoked, then the log
# is read three ways. test/examples.test.ts runs it against a fresh server.
#
#   TESSERA_ADMIN_PASSWORD=… examples/audit.sh                 # from the checkout, server running
#
# Settings (environment): TESSERA_CA (certs/ca.crt), TESSERA_SERVER (localhost:50052), TESSERA
# (the CLI, `npx tessera`). It logs in to the profile "audit-…" of ~/.tessera/credentials; the
# secrets it keeps go to a new folder under examples/.secrets/ (git-ignored).
set -euo pipefail

CA=${TESSERA_CA:-certs/ca.crt}
TESSERA=${TESSERA:-npx tessera}
: "${TESSERA_ADMIN_PASSWORD:?set TESSERA_ADMIN_PASSWORD to the admin password printed at first start}"
SUFFIX=$(date +%s)-$$
SECRETS=examples/.secrets/audit-$SUFFIX
mkdir -p -m 700 "$SECRETS"
export TESSERA_PROFILE=audit-$SUFFIX
printf '%s\n' "$TESSERA_ADMIN_PASSWORD" | $TESSERA login --username admin --ca-file "$CA" --password-stdin
$TESSERA token create --name "audited $SUFFIX" --output json > "$SECRETS/pat.json"
TOKEN_ID=$(jq -er .id "$SECRETS/pat.json")
$TESSERA token revoke "$TOKEN_ID"

$TESSERA audit list --since 1h                                   # TIME ACTION OUTCOME REASON ACTOR TARGET REQUEST
$TESSERA audit list --action UserService/Login --outcome failure --output json
$TESSERA audit list --target "$TOKEN_ID"                         # what was done to it, by whom (creation to revocation)
$TESSERA logout
