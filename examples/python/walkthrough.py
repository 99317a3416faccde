# The README's Python (grpcio) walkthrough, run as written by test/sdk-package.test.ts.
# Run it with the Debian packages (apt-get install python3-grpcio python3-protobuf) from a
# project where @tessera/sdk is installed, beside tessera_user_api.py:
#   /usr/bin/python3 walkthrough.py
import os
import sys
import time
from pathlib import Path

from tessera_user_api import AuthenticationError, PermissionDeniedError, UserAPI

password = os.environ.get("TESSERA_ADMIN_PASSWORD")
if not password:
    sys.exit("set TESSERA_ADMIN_PASSWORD to the admin password printed at first start")
suffix = os.environ.get("SUFFIX") or f"{int(time.time() * 1000)}-{os.getpid()}"
secrets = Path(os.environ.get("TESSERA_SECRETS_DIR") or Path(__file__).resolve().parent.parent / ".secrets", suffix)
secrets.mkdir(mode=0o700, parents=True, exist_ok=True)

# 1. the admin logs in; from_environment() is UserAPI(token, host, port, cert_folder) with
#    TESSERA_SERVER (host:port) and TESSERA_CERT_FOLDER (ca.crt, and client.crt + client.key for mTLS)
admin = UserAPI.from_environment()
if not admin.is_available():
    sys.exit("Tessera is not serving")
admin.login("admin", password)
print("logged in as", admin.get_user()["username"])

# 2. a tenant, and a user in it who may only read clusters (any RPC: call(service, method, request))
tenant = admin.call("tessera.v1.TenantService", "CreateTenant", {"name": f"python-{suffix}"})["tenant"]
reader_user = {"username": "reader", "password": "a long reader password", "scopes": ["cluster:read"]}
admin.call("tessera.v1.UserService", "CreateUser", {**reader_user, "tenant_id": tenant["id"]})

# 3. the user logs in (naming its tenant) and keeps a personal access token: shown once, kept mode 0600
reader = UserAPI.from_environment()
reader.login("reader", "a long reader password", tenant=tenant["name"])
print("reader may read clusters:", reader.has_permission("cluster:read"))
pat = reader.call("tessera.v1.TokenService", "CreatePersonalAccessToken", {"name": "CI", "scopes": ["cluster:read"]})
with open(os.open(secrets / "reader-pat.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
    f.write(pat["token"])

# 4. typed errors: the reader may not list users
try:
    reader.call("tessera.v1.UserService", "ListUsers")
    sys.exit("the reader listed users")
except PermissionDeniedError as err:
    print("denied:", err.reason, "needs", " ".join(err.required_scopes))

# 5. the token alone is a credential: seed 002's UserAPI(token, host, port, cert_folder)
ci = UserAPI(pat["token"], admin.host, admin.port, admin.cert_folder)
print("the token belongs to", ci.get_user()["username"])

# 6. refresh tokens are single-use: spending one twice ends the session
spent = reader.session_refresh_token
reader.refresh_token()
print("refreshed, still", reader.get_user()["username"])
try:
    reader.refresh_token(spent)
    sys.exit("a spent refresh token was accepted")
except AuthenticationError as err:
    print("refresh token reused:", err.reason)
try:
    reader.get_user()
    sys.exit("the session outlived the reuse")
except AuthenticationError as err:
    print("then the session is over:", err.reason)

for api in (admin, reader, ci):
    api.close()
print("walkthrough done")
