"""bench.server.Server: a start that hangs is stopped, put on record and tried once more on a
fresh port; a start that fails is reported with the log's tail. The "server" here is a small
script, because what is under test is the starting and stopping, not SGLang."""

from __future__ import annotations

import sys
import textwrap

import pytest
import requests

from bench.server import Server

# Hangs (never answers) on its first run, serves /health on its second. Arguments as the real
# launcher gets them: ... --host H --port P.
SCRIPT = textwrap.dedent("""
    import http.server, pathlib, sys, time
    marker = pathlib.Path(sys.argv[1])
    print("starting", flush=True)
    if not marker.exists():
        marker.write_text("hung once")
        print("hanging", flush=True)
        time.sleep(3600)
    if sys.argv[2] == "fail":
        sys.exit("cannot load the model")

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

    http.server.HTTPServer(("127.0.0.1", int(sys.argv[-1])), Health).serve_forever()
""")


def _launcher(tmp_path):
    (tmp_path / "serve.py").write_text(SCRIPT)
    return (sys.executable, str(tmp_path / "serve.py"), str(tmp_path / "marker"))


def test_a_hung_start_is_retried_once_on_a_fresh_port(tmp_path, capsys, recwarn):
    server = Server(["ok"], tmp_path / "server.log", start_timeout=5, launcher=_launcher(tmp_path))
    first_port = server.port
    with server as url:
        assert requests.get(url + "/health", timeout=5).status_code == 200
        assert server.port != first_port
    hung = (tmp_path / "server.log").read_text()
    assert "hanging" in hung
    assert "did not start in 5 s" in capsys.readouterr().err
    assert any("hanging" in str(w.message) for w in recwarn)  # in pytest's warnings summary
    assert server.log_path.name == "server.retry1.log" and "hanging" not in server.log_path.read_text()
    assert server.proc.poll() is not None  # stopped on leaving


def test_a_start_that_hangs_twice_fails_quoting_the_log(tmp_path):
    server = Server(["ok"], tmp_path / "server.log", start_timeout=3, retries=0, launcher=_launcher(tmp_path))
    with pytest.raises(TimeoutError, match="(?s)did not start in 3 s.*hanging"):
        server.__enter__()
    assert server.proc.poll() is not None  # the hung process was stopped


def test_a_server_that_exits_is_not_retried_and_its_log_is_quoted(tmp_path):
    (tmp_path / "marker").write_text("no hang")
    server = Server(["fail"], tmp_path / "server.log", start_timeout=30, launcher=_launcher(tmp_path))
    with pytest.raises(RuntimeError, match="(?s)exited at start.*cannot load the model"):
        server.__enter__()
    assert not (tmp_path / "server.retry1.log").exists()
