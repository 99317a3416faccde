#!/usr/bin/env bash
# The README's RFC 7662 introspection walkthrough: a machine user holding auth:verify asks
# POST /oauth2/introspect about an access token. test/examples.test.ts runs it against a fresh
# server.
#
#   TESSERA_ADMIN_PASSWORD=… examples/introspect.sh            # from the checkout, server running
#
# Settings (environment): TESSERA_URL (https://localhost:50052), TESSERA_CA (certs/ca.crt),
# TESSERA (the CLI, `npx tessera`). Names get a unique suffix; the secrets it keeps go to a new
# folder under examples/.secrets/ (git-ignored).
set -euo pipefail

API=${TESSERA_URL:-https://localhost:50052}
CA=${TESSERA_CA:-certs/ca.crt}
TESSERA=${TESSERA:-npx tessera}
: "${TESSERA_ADMIN_PASSWORD:?set TESSERA_ADMIN_PASSWORD to the admin password printed at first start}"
SUFFIX=$(date +%s)-$$
SECRETS=examples/.secrets/introspect-$SUFFIX
mkdir -p -m 700 "$SECRETS"
# the token to introspect: here the admin's access token
TOKEN=$(curl -sS --fail-with-body --cacert "$CA" "$API/tessera.v1.UserService/Login" -H 'content-type: application/json' \
  -d "{\"username\":\"admin\",\"password\":\"$TESSERA_ADMIN_PASSWORD\"}" | jq -er .accessToken)
# the asking client: a machine user holding auth:verify; its token is printed once
TESSERA_TOKEN=$TOKEN $TESSERA --ca-file "$CA" machine-user create --name "gateway-$SUFFIX" \
  --scopes auth:verify --output json > "$SECRETS/verifier.json"
VERIFIER_TOKEN=$(jq -er .token "$SECRETS/verifier.json")

curl -sS --fail-with-body --cacert "$CA" "$API/oauth2/introspect" \
  -H "authorization: Bearer $VERIFIER_TOKEN" --data-urlencode "token=$TOKEN" | jq -e 'select(.active)'
# {"active":true,"scope":"*","sub":"…","token_type":"Bearer","tenant_id":"…","username":"admin","exp":…}
