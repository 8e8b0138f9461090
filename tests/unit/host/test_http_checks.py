"""The `http_checks` as the control node asks them (tasks/host/stack_health.py `ask`), against a local HTTP server:
only the URL's own answer counts; a redirect is never followed (it would send the control node to any address the
service names, and let a broken service pass by pointing at one that answers 2xx)."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.host.stack_health import ask, problem_of


@pytest.fixture
def server():
    """A service whose /health answers with the status its path names, and its requests, as paths."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            status, _, location = self.path.strip("/").partition("/to/")
            self.send_response(int(status) if status.isdigit() else 200)
            if location:
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/{location}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", asked
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_fails_the_check_naming_where_it_pointed_and_is_never_followed(server, status):
    base, asked = server
    problem = ask(f"{base}/{status}/to/admin/delete-all", time.monotonic() + 1)
    assert problem == (f"HTTP {status}: redirected to {base}/admin/delete-all "
                       "(not followed: a check passes on a 2xx answer only)")
    assert "/admin/delete-all" not in asked and asked[0] == f"/{status}/to/admin/delete-all"


def test_a_2xx_passes_and_a_5xx_fails(server):
    base, _ = server
    assert ask(f"{base}/204", time.monotonic() + 1) == ""
    assert ask(f"{base}/503", time.monotonic() + 1) == "HTTP 503"


def test_a_location_header_is_shown_with_control_characters_escaped():
    assert problem_of(302, "http://x/\x1b[2J") == (r"HTTP 302: redirected to http://x/\x1b[2J "
                                                  "(not followed: a check passes on a 2xx answer only)")
    assert problem_of(302, None).startswith("HTTP 302: redirected to nowhere")
