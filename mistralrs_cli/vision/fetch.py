"""Images named by URL: data: URIs, http(s) fetched safely, and (CLI / Python API only) paths.

The server fetches for its clients, so a URL must not reach what the server can reach and the
client cannot (SSRF): only http and https, every address the host resolves to must be public
(no loopback, private, link-local, multicast or reserved ranges) unless --allow-local-images,
the connection goes to the address that was checked (no second DNS lookup to rebind), redirects
are checked the same way, the body is capped and the whole fetch has a timeout."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

from ..errors import UserError
from .images import Image, decode, from_data_uri, from_path


@dataclass(frozen=True)
class FetchPolicy:
    allow_paths: bool = False  # local files: the CLI and the Python API, never the server
    allow_local: bool = False  # --allow-local-images: loopback / private addresses too
    max_bytes: int = 20 << 20
    timeout: float = 10.0
    max_redirects: int = 3


def load_image(ref: str, where: str, policy: FetchPolicy) -> Image:
    """A data: URI, an http(s) URL, or (when the policy allows) a local path -> Image."""
    if not isinstance(ref, str) or not ref:
        raise UserError(f"{where}: an image must be a data: URI or an http(s) URL.")
    scheme = urlsplit(ref).scheme.lower() if "://" in ref or ref[:5].lower() == "data:" else ""
    if scheme == "data":
        return from_data_uri(ref, where)
    if scheme in ("http", "https"):
        return decode(fetch(ref, where, policy), f"{where} ({_short(ref)})")
    if scheme == "" and policy.allow_paths:
        return from_path(ref, where)
    if scheme == "file" and policy.allow_paths:  # file:///path (or file://localhost/path), percent-decoded
        parts = urlsplit(ref)
        if parts.netloc.lower() in ("", "localhost"):
            return from_path(url2pathname(parts.path), where)
        raise UserError(f"{where}: {_short(ref)} names a file on another host; give a local path or file:///path.")
    what = f"scheme {scheme}:" if scheme else "a local path"
    path = "a file path, " if policy.allow_paths else ""
    raise UserError(f"{where}: {what} is not accepted; send the image as {path}a data: URI "
                    "(data:image/png;base64,...) or an http(s) URL.")


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."


def _public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _address(host: str, port: int, where: str, policy: FetchPolicy) -> str:
    """The address to connect to; every address the name resolves to must pass."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UserError(f"{where}: cannot resolve the image host {host}.") from None
    addrs = [info[4][0] for info in infos]
    if not policy.allow_local and not all(_public(a) for a in addrs):
        raise UserError(f"{where}: the image host {host} resolves to a local or private address; the server "
                        "fetches public addresses only (start it with --allow-local-images to allow them).")
    return addrs[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with the certificate checked against the host name."""

    def __init__(self, host: str, addr: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.addr = addr

    def connect(self) -> None:
        sock = socket.create_connection((self.addr, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _get(url: str, where: str, policy: FetchPolicy, deadline: float) -> tuple[int, str | None, bytes]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{where}: the image URL {_short(url)} is not an http(s) URL.")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addr = _address(parts.hostname, port, where, policy)
    timeout = max(0.1, deadline - time.monotonic())
    conn = (_PinnedHTTPS(parts.hostname, addr, port, timeout) if parts.scheme == "https"
            else http.client.HTTPConnection(addr, port, timeout=timeout))
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers={"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*",
                                           "User-Agent": "mistralrs-cli"})
        resp = conn.getresponse()
        if resp.status in (301, 302, 303, 307, 308):
            return resp.status, resp.getheader("Location"), b""
        size = resp.getheader("Content-Length")
        if size is not None and size.isdigit() and int(size) > policy.max_bytes:
            raise UserError(f"{where}: the image at {_short(url)} is {size} bytes; the limit is {policy.max_bytes}.")
        data = resp.read(policy.max_bytes + 1)
        if len(data) > policy.max_bytes:
            raise UserError(f"{where}: the image at {_short(url)} is over the {policy.max_bytes}-byte limit.")
        if time.monotonic() > deadline:
            raise TimeoutError
        return resp.status, None, data
    except (OSError, http.client.HTTPException) as e:
        why = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
        raise UserError(f"{where}: fetching the image at {_short(url)} failed ({why}).") from None
    finally:
        conn.close()


def fetch(url: str, where: str, policy: FetchPolicy) -> bytes:
    """The body of a 200 answer at `url`, following up to max_redirects checked redirects."""
    deadline = time.monotonic() + policy.timeout
    for _ in range(policy.max_redirects + 1):
        status, location, data = _get(url, where, policy, deadline)
        if location is None:
            if status != 200:
                raise UserError(f"{where}: the image URL {_short(url)} answered HTTP {status}.")
            return data
        url = urljoin(url, location)
    raise UserError(f"{where}: the image URL redirected more than {policy.max_redirects} times.")
