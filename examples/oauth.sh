#!/usr/bin/env bash
# The README's OAuth 2.0 walkthrough with curl: a machine user's Basic pair and its bound client
# certificate get tokens (client_credentials), a user session's refresh token a new pair
# (refresh_token), and tokens are revoked. test/examples.test.ts runs it against a fresh server.
#
#   TESSERA_ADMIN_PASSWORD=… examples/oauth.sh                 # from the checkout, server running
#
# Settings (environment): TESSERA_URL (https://localhost:50052), TESSERA_CA (certs/ca.crt),
# TESSERA_CERT_DIR (certs: the development CA that signs the client certificate), TESSERA (the
# CLI, `npx tessera`). Names get a unique suffix; the secrets it keeps go to a new folder under
# examples/.secrets/ (git-ignored).
set -euo pipefail

API=${TESSERA_URL:-https://localhost:50052}
CA=${TESSERA_CA:-certs/ca.crt}
TESSERA=${TESSERA:-npx tessera}
: "${TESSERA_ADMIN_PASSWORD:?set TESSERA_ADMIN_PASSWORD to the admin password printed at first start}"
SUFFIX=$(date +%s)-$$
SECRETS=examples/.secrets/oauth-$SUFFIX
mkdir -p -m 700 "$SECRETS"
call() { curl -sS --fail-with-body --cacert "$CA" -H 'content-type: application/json' "$@"; }
# the admin's session (its refresh token is spent below), a machine user with a Basic pair (shown
# once), and a client certificate bound to it
call "$API/tessera.v1.UserService/Login" \
  -d "{\"username\":\"admin\",\"password\":\"$TESSERA_ADMIN_PASSWORD\"}" > "$SECRETS/session.json"
TOKEN=$(jq -er .accessToken "$SECRETS/session.json"); REFRESH_TOKEN=$(jq -er .refreshToken "$SECRETS/session.json")
call "$API/tessera.v1.MachineUserService/CreateMachineUser" -H "authorization: Bearer $TOKEN" \
  -d "{\"name\":\"oauth-client-$SUFFIX\",\"authType\":\"MACHINE_AUTH_TYPE_BASIC\",\"scopes\":[\"cluster:read\"]}" \
  > "$SECRETS/mu.json"
MU_USERNAME=$(jq -er .username "$SECRETS/mu.json"); MU_PASSWORD=$(jq -er .password "$SECRETS/mu.json")
$TESSERA certs client oauth-client --out "$SECRETS/oauth-client"
FP=$(openssl x509 -in "$SECRETS/oauth-client/client.crt" -noout -fingerprint -sha256 | cut -d= -f2)
call "$API/tessera.v1.MachineUserService/BindCertificate" -H "authorization: Bearer $TOKEN" \
  -d "{\"machineUserId\":\"$(jq -er .machineUser.id "$SECRETS/mu.json")\",\"sha256Fingerprint\":\"$FP\"}" > /dev/null

# a machine user's Basic pair → a short-lived access token (the machine user's scopes, or fewer)
ACCESS_TOKEN=$(curl -sS --fail-with-body --cacert "$CA" -u "$MU_USERNAME:$MU_PASSWORD" "$API/oauth2/token" \
  -d grant_type=client_credentials -d scope=cluster:read | jq -er .access_token)
# {"access_token":"eyJ…","token_type":"Bearer","expires_in":900,"scope":"cluster:read"}

# its bound client certificate → a token bound to that certificate (cnf x5t#S256), refused without it
curl -sS --fail-with-body --cacert "$CA" --cert "$SECRETS/oauth-client/client.crt" \
  --key "$SECRETS/oauth-client/client.key" "$API/oauth2/token" -d grant_type=client_credentials | jq -e .access_token

# a user session's refresh token (from Login) → a new pair; no client authentication (a public client)
REFRESH_TOKEN=$(curl -sS --fail-with-body --cacert "$CA" "$API/oauth2/token" \
  -d grant_type=refresh_token -d refresh_token="$REFRESH_TOKEN" | jq -er .refresh_token)

# revoke: with client authentication, or any bearer credential of the token's owner
curl -sS --fail-with-body --cacert "$CA" -u "$MU_USERNAME:$MU_PASSWORD" "$API/oauth2/revoke" -d token="$ACCESS_TOKEN"
# signing out, a public client: its refresh token alone ends its session (RFC 7009 §2.1)
curl -sS --fail-with-body --cacert "$CA" "$API/oauth2/revoke" -d token="$REFRESH_TOKEN"
