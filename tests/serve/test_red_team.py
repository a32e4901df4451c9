"""The red team's cases against a real server: hostile bodies and image paths get a 4xx that shows no server path,
a pixel bomb is refused from its header (the server's memory does not grow by its decoded size), and limits that
would admit nothing stop the server from starting (one line, exit 2)."""

import base64
import struct
import subprocess
import sys
import threading
import zlib

import pytest

from .conftest import MODEL, REPOSITORY, data_url, post

BOMB_SIDE = 13000  # 169 megapixels: under Pillow's own bomb limit, ~507 MB once decoded as RGB


def png_of_zeros(width: int, height: int) -> bytes:
    """A valid RGB PNG of black pixels, compressed row by row (the decoded image is never held here)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row, parts = zlib.compressobj(9), b"\0" * (1 + 3 * width), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmHWM")


@pytest.mark.slow
def test_a_pixel_bomb_is_refused_from_its_header(start_server):
    bomb = png_of_zeros(BOMB_SIDE, BOMB_SIDE)
    assert len(bomb) < 2**20
    server = start_server()
    assert post(server, {"model": MODEL, "input": "warm up"}).status_code == 200
    before = peak_rss_mb(server.process.pid)
    answers = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(post(server, {"model": MODEL, "input": [{"image": data_url(bomb)}]}))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for answer in answers:
        assert answer.status_code == 413, answer.text
        assert (
            f"input[0]: an image of {BOMB_SIDE} x {BOMB_SIDE} = {BOMB_SIDE**2} pixels, over the server's limit "
            "of 32000000 (--max-image-pixels)"
        ) in answer.json()["error"]["message"]
    grown = peak_rss_mb(server.process.pid) - before
    assert grown < 300, f"the server's peak memory grew by {grown:.0f} MB on three refused images"
    assert post(server, {"model": MODEL, "input": "still fine"}).status_code == 200


def test_hostile_image_paths_get_a_4xx_without_the_servers_paths(server):
    (server.images / "loop-a").symlink_to(server.images / "loop-b")
    (server.images / "loop-b").symlink_to(server.images / "loop-a")
    cases = [
        ("bad\0name.png", "not a valid image path (it holds a NUL byte)"),
        ("x" * 8000 + ".png", "not an image path (8004 characters, over 1024)"),
        ("a/" * 300 + "b.png", "image file not found under the server's --image-root"),
        ("d" * 300 + ".png", "cannot be read (a name too long)"),
        ("loop-a", "cannot be read (a symbolic link loop)"),
    ]
    for path, message in cases:
        response = post(server, {"model": MODEL, "input": ["ok", {"image": path}]})
        assert response.status_code == 400, (path[:40], response.text)
        error = response.json()["error"]["message"]
        assert error.startswith("input[1]: ") and message in error, error
        assert str(server.images.parent) not in error and "/tmp" not in error, error


def test_json_nested_100k_deep_is_a_400(server):
    response = post(server, b'{"model": "' + MODEL.encode() + b'", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert response.status_code == 400, response.text
    assert "nested too deep" in response.json()["error"]["message"]


def test_an_undecodable_image_names_its_input_not_a_python_object(server):
    response = post(server, {"model": MODEL, "input": ["ok", "ok", {"image": data_url(b"\x89PNG but not really")}]})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message == "input[2]: cannot decode image bytes: not an image format Pillow reads", message
    assert "BytesIO" not in message and "0x" not in message


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-queue", "0", "--max-queue 0: must be at least 1"),
        ("--max-body-mb", "0", "--max-body-mb 0: must be above 0"),
        ("--request-timeout", "0", "--request-timeout 0: must be above 0"),
        ("--image-root", "no-such-folder", "--image-root no-such-folder: no such folder"),
        ("--port", "99999", "--port 99999: a TCP port is 0..65535"),
        ("--max-image-pixels", "0", "--max-image-pixels 0: must be at least 1"),
    ],
)
def test_limits_that_admit_nothing_stop_the_start(checkpoint, flag, value, message):
    run = subprocess.run(
        [sys.executable, "-m", "moca_fast.cli", "serve", "--model", str(checkpoint), flag, value],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPOSITORY,
    )
    assert run.returncode == 2 and run.stdout == "", run
    assert run.stderr.splitlines() == [
        f"moca-fast serve: error: {message} (the server would admit nothing)"
        if "must be" in message
        else f"moca-fast serve: error: {message}"
    ], run.stderr


def test_base64_is_never_guessed_from_an_image_string(server, pngs):
    """Without a data URL's header a string is a path, never base64 data (a file named in base64 is read: see
    test_server); bare image data is refused with the way to send it."""
    response = post(server, {"model": MODEL, "input": [{"image": base64.b64encode(pngs[3]).decode()}]})
    assert response.status_code == 400
    assert "image data goes in a data URL (data:<type>;base64,<data>)" in response.json()["error"]["message"]
