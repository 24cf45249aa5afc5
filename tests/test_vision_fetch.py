"""vision/fetch.py against a real HTTP server on 127.0.0.1: redirects are followed and checked
like the first URL, bodies over the cap and slow answers are refused, a host resolving to a
private address is refused, and no fetch reads a local path."""
from __future__ import annotations

import http.server
import threading
import time

import pytest

import vision_models as vm
from mistralrs_cli.errors import UserError
from mistralrs_cli.vision import fetch as vf

PNG = vm.odd_images()["wide"]


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        port = self.server.server_address[1]
        if self.path.startswith("/hop"):  # /hopN redirects N more times, then to the image
            n = int(self.path[4:] or 0)
            self.send_response(302)
            self.send_header("Location", f"/hop{n - 1}" if n > 0 else "/img")
        elif self.path == "/to-loopback":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{port}/img")
        elif self.path == "/slow":
            time.sleep(2)
            self.send_response(200)
        elif self.path == "/img":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
            return
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def base():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


LOCAL = vf.FetchPolicy(allow_local=True)


def test_redirects_are_followed_up_to_the_limit(base):
    assert vf.fetch(base + "/hop2", "image_url", LOCAL) == PNG
    with pytest.raises(UserError, match="redirected more than 3 times"):
        vf.fetch(base + "/hop5", "image_url", LOCAL)


def test_a_redirect_to_a_private_address_is_refused(base, monkeypatch):
    """A host that passes (public.test, made to resolve to the test server) redirects to 127.0.0.1."""
    real = vf._address
    monkeypatch.setattr(vf, "_address", lambda host, port, where, policy:
                        "127.0.0.1" if host == "public.test" else real(host, port, where, policy))
    port = base.rsplit(":", 1)[1]
    with pytest.raises(UserError, match="--allow-local-images"):
        vf.fetch(f"http://public.test:{port}/to-loopback", "image_url", vf.FetchPolicy())


def test_size_cap_and_timeout(base):
    with pytest.raises(UserError, match="the limit is 100"):
        vf.fetch(base + "/img", "image_url", vf.FetchPolicy(allow_local=True, max_bytes=100))
    with pytest.raises(UserError, match="timed out"):
        vf.fetch(base + "/slow", "image_url", vf.FetchPolicy(allow_local=True, timeout=0.5))
    with pytest.raises(UserError, match="HTTP 404"):
        vf.fetch(base + "/nothing", "image_url", LOCAL)


@pytest.mark.parametrize("addr", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "fe80::1",
                                  "::ffff:127.0.0.1", "0.0.0.0"])
def test_private_addresses_are_not_public(addr):
    assert not vf._public(addr)


def test_paths_only_where_allowed(tmp_path):
    f = tmp_path / "x.png"
    f.write_bytes(PNG)
    assert vf.load_image(str(f), "--image", vf.FetchPolicy(allow_paths=True)).pil.size == (211, 29)
    with pytest.raises(UserError, match="a local path is not accepted"):
        vf.load_image(str(f), "image_url", vf.FetchPolicy())


def test_data_uris_as_browsers_read_them():
    """The WHATWG forgiving-base64 decode browsers apply to data: URLs: a payload wrapped at 76
    columns (the `base64` tool's output), missing = padding, DATA: in capitals; the bytes are the
    same image as the unwrapped payload decoded by the standard library."""
    import base64
    import hashlib

    data = PNG + b"\0" * ((1 - len(PNG)) % 3)  # a length of 3n + 1: "==" padding (Pillow stops at IEND)
    b64 = base64.b64encode(data).decode()
    assert b64.endswith("=")
    want = hashlib.sha256(base64.b64decode(b64, validate=True)).hexdigest()
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    for uri in ("data:image/png;base64," + wrapped, "DATA:image/png;BASE64," + b64, "data:;base64," + b64.rstrip("=")):
        assert vf.load_image(uri, "image_url", vf.FetchPolicy()).digest == want, uri[:30]
    for bad in ("data:image/png;base64," + b64[:-3] + "%", "data:image/png;base64," + b64 + "A"):
        with pytest.raises(UserError, match="not valid base64"):
            vf.load_image(bad, "image_url", vf.FetchPolicy())


def test_file_urls_where_paths_are_allowed(tmp_path):
    """file:///path (percent-encoded as pathlib writes it) names a local file for the CLI and the
    Python API, as a path does; the server, which reads no local files, still refuses it."""
    f = tmp_path / "my image.png"
    f.write_bytes(PNG)
    url = f.as_uri()  # file:///.../my%20image.png
    assert "%20" in url
    assert vf.load_image(url, "--image", vf.FetchPolicy(allow_paths=True)).pil.size == (211, 29)
    assert vf.load_image(url.replace("file://", "file://localhost"), "--image",
                         vf.FetchPolicy(allow_paths=True)).pil.size == (211, 29)
    with pytest.raises(UserError, match="another host"):
        vf.load_image(url.replace("file://", "file://example.com"), "--image", vf.FetchPolicy(allow_paths=True))
    with pytest.raises(UserError, match="scheme file: is not accepted"):
        vf.load_image(url, "image_url", vf.FetchPolicy())
