#!/usr/bin/env bash
# The README's VerifyCredential walkthrough: a machine user holding auth:verify (the service that
# asks) checks a personal access token one of its callers presented. test/examples.test.ts runs it
# against a fresh server.
#
#   TESSERA_ADMIN_PASSWORD=… examples/verify.sh                # from the checkout, server running
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
SECRETS=examples/.secrets/verify-$SUFFIX
mkdir -p -m 700 "$SECRETS"
call() { curl -sS --fail-with-body --cacert "$CA" -H 'content-type: application/json' "$@"; }
TOKEN=$(call "$API/tessera.v1.UserService/Login" \
  -d "{\"username\":\"admin\",\"password\":\"$TESSERA_ADMIN_PASSWORD\"}" | jq -er .accessToken)

# the asking service: a machine user holding auth:verify; its token is printed once
TESSERA_TOKEN=$TOKEN $TESSERA --ca-file "$CA" machine-user create --name "workflows-api-$SUFFIX" \
  --scopes auth:verify --output json > "$SECRETS/verifier.json"
VERIFIER_TOKEN=$(jq -er .token "$SECRETS/verifier.json")

# what one of its callers presents: here a personal access token of the admin's
PAT=$(call "$API/tessera.v1.TokenService/CreatePersonalAccessToken" -H "authorization: Bearer $TOKEN" \
  -d "{\"name\":\"workflows $SUFFIX\",\"scopes\":[\"workflows:read\",\"workflows:run\"]}" | jq -er .token)

call "$API/tessera.v1.VerificationService/VerifyCredential" -H "authorization: Bearer $VERIFIER_TOKEN" \
  -d "{\"credential\": \"$PAT\", \"requiredScopes\": [\"workflows:run\"]}" | jq -e 'select(.valid)'
# {"valid":true,"code":"VALID","principalId":"…","principalKind":"VERIFIED_PRINCIPAL_KIND_USER",
#  "tenantId":"…","scopes":["workflows:read","workflows:run"],"credentialId":"…","credentialKind":"pat"}
