#!/usr/bin/env bash
# The README's quick start with buf curl (gRPC, through the server's reflection): list the
# methods, log in, then ask who you are over mutual TLS. test/examples.test.ts runs it against
# a fresh server.
#
#   TESSERA_ADMIN_PASSWORD=… examples/quick-start-buf.sh      # from the checkout, server running
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
SECRETS=examples/.secrets/quick-start-buf-$(date +%s)-$$

npx buf curl --protocol grpc --reflect --cacert "$CA" --list-methods "$API"
TOKEN=$(npx buf curl --protocol grpc --reflect --cacert "$CA" \
  -d "{\"username\":\"admin\",\"password\":\"$TESSERA_ADMIN_PASSWORD\"}" \
  "$API/tessera.v1.UserService/Login" | jq -er .accessToken)
$TESSERA certs client my-backend --out "$SECRETS/my-backend"
npx buf curl --protocol grpc --reflect --cacert "$CA" \
  --cert "$SECRETS/my-backend/client.crt" --key "$SECRETS/my-backend/client.key" \
  -H "authorization: Bearer $TOKEN" "$API/tessera.v1.UserService/GetCurrentUser"
