#!/usr/bin/env bash
# The README's static admin token (seed 003): the server started with TESSERA_ADMIN_TOKEN, and the
# same value as a Bearer token lists every tenant. test/examples.test.ts runs it against a fresh
# server started with one.
#
#   TESSERA_ADMIN_TOKEN=… examples/admin-token.sh             # from the checkout, server running
#
# Settings (environment): TESSERA_URL (https://localhost:50052), TESSERA_CA (certs/ca.crt).
set -euo pipefail

API=${TESSERA_URL:-https://localhost:50052}
CA=${TESSERA_CA:-certs/ca.crt}
: "${TESSERA_ADMIN_TOKEN:?set TESSERA_ADMIN_TOKEN to the token the server was started with}"

curl -sS --fail-with-body --cacert "$CA" "$API/tessera.v1.TenantService/ListTenants" \
  -H 'content-type: application/json' -H "authorization: Bearer $TESSERA_ADMIN_TOKEN" -d '{}' | jq -e .tenants
