#!/usr/bin/env bash
# The README's quick start with curl (Connect JSON): log in as the admin, ask who you are, then
# the same over mutual TLS with a client certificate. test/examples.test.ts runs it against a
# fresh server.
#
#   TESSERA_ADMIN_PASSWORD=… examples/quick-start-curl.sh     # from the checkout, server running
#
# Settings (environment): TESSERA_URL (https://localhost:50052), TESSERA_CA (certs/ca.crt),
# TESSERA_CERT_DIR (certs: the development CA that signs the client certificate), TESSERA (the
# CLI, `npx tessera`). The client certificate goes to a new folder under examples/.secrets/
# (git-ignored) on every run.
set -euo pipefail

API=${TESSERA_URL:-https://localhost:50052}
CA=${TESSERA_CA:-certs/ca.crt}
TESSERA=${TESSERA:-npx tessera}
: "${TESSERA_ADMIN_PASSWORD:?set TESSERA_ADMIN_PASSWORD to the admin password printed at first start}"
SECRETS=examples/.secrets/quick-start-$(date +%s)-$$

TOKEN=$(curl -sS --fail-with-body --cacert "$CA" "$API/tessera.v1.UserService/Login" \
  -H 'content-type: application/json' \
  -d "{\"username\":\"admin\",\"password\":\"$TESSERA_ADMIN_PASSWORD\"}" | jq -er .accessToken)

curl -sS --fail-with-body --cacert "$CA" "$API/tessera.v1.UserService/GetCurrentUser" \
  -H 'content-type: application/json' -H "authorization: Bearer $TOKEN" -d '{}' | jq .

# the same with a client certificate (mTLS): the response then names the certificate
$TESSERA certs client my-backend --out "$SECRETS/my-backend"
curl -sS --fail-with-body --cacert "$CA" --cert "$SECRETS/my-backend/client.crt" --key "$SECRETS/my-backend/client.key" \
  "$API/tessera.v1.UserService/GetCurrentUser" \
  -H 'content-type: application/json' -H "authorization: Bearer $TOKEN" -d '{}' | jq -e .clientCertificate
