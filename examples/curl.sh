#!/usr/bin/env bash
# The README's curl walkthrough (Connect JSON), runnable as written: log in, then a tenant,
# an application, a machine user, its check, a backend, a client certificate bound to it,
# and a certificate-bound access token. test/examples.test.ts runs it against a fresh server.
#
#   TESSERA_ADMIN_PASSWORD=… examples/curl.sh
#
# Settings (environment): TESSERA_URL (https://localhost:50052), TESSERA_CA (certs/ca.crt),
# TESSERA_CERT_DIR (certs: the development CA that signs the client certificate),
# TESSERA (the CLI, `npx tessera`). Names get a unique suffix, so the script runs twice on
# one server without collisions; secrets go under examples/.secrets/ (git-ignored). Run it from
# the checkout (certs/ and examples/ are relative to it).
set -euo pipefail

API=${TESSERA_URL:-https://localhost:50052}
CA=${TESSERA_CA:-certs/ca.crt}
TESSERA=${TESSERA:-npx tessera}
: "${TESSERA_ADMIN_PASSWORD:?set TESSERA_ADMIN_PASSWORD to the admin password printed at first start}"
SUFFIX=${SUFFIX:-$(date +%s)-$$}
SECRETS=examples/.secrets/$SUFFIX
mkdir -p -m 700 "$SECRETS"

# --fail-with-body: an error status fails the script (and shows the error envelope);
# jq -e: a missing field fails it too, instead of passing "null" along.
call() { curl -sS --fail-with-body --cacert "$CA" -H 'content-type: application/json' "$@"; }

# 0. log in as the admin: a short-lived access token
TOKEN=$(call "$API/tessera.v1.UserService/Login" \
  -d "{\"username\":\"admin\",\"password\":\"$TESSERA_ADMIN_PASSWORD\"}" | jq -er .accessToken)
call "$API/tessera.v1.UserService/GetCurrentUser" -H "authorization: Bearer $TOKEN" -d '{}' | jq -e .username

# 1. a tenant and an application in it
TENANT=$(call "$API/tessera.v1.TenantService/CreateTenant" -H "authorization: Bearer $TOKEN" \
  -d "{\"name\":\"acme-$SUFFIX\"}" | jq -er .tenant.id)
APP=$(call "$API/tessera.v1.TenantService/CreateApplication" -H "authorization: Bearer $TOKEN" \
  -d "{\"tenantId\":\"$TENANT\",\"name\":\"payments\"}" | jq -er .application.id)

# 2. a machine user assigned to the application; its token is in this response only
call "$API/tessera.v1.MachineUserService/CreateMachineUser" -H "authorization: Bearer $TOKEN" \
  -d "{\"tenantId\":\"$TENANT\",\"name\":\"payments-backend\",\"authType\":\"MACHINE_AUTH_TYPE_BEARER\",\"applicationIds\":[\"$APP\"]}" \
  > "$SECRETS/mu.json"
MU=$(jq -er .machineUser.id "$SECRETS/mu.json"); MU_TOKEN=$(jq -er .token "$SECRETS/mu.json")

# 3. check it (seed 000's /api/machine/check)
call "$API/tessera.v1.MachineUserService/CheckAuthentication" -H "authorization: Bearer $MU_TOKEN" -d '{}' \
  | jq -e '.authenticated == true'

# 4. register a backend (seed 000's /api/machine/register-backend); the same URL again updates the same backend
call "$API/tessera.v1.MachineUserService/RegisterBackend" -H "authorization: Bearer $MU_TOKEN" \
  -d "{\"callbackUrl\":\"https://backend.example.com/triggers\",\"version\":\"1.0.0\",\"applicationId\":\"$APP\"}" \
  | jq -e '.success == true'

# 5. a client certificate from the development CA, bound to the machine user by fingerprint
$TESSERA certs client payments-backend --out "$SECRETS/payments-backend" --san-uri "spiffe://acme-$SUFFIX/payments"
FP=$(openssl x509 -in "$SECRETS/payments-backend/client.crt" -noout -fingerprint -sha256 | cut -d= -f2)
call "$API/tessera.v1.MachineUserService/BindCertificate" -H "authorization: Bearer $TOKEN" \
  -d "{\"machineUserId\":\"$MU\",\"sha256Fingerprint\":\"$FP\"}" | jq -e .binding.id

# 6. use it: the certificate alone authenticates the backend, no header
CERT=(--cert "$SECRETS/payments-backend/client.crt" --key "$SECRETS/payments-backend/client.key")
call "${CERT[@]}" -d '{}' "$API/tessera.v1.MachineUserService/CheckAuthentication" \
  | jq -e --arg mu "$MU" '.machineUserId == $mu'

# 7. a short-lived access token bound to that certificate (RFC 8705), because it was issued over mTLS
call "${CERT[@]}" -d '{}' "$API/tessera.v1.MachineUserService/IssueAccessToken" | jq -e '.certificateBound == true'

echo "curl walkthrough done: tenant acme-$SUFFIX, machine user $MU; secrets in $SECRETS"
