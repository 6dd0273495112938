"""The service under abuse, on loopback: huge, slow and vanishing bodies, half-open connections."""

from __future__ import annotations

import re
import select
import socket
import time

import httpx
import pytest
from serve_helpers import Server, free_port

from fedad.serve import main

# Half a request head: what a client that takes a connection and sends no more sends.
HALF_HEAD = b"POST /score HTTP/1.1\r\nHost: test\r\nContent-"
HEAD = b"POST /score HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
# Every wait below is a bound for failure, never a timing to meet.
PATIENCE = 30.0


@pytest.fixture(scope="module")
def strict(detector_folder):
    """One worker with small limits: 100 KB bodies, 2 s to send a head or a body."""
    running = Server(
        detector_folder,
        *("--max-body-mb", "0.1", "--body-timeout", "2", "--head-timeout", "2"),
    )
    yield running
    running.close()


@pytest.fixture(scope="module")
def crowded(detector_folder):
    """At most 32 connections, patient with heads (60 s)."""
    running = Server(detector_folder, *("--max-connections", "32", "--head-timeout", "60"))
    yield running
    running.close()


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\0" * 8)
    return sock


def closed(sock: socket.socket) -> bool:
    """Whether the service closed ``sock`` (waiting up to PATIENCE for it)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def answer_of(sock: socket.socket) -> tuple[int, str, str]:
    """The status, head and body of the answer on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data and (part := sock.recv(65536)):
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), data[:200]
    length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    while length and len(body) < int(length.group(1)) and (part := sock.recv(65536)):
        body += part
    return int(head.split()[1]), head.decode().lower(), body.decode()


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(strict):
    with connect(strict) as sock:
        sock.sendall(HEAD + b"Content-Length: 1000000000\r\n\r\n")
        status, head, body = answer_of(sock)
    assert status == 413 and "over 100000 bytes (--max-body-mb)" in body
    assert "connection: close" in head


def test_a_chunked_body_over_the_limit_is_cut_at_the_limit(strict):
    """The answer comes while the client still sends: the service read no further."""
    chunk = b"x" * 2**16
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    planned, sent, status = 200 * 2**20, 0, 413
    with connect(strict) as sock:
        sock.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < planned and not select.select([sock], [], [], 0)[0]:
                sock.sendall(framed)
                sent += len(chunk)
            status = answer_of(sock)[0]
        except OSError:  # closed after its answer, which this client could not read first
            pass
    assert sent < planned / 4 and status == 413


def test_a_body_too_slow_to_arrive_gets_408(strict):
    with connect(strict) as sock:
        sock.sendall(HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"records": ')
        status, _, body = answer_of(sock)
    assert status == 408 and "--body-timeout" in body


def test_a_half_sent_head_is_closed_after_the_head_timeout(strict):
    with connect(strict) as sock:
        sock.sendall(HALF_HEAD)
        assert closed(sock)


def test_a_head_that_never_ends_is_cut(strict):
    line = b"X-Filler: " + b"y" * 1000 + b"\r\n"
    planned, sent = 10 * 2**20, 0
    with connect(strict) as sock:
        sock.sendall(HALF_HEAD[:-8])
        try:
            while sent < planned:
                sock.sendall(line)
                sent += len(line)
            assert closed(sock)
        except OSError:  # closed while this client still sent
            pass
    assert sent < planned


def test_a_client_gone_mid_body_is_one_line_not_a_traceback(strict):
    with connect(strict) as sock:
        sock.sendall(HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"records": [')
        time.sleep(0.2)  # the service starts reading the body
    deadline = time.monotonic() + PATIENCE
    while "went away" not in strict.stderr and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = [line for line in strict.stderr.splitlines() if "went away" in line]
    assert len(gone) == 1 and gone[0].startswith("fedad: INFO: a client (127.0.0.1:")
    assert "Traceback" not in strict.stderr
    assert httpx.get(f"{strict.url}/health", timeout=PATIENCE).status_code == 200


def test_health_answers_while_hundreds_of_connections_hold_half_a_head(crowded):
    held = []
    try:
        for _ in range(200):
            sock = connect(crowded)
            sock.sendall(HALF_HEAD)
            held.append(sock)
        answer = httpx.get(f"{crowded.url}/health", timeout=PATIENCE)
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
        # Past 32, the oldest held connections were closed to make room.
        assert all(closed(sock) for sock in held[:100])
        assert not select.select([held[-1]], [], [], 0.2)[0]  # the newest is still held
    finally:
        for sock in held:
            sock.close()
    assert httpx.get(f"{crowded.url}/schema", timeout=PATIENCE).status_code == 200


@pytest.mark.long
def test_two_workers_score_and_stop_cleanly(detector_folder):
    running = Server(detector_folder, "--workers", "2")
    try:
        rows = httpx.get(f"{running.url}/schema", timeout=PATIENCE).json()["features"]
        assert rows and "2 worker(s)" in running.stderr
        assert running.interrupt() == 0, running.stderr[-3000:]
        assert "Traceback" not in running.stderr
    finally:
        running.close()


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("--port", "0"), "--port must be a port number from 1 to 65535, got 0"),
        (("--port", "65536"), "--port must be a port number from 1 to 65535, got 65536"),
        (("--port", "-80"), "got -80"),
        (("--workers", "0"), "--workers must be at least 1"),
        (("--max-connections", "0"), "--max-connections must be at least 1"),
        (("--max-body-mb", "0"), "--max-body-mb must be a positive number"),
        (("--head-timeout", "nan"), "--head-timeout must be a positive number"),
        (("--body-timeout", "-1"), "--body-timeout must be a positive number"),
    ],
    ids=["port 0", "port 65536", "negative port", "workers", "connections", "body", "nan", "-1"],
)
def test_bad_ports_and_limits_exit_2_with_one_paragraph(detector_folder, capsys, flags, says):
    with pytest.raises(SystemExit) as done:
        main([str(detector_folder), *flags])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.startswith("fedad: error: ") and err.count("fedad:") == 1
    assert says in " ".join(err.split())


def test_a_port_in_use_exits_2_naming_it(detector_folder, capsys):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(SystemExit) as done:
            main([str(detector_folder), "--port", str(port)])
    assert done.value.code == 2
    assert f"Cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
