"""One HTTP POST for the judge: never redirected, bounded in time and in size.

Why not urllib's `urlopen`: its opener follows a 301/302/303 to any host and port, turning the POST into
a GET and re-sending every header, `Authorization` included, so an answer from elsewhere is stored as a
score and the API key goes with it; its timeout bounds each socket operation, so a server that sends one
byte a second holds a request as long as it likes; `read()` takes a body of any size into memory.

Here, on one `http.client` connection:
  - a 3xx reply is returned as it is (status and `Location`), never followed: the caller reports it;
  - `timeout` bounds the whole request, connect to last byte: connect is given the timeout itself, and a
    timer shuts the socket down at the deadline, which ends whatever read or write is blocked (a slow
    status line, slow headers or a slow body alike);
  - the body is read in 64 KiB chunks and given up once it passes `max_bytes` (a Content-Length above
    it is refused before reading anything); of an error's body only the first 8 KiB are read.
The proxy environment variables (`https_proxy`, `http_proxy`, `no_proxy`) are honoured as urllib does:
plain HTTP goes through the proxy with the absolute URL, HTTPS through a CONNECT tunnel.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass

CHUNK = 64 << 10
ERROR_EXCERPT = 8 << 10


class ReplyTooLarge(Exception):
    """The body passed `max_bytes`."""


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def _connection(
    url: urllib.parse.SplitResult, timeout: float
) -> tuple[http.client.HTTPConnection, str, dict]:
    """The connection to open, the request target on it (a path, or the whole URL through a plain-HTTP
    proxy) and the headers for that proxy."""
    https = url.scheme == "https"
    port = url.port or (443 if https else 80)
    path = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))
    proxy = urllib.request.getproxies().get(url.scheme)
    if not proxy or urllib.request.proxy_bypass(url.hostname or ""):
        cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
        kwargs = {"context": ssl.create_default_context()} if https else {}
        return cls(url.hostname, port, timeout=timeout, **kwargs), path, {}
    p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    auth = {}
    if p.username is not None:
        token = base64.b64encode(
            f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}".encode()
        )
        auth = {"Proxy-Authorization": "Basic " + token.decode()}
    if https:
        conn = http.client.HTTPSConnection(
            p.hostname, p.port or 80, timeout=timeout, context=ssl.create_default_context()
        )
        conn.set_tunnel(url.hostname, port, headers=auth)  # the proxy's credentials stay with the proxy
        return conn, path, {}
    return (
        http.client.HTTPConnection(p.hostname, p.port or 80, timeout=timeout),
        urllib.parse.urlunsplit(url),
        auth,
    )


def post(url: str, body: bytes, headers: dict[str, str], timeout: float, max_bytes: int) -> Reply:
    """POST `body` to `url`; raises TimeoutError past `timeout` s in all, ReplyTooLarge past `max_bytes`,
    OSError / http.client.HTTPException for failed connections. Any status (3xx included) is returned."""
    conn, target, proxy_headers = _connection(urllib.parse.urlsplit(url), timeout)
    cut = threading.Event()
    opened: list[socket.socket] = []  # the connection's socket: http.client drops its own reference to it
    # once a reply says the connection will close (it lives on in the reply's file), so keep one here

    def shut_down():
        cut.set()
        for sock in opened:
            try:  # the plain socket's shutdown (not SSL's): it wakes a read blocked in another thread
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout, shut_down)
    timer.daemon = True
    timer.start()
    resp = None
    try:
        conn.connect()
        opened.append(conn.sock)
        if cut.is_set():  # the timer fired while connecting, before there was a socket to shut
            raise TimeoutError
        conn.request("POST", target, body, {**headers, **proxy_headers})
        resp = conn.getresponse()
        # An error's or a redirect's body is only quoted in a message: its start is enough.
        data = _read_capped(resp, max_bytes) if resp.status < 300 else resp.read(ERROR_EXCERPT)
        if cut.is_set():  # a shut socket reads as the end of the body: that body is cut short
            raise TimeoutError
        return Reply(resp.status, resp.headers, data)
    except (OSError, http.client.HTTPException):
        if cut.is_set():
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()
        if resp is not None:
            resp.close()  # the socket itself, when the reply owns it (a connection that closes after it)
        conn.close()


def _read_capped(resp: http.client.HTTPResponse, max_bytes: int) -> bytes:
    length = resp.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise ReplyTooLarge(max_bytes)
    chunks, total = [], 0
    while chunk := resp.read(CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise ReplyTooLarge(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)
