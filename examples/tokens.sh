#!/usr/bin/env bash
# The README's personal access tokens and API keys with curl (Connect JSON): create an API key and
# a personal access token, use each, list, revoke. test/examples.test.ts runs it against a fresh
# server.
#
#   TESSERA_ADMIN_PASSWORD=… examples/tokens.sh                # from the checkout, server running
#
# Settings (environment): TESSERA_URL (https://localhost:50052), TESSERA_CA (certs/ca.crt).
# Names get a unique suffix; the secrets it keeps go to a new folder under examples/.secrets/
# (git-ignored).
set -euo pipefail

API=${TESSERA_URL:-https://localhost:50052}
CA=${TESSERA_CA:-certs/ca.crt}
: "${TESSERA_ADMIN_PASSWORD:?set TESSERA_ADMIN_PASSWORD to the admin password printed at first start}"
SUFFIX=$(date +%s)-$$
SECRETS=examples/.secrets/tokens-$SUFFIX
mkdir -p -m 700 "$SECRETS"
call() { curl -sS --fail-with-body --cacert "$CA" -H 'content-type: application/json' "$@"; }
TOKEN=$(call "$API/tessera.v1.UserService/Login" \
  -d "{\"username\":\"admin\",\"password\":\"$TESSERA_ADMIN_PASSWORD\"}" | jq -er .accessToken)

# create an API key (seed shape: id, name, key, createdAt, expiresAt); the key is in this response only
call "$API/tessera.v1.TokenService/CreateApiKey" -H "authorization: Bearer $TOKEN" \
  -d "{\"name\":\"CI/CD Integration $SUFFIX\",\"expiresAt\":\"2030-01-01T00:00:00Z\"}" > "$SECRETS/api-key.json"
API_KEY=$(jq -er .key "$SECRETS/api-key.json")
call "$API/tessera.v1.UserService/GetCurrentUser" -H "X-API-Key: $API_KEY" -d '{}'

# a personal access token limited to some of your scopes, used as a Bearer token
call "$API/tessera.v1.TokenService/CreatePersonalAccessToken" -H "authorization: Bearer $TOKEN" \
  -d "{\"name\":\"CLI Access $SUFFIX\",\"scopes\":[\"cluster:read\"]}" > "$SECRETS/pat.json"
PAT=$(jq -er .token "$SECRETS/pat.json")
call "$API/tessera.v1.UserService/GetCurrentUser" -H "authorization: Bearer $PAT" -d '{}' \
  | jq -e '.permissions == ["cluster:read"]'

# list (id, name, hint "tsr_pat_…abcd", scopes, createdAt, expiresAt, lastUsedAt; never the secret) and revoke
call "$API/tessera.v1.TokenService/ListPersonalAccessTokens" -H "authorization: Bearer $PAT" -d '{}'
call "$API/tessera.v1.TokenService/RevokeApiKey" -H "authorization: Bearer $TOKEN" \
  -d "{\"id\":\"$(jq -er .id "$SECRETS/api-key.json")\"}"
