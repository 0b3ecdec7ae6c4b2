"""Amazon SNS HTTP(S) deliveries: signature verification, signing certificates, confirmation.

Verification follows AWS's rules exactly:

1. The string to sign is ``Key\\nValue\\n`` for each key, in this order, from the decoded
   JSON: Notification ``Message, MessageId, Subject (if present), Timestamp, TopicArn,
   Type``; SubscriptionConfirmation and UnsubscribeConfirmation ``Message, MessageId,
   SubscribeURL, Timestamp, Token, TopicArn, Type``.
2. ``Signature`` (base64) is RSA PKCS#1 v1.5 over it, with SHA1 when ``SignatureVersion``
   is "1" and SHA256 when it is "2", by the key of the X.509 certificate at
   ``SigningCertURL``.
3. That URL must be https, on a host matching ``^sns\\.[a-z0-9-]+\\.amazonaws\\.com(\\.cn)?$``,
   with a path ending ``.pem``, before anything reads it.

Certificates come from a ``CertStore``. Offline, put each certificate in
``MODELCD_HOOKS_SNS_CERT_DIR`` as ``<sha256 hex of the exact SigningCertURL>.pem``
(``cert_filename(url)`` gives the name), e.g.::

    url=https://sns.us-east-1.amazonaws.com/SimpleNotificationService-xxxx.pem
    curl -fsS "$url" -o "$MODELCD_HOOKS_SNS_CERT_DIR/$(printf %s "$url" | sha256sum | cut -c1-64).pem"

Otherwise the store asks an injected loader, or fetches the (host-checked) URL over https,
and caches the result in memory."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from modelcd.errors import InvalidInput, ModelcdError, Unauthorized
from modelcd.sources.base import env_name, text

SNS_HOST_RE = re.compile(r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")
NOTIFICATION = "Notification"
SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"
MESSAGE_TYPES = (NOTIFICATION, SUBSCRIPTION_CONFIRMATION, UNSUBSCRIBE_CONFIRMATION)
NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_KEYS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
MAX_CERT_BYTES = 64 * 1024
CACHE_MAX = 32


def is_sns_url(url: str, suffix: str = "") -> bool:
    """True if ``url`` is https on an SNS host (default port), its path ending ``suffix``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme == "https" and port in (None, 443) and parts.username is None
            and SNS_HOST_RE.match(parts.hostname or "") is not None and parts.path.endswith(suffix))


def cert_filename(url: str) -> str:
    """The file name a certificate for ``url`` has in the cert dir: sha256 of the URL + .pem."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest() + ".pem"


def fetch_https(url: str, timeout: float = 5.0) -> bytes:
    """GET ``url`` (no redirects), at most MAX_CERT_BYTES; the default certificate fetcher."""
    with requests.get(url, timeout=timeout, allow_redirects=False, stream=True) as r:
        r.raise_for_status()
        data = r.raw.read(MAX_CERT_BYTES + 1, decode_content=True)
    if len(data) > MAX_CERT_BYTES:
        raise ValueError(f"over {MAX_CERT_BYTES} bytes")
    return data


class CertStore:
    """SNS signing certificates by URL: from ``cert_dir`` (files named ``cert_filename(url)``),
    else from ``loader(url) -> PEM bytes``, else fetched with ``fetch_https`` when ``fetch``
    is true. Only URLs that pass ``is_sns_url(url, ".pem")`` are ever looked up. Parsed
    certificates are cached (thread-safe)."""

    def __init__(self, cert_dir: Path | None = None, *, loader: Callable[[str], bytes] | None = None,
                 fetch: bool = True) -> None:
        self.cert_dir = cert_dir
        self.loader = loader if loader is not None else (fetch_https if fetch else None)
        self._cache: dict[str, x509.Certificate] = {}
        self._lock = threading.Lock()

    def certificate(self, url: str) -> x509.Certificate:
        """The certificate at ``url``; Unauthorized if it is not a trusted SNS URL or cannot be had."""
        if not is_sns_url(url, ".pem"):
            raise Unauthorized(f"SigningCertURL {url!r} is not an https://sns.<region>.amazonaws.com/...pem URL; "
                               "the message was not signed by Amazon SNS")
        with self._lock:
            cached = self._cache.get(url)
        if cached is not None:
            return cached
        cert = _parse_pem(self._load(url), url)
        with self._lock:
            if len(self._cache) >= CACHE_MAX:
                self._cache.pop(next(iter(self._cache)))
            self._cache[url] = cert
        return cert

    def _load(self, url: str) -> bytes:
        if self.cert_dir is not None:
            path = self.cert_dir / cert_filename(url)
            if path.is_file():
                return path.read_bytes()
        if self.loader is None:
            where = f"{self.cert_dir}/{cert_filename(url)}" if self.cert_dir else f"{env_name('hooks_sns_cert_dir')}"
            raise Unauthorized(f"no trusted certificate for {url}: download it to {where} "
                               "(named by the sha256 of the URL + .pem)")
        try:
            return self.loader(url)
        except (requests.RequestException, OSError, ValueError) as e:
            raise ModelcdError(f"cannot fetch the SNS signing certificate {url}: {type(e).__name__}; SNS will "
                               f"retry, or place it in {env_name('hooks_sns_cert_dir')}") from e


_shared: dict[Path | None, CertStore] = {}
_shared_lock = threading.Lock()


def shared_cert_store(cert_dir: Path | None) -> CertStore:
    """One fetching ``CertStore`` per cert dir for the whole process, so its cache outlives the
    source objects (the hooks handler builds a source per request)."""
    with _shared_lock:
        store = _shared.get(cert_dir)
        if store is None:
            store = _shared[cert_dir] = CertStore(cert_dir)
        return store


def _parse_pem(data: bytes, url: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise Unauthorized(f"the certificate for {url} is not a PEM X.509 certificate") from None


def string_to_sign(msg: Mapping[str, Any]) -> str:
    """The text SNS signed for ``msg``, by its ``Type``; InvalidInput if a field is missing."""
    kind = msg.get("Type")
    keys = NOTIFICATION_KEYS if kind == NOTIFICATION else CONFIRMATION_KEYS
    parts: list[str] = []
    for key in keys:
        if key == "Subject" and msg.get("Subject") is None:
            continue
        value = msg.get(key)
        if not isinstance(value, str):
            raise InvalidInput(f"SNS message: {key} is missing or not a string", field=key)
        parts.append(f"{key}\n{value}\n")
    return "".join(parts)


def verify_signature(msg: Mapping[str, Any], certs: CertStore, now: float) -> None:
    """Unauthorized unless ``msg`` carries a valid SNS signature by a trusted certificate
    that is valid at ``now``."""
    version = msg.get("SignatureVersion")
    hash_cls = _HASHES.get(version) if isinstance(version, str) else None
    if hash_cls is None:
        raise Unauthorized(f"SNS SignatureVersion {version!r} is not supported (expected \"1\" or \"2\")")
    try:
        signature = base64.b64decode(text(msg, "Signature", "SNS message"), validate=True)
    except (binascii.Error, InvalidInput):
        raise Unauthorized("SNS Signature is missing or not base64") from None
    cert_url = msg.get("SigningCertURL")
    if not isinstance(cert_url, str) or not cert_url:
        raise Unauthorized("SNS SigningCertURL is missing: the message is not signed")
    cert = certs.certificate(cert_url)
    when = datetime.fromtimestamp(now, cert.not_valid_after_utc.tzinfo)
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise Unauthorized(f"the SNS signing certificate is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d}"
                           f" to {cert.not_valid_after_utc:%Y-%m-%d}); refresh {env_name('hooks_sns_cert_dir')}")
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise Unauthorized("the SNS signing certificate does not hold an RSA key")
    try:
        key.verify(signature, string_to_sign(msg).encode("utf-8"), padding.PKCS1v15(), hash_cls())
    except InvalidSignature:
        raise Unauthorized("SNS Signature does not match the message: it was changed on the way or not sent "
                           "by Amazon SNS") from None


def confirm_subscription(subscribe_url: str, timeout: float = 10.0) -> None:
    """GET an SNS ``SubscribeURL`` to confirm a subscription; only an https SNS host is called."""
    if not is_sns_url(subscribe_url):
        host = urlsplit(subscribe_url).hostname
        raise Unauthorized(f"SubscribeURL host {host!r} is not an https Amazon SNS host; not calling it")
    try:
        r = requests.get(subscribe_url, timeout=timeout, allow_redirects=False)
        r.raise_for_status()
    except requests.RequestException as e:
        status = getattr(e.response, "status_code", None)
        raise ModelcdError(f"confirming the SNS subscription failed ({type(e).__name__}"
                           f"{f', HTTP {status}' if status else ''}); SNS resends the confirmation, or "
                           "confirm it in the AWS console") from e
