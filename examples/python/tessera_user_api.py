"""A small Tessera client for Python (grpcio), in seed 002's shape:

    api = UserAPI(token, host, port, cert_folder)
    if api.is_available():
        print(api.get_user()["username"])

It needs grpcio and protobuf only (Debian: apt-get install python3-grpcio python3-protobuf).
The messages come from the descriptor set @tessera/sdk ships next to its .proto files
(node_modules/@tessera/sdk/proto/tessera.binpb, or TESSERA_DESCRIPTOR_SET): protobuf's
runtime builds the classes from descriptors, so there is no protoc step and no generated
_pb2 code to keep in step with the server (Debian's grpc_tools, 1.14 from 2018, is too old
to trust with today's protos, and PyPI may not be reachable).

Every failed call raises a TesseraClientError subclass carrying the gRPC code, the server's
stable reason (from its google.rpc.ErrorInfo detail) and the request id. No message holds a
credential.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

__all__ = [
    "UserAPI",
    "TesseraClientError",
    "AuthenticationError",
    "TokenExpiredError",
    "PermissionDeniedError",
    "NotFoundError",
    "InvalidArgumentError",
    "AlreadyExistsError",
    "RateLimitedError",
    "MessageTooLargeError",
    "UnavailableError",
    "ClientConfigError",
    "has_scope",
]

DEFAULT_PORT = 50052
DESCRIPTOR_SET = Path("node_modules", "@tessera", "sdk", "proto", "tessera.binpb")
TESSERA_DOMAIN = "tessera.dev"


class TesseraClientError(Exception):
    """A failed call: `code` (grpc.StatusCode), `reason` (e.g. "TOKEN_EXPIRED"), `request_id`,
    `details` (the ErrorInfo metadata but the request id, e.g. required_scopes), and
    `retry_after`, the seconds the server asked to wait (rate limited, or briefly unavailable)."""

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: Optional[str] = None,
        request_id: Optional[str] = None,
        details: Optional[Dict[str, str]] = None,
        retry_after: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.request_id = request_id
        self.details = details or {}
        self.retry_after = retry_after


class AuthenticationError(TesseraClientError):
    """UNAUTHENTICATED: no credential, or one the server does not accept (`reason` says why)."""


class TokenExpiredError(AuthenticationError):
    """UNAUTHENTICATED with reason TOKEN_EXPIRED: refresh the session or log in again."""


class PermissionDeniedError(TesseraClientError):
    """PERMISSION_DENIED: the credential lacks a scope, or its kind of principal is not admitted."""

    @property
    def required_scopes(self) -> List[str]:
        return self.details.get("required_scopes", "").split()


class NotFoundError(TesseraClientError):
    """NOT_FOUND: no such resource, or it belongs to another tenant."""


class InvalidArgumentError(TesseraClientError):
    """INVALID_ARGUMENT: a malformed request; details["field"] may name the field."""


class AlreadyExistsError(TesseraClientError):
    """ALREADY_EXISTS: a resource with that name exists."""


class RateLimitedError(TesseraClientError):
    """RESOURCE_EXHAUSTED: rate limited; wait `retry_after` seconds (None when not sent)."""


class MessageTooLargeError(TesseraClientError):
    """RESOURCE_EXHAUSTED with reason MESSAGE_TOO_LARGE: the request is over the server's size
    limit. Not a rate limit: the same request never passes, so retrying it does not help."""


class UnavailableError(TesseraClientError):
    """UNAVAILABLE: the server cannot be reached (address, TLS handshake, down) or is not ready."""


class ClientConfigError(TesseraClientError):
    """A client-side mistake found before any call: a cert folder without ca.crt, a bad address…"""

    def __init__(self, message: str, path: Optional[str] = None) -> None:
        super().__init__(message, code=grpc.StatusCode.INVALID_ARGUMENT)
        self.path = path


_CLASSES = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def has_scope(granted: List[str], required: str) -> bool:
    """The server's rule: a granted scope covers a required one when equal, `ns:*` for that
    namespace (not the bare `ns`), or `*`."""
    for g in granted:
        if g == "*" or g == required:
            return True
        if g.endswith(":*") and required.startswith(g[:-1]) and required != g[:-2]:
            return True
    return False


def _find_descriptor_set() -> Path:
    explicit = os.environ.get("TESSERA_DESCRIPTOR_SET")
    if explicit:
        return Path(explicit)
    # Like Node's module resolution: node_modules/@tessera/sdk in this folder or any above it.
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            if (folder / DESCRIPTOR_SET).is_file():
                return folder / DESCRIPTOR_SET
    raise ClientConfigError(
        "no Tessera descriptor set: install @tessera/sdk (it ships proto/tessera.binpb) "
        "or set TESSERA_DESCRIPTOR_SET to the file"
    )


class _Protos:
    """The message classes and method paths of one descriptor set (loaded once per file)."""

    loaded: Dict[Path, "_Protos"] = {}

    @classmethod
    def load(cls, path: Path) -> "_Protos":
        key = path.resolve()
        if key not in cls.loaded:
            cls.loaded[key] = cls(path)
        return cls.loaded[key]

    def __init__(self, path: Path) -> None:
        try:
            files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
        except OSError as err:
            raise ClientConfigError(f"cannot read descriptor set {path}: {err.strerror}", str(path)) from None
        # A pool of its own: the well-known types in the set would clash with the default pool's.
        self.pool = descriptor_pool.DescriptorPool()
        for f in files.file:  # buf writes them in dependency order
            self.pool.Add(f)
        self._classes: Dict[str, Any] = {}
        # protobuf >= 4.22 has GetMessageClass; before it, one factory per pool (Debian 12 has 4.21).
        self._get = getattr(message_factory, "GetMessageClass", None)
        if self._get is None:
            self._get = message_factory.MessageFactory(self.pool).GetPrototype

    def message(self, full_name: str) -> Any:
        cls = self._classes.get(full_name)
        if cls is None:
            cls = self._get(self.pool.FindMessageTypeByName(full_name))
            self._classes[full_name] = cls
        return cls

    def method(self, service: str, name: str) -> Any:
        return self.pool.FindServiceByName(service).FindMethodByName(name)


def _to_dict(msg: Any) -> Dict[str, Any]:
    # snake_case keys as in the protos, and empty fields present (tenant_id "", permissions []).
    try:
        return json_format.MessageToDict(
            msg, preserving_proto_field_name=True, including_default_value_fields=True
        )
    except TypeError:  # protobuf >= 26 renamed the option
        return json_format.MessageToDict(
            msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )


def _check_token(token: Optional[str], what: str) -> None:
    if token is not None and (not token or any(c.isspace() or not c.isprintable() for c in token)):
        raise ClientConfigError(f"the {what} is empty or has whitespace or control characters")


class UserAPI:
    """A connection to a Tessera server over TLS (mutual TLS when the cert folder has a client
    certificate) holding a token: an access token from login(), a personal access token, an
    API key or a machine user's token.

    cert_folder: ca.crt verifies the server; client.crt and client.key, when both are there,
    are presented for mutual TLS. Without it the system's roots verify the server. The server
    certificate is always verified: verify_ssl=False is refused (grpcio has no way to skip it).
    """

    def __init__(
        self,
        token: Optional[str] = None,
        host: str = "localhost",
        port: int = DEFAULT_PORT,
        cert_folder: Optional[str] = None,
        *,
        verify_ssl: bool = True,
        refresh_token: Optional[str] = None,
        descriptor_set: Optional[str] = None,
        timeout: float = 30.0,
    ) -> None:
        if not host or any(c.isspace() or c == "/" for c in host):
            raise ClientConfigError(f'invalid host "{host}"')
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ClientConfigError(f"invalid port {port!r}")
        if not verify_ssl:
            raise ClientConfigError(
                "verify_ssl=False is not supported: put the server's CA in the cert folder as ca.crt"
            )
        _check_token(token, "token")
        _check_token(refresh_token, "refresh token")
        self.host = host
        self.port = port
        self.cert_folder = cert_folder
        self.token = token
        # Refresh tokens are single-use: each refresh_token() call replaces this one.
        self.session_refresh_token = refresh_token
        self.timeout = timeout
        self._protos = _Protos.load(Path(descriptor_set) if descriptor_set else _find_descriptor_set())
        self._channel = grpc.secure_channel(f"{host}:{port}", self._credentials(cert_folder))

    @classmethod
    def from_environment(cls, token: Optional[str] = None, **options: Any) -> "UserAPI":
        """TESSERA_SERVER (host:port, default localhost:50052), TESSERA_CERT_FOLDER and
        TESSERA_TOKEN, as the CLI and the Node SDK read them; arguments win."""
        server = os.environ.get("TESSERA_SERVER") or f"localhost:{DEFAULT_PORT}"
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            raise ClientConfigError(f'TESSERA_SERVER "{server}" is not host:port')
        options.setdefault("cert_folder", os.environ.get("TESSERA_CERT_FOLDER") or None)
        return cls(token or os.environ.get("TESSERA_TOKEN") or None, host.strip("[]"), int(port), **options)

    @staticmethod
    def _credentials(cert_folder: Optional[str]) -> grpc.ChannelCredentials:
        if cert_folder is None:
            return grpc.ssl_channel_credentials()
        folder = Path(cert_folder)
        if not folder.is_dir():
            raise ClientConfigError(f"cert folder {folder} does not exist", str(folder))

        def read(name: str) -> bytes:
            try:
                return (folder / name).read_bytes()
            except OSError as err:
                raise ClientConfigError(f"cannot read {folder / name}: {err.strerror}", str(folder / name)) from None

        ca = read("ca.crt")
        has_cert, has_key = (folder / "client.crt").exists(), (folder / "client.key").exists()
        if has_cert != has_key:
            missing = folder / ("client.key" if has_cert else "client.crt")
            raise ClientConfigError(f"{missing} is missing: mutual TLS needs client.crt and client.key", str(missing))
        if has_cert:
            return grpc.ssl_channel_credentials(ca, read("client.key"), read("client.crt"))
        return grpc.ssl_channel_credentials(ca)

    def call(
        self,
        service: str,
        method: str,
        request: Optional[Dict[str, Any]] = None,
        *,
        token: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Dict[str, Any]:
        """Any RPC of the descriptor set, e.g. call("tessera.v1.TenantService", "CreateTenant",
        {"name": "acme"}): the request and the answer as dicts in the protos' field names."""
        desc = self._protos.method(service, method)
        request_cls = self._protos.message(desc.input_type.full_name)
        response_cls = self._protos.message(desc.output_type.full_name)
        rpc = self._channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        message = json_format.ParseDict(request or {}, request_cls(), descriptor_pool=self._protos.pool)
        bearer = self.token if token is None else token
        metadata = [("authorization", f"Bearer {bearer}")] if bearer else []
        try:
            response = rpc(message, metadata=metadata, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise self._error(err) from None
        return _to_dict(response)

    def _error(self, err: Any) -> TesseraClientError:
        code: grpc.StatusCode = err.code()
        reason, request_id, details = None, None, {}
        retry_after: Optional[int] = None
        pairs = list(err.initial_metadata() or ()) + list(err.trailing_metadata() or ())
        for key, value in pairs:
            if key == "grpc-status-details-bin":
                status = self._protos.message("google.rpc.Status").FromString(value)
                info_cls = self._protos.message("google.rpc.ErrorInfo")
                for any_detail in status.details:
                    if any_detail.type_url.endswith("/google.rpc.ErrorInfo"):
                        info = info_cls.FromString(any_detail.value)
                        if info.domain == TESSERA_DOMAIN:
                            reason = info.reason or None
                            details = dict(info.metadata)
                            request_id = details.pop("request_id", None) or None
            elif key == "x-request-id" and request_id is None:
                request_id = value
            elif key == "retry-after" and str(value).strip().isdigit():
                retry_after = int(value)
        if code == grpc.StatusCode.UNAUTHENTICATED and reason == "TOKEN_EXPIRED":
            cls = TokenExpiredError
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "MESSAGE_TOO_LARGE":
            cls = MessageTooLargeError
        else:
            cls = _CLASSES.get(code, TesseraClientError)
        # The server's message never holds a credential; grpcio's own (a failed connection) neither.
        message = err.details() or code.name
        return cls(message, code, reason, request_id, details, retry_after)

    def is_available(self, timeout: float = 5.0) -> bool:
        """Whether the server answers its health check as SERVING. Never raises."""
        try:
            answer = self.call("grpc.health.v1.Health", "Check", {"service": ""}, timeout=timeout)
        except TesseraClientError:
            return False
        return answer.get("status") == "SERVING"

    def get_user(self) -> Dict[str, Any]:
        """Who the token belongs to: id, username, tenant_id, permissions (the effective scopes),
        created_at, and client_certificate when the connection presented one."""
        return self.call("tessera.v1.UserService", "GetCurrentUser")

    def has_permission(self, scope: str) -> bool:
        """Whether the caller's permissions cover `scope`, with the server's wildcards (ns:*, *)."""
        return has_scope(self.get_user()["permissions"], scope)

    def login(self, username: str, password: str, tenant: Optional[str] = None) -> Dict[str, Any]:
        """Open a session (the user's tenant by name or id, else the default tenant's user); the
        client then uses its access token. Returns access_token, refresh_token, their expiries
        and the user."""
        answer = self.call(
            "tessera.v1.UserService",
            "Login",
            {"username": username, "password": password, "tenant": tenant or ""},
        )
        self.token = answer["access_token"]
        self.session_refresh_token = answer["refresh_token"]
        return answer

    def refresh_token(self, refresh_token: Optional[str] = None) -> str:
        """Spend a refresh token (default: the session's) for a new pair; the client then uses
        it. Returns the new access token; the new refresh token is session_refresh_token."""
        spent = refresh_token or self.session_refresh_token
        if not spent:
            raise ClientConfigError("no refresh token: log in first, or pass one")
        _check_token(spent, "refresh token")
        answer = self.call("tessera.v1.UserService", "RefreshToken", {"refresh_token": spent}, token="")
        self.token = answer["access_token"]
        self.session_refresh_token = answer["refresh_token"]
        return self.token

    def logout(self) -> None:
        """End the session (its refresh tokens and every access token issued to it)."""
        if self.session_refresh_token:
            self.call("tessera.v1.UserService", "Logout", {"refresh_token": self.session_refresh_token})
        self.token = self.session_refresh_token = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "UserAPI":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
