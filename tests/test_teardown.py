"""SIGTERM / SIGINT: exit 0, tap gone, port free for a new server at once.

The server must exit by itself; the 30 s bound only keeps a hung server from hanging the suite.
How fast it exits is a speed figure, not asserted here; it belongs in `make bench` (which does not
measure shutdown yet)."""

import signal
import subprocess
import time

import pytest

import helpers

pytestmark = pytest.mark.usefixtures("need_root")


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "with-client"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_teardown(gelf_server, sig, busy):
    from ws4py.client.threadedclient import WebSocketClient

    srv = gelf_server()
    assert helpers.iface_exists(srv.dev)
    assert srv.stats()["tap"]["name"] == srv.dev
    client = None
    if busy:
        # An open WebSocket link must not hold the shutdown up.
        client = WebSocketClient(srv.ws_url)
        client.daemon = True
        client.connect()
        helpers.wait_for(lambda: srv.stats()["links"], 30, what="the link in /stats")

    srv.proc.send_signal(sig)
    try:
        rc = srv.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 30 s after {signal.Signals(sig).name}:\n{srv.log_text()}")
    finally:
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
    assert rc == 0, f"exit code {rc} after {signal.Signals(sig).name}:\n{srv.log_text()}"
    assert "Traceback" not in srv.log_text()

    # Let the log reader see EOF, then check the tap and the port.
    time.sleep(0.1)
    assert not helpers.iface_exists(srv.dev), f"{srv.dev} still exists after exit"
    assert helpers.port_bindable(srv.port), f"port {srv.port} not bindable after exit"

    # And a new server can take the same port and tap name right away.
    again = gelf_server(dev=srv.dev, port=srv.port)
    assert again.stats()["tap"]["name"] == srv.dev
