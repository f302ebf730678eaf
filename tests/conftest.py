"""Fixtures for the gelf system tests.

Teardown order matters and follows fixture dependencies: background processes and gelf servers
are stopped before the network namespaces they use are deleted.

With CI set in the environment, a skipped test (or a run where nothing passed) fails the session:
CI runs as root with Chromium installed, so a skip there means a test did not really run.
"""

import os
import shutil
import signal
import subprocess

import pytest

import helpers
from helpers import GelfServer

# ---------------------------------------------------------------- CI: no false green

_outcomes = {"passed": 0, "skipped": [], "failed": 0}


def pytest_runtest_logreport(report):
    if report.skipped:
        _outcomes["skipped"].append(f"{report.nodeid}: {_skip_reason(report)}")
    elif report.when == "call" and report.passed:
        _outcomes["passed"] += 1
    elif report.failed:
        _outcomes["failed"] += 1


def _skip_reason(report):
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return lr[2]
    return str(lr)


def _ci():
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _ci_problems():
    if not _ci():
        return []
    problems = []
    if _outcomes["skipped"]:
        problems.append(f"{len(_outcomes['skipped'])} test(s) skipped, and CI must run them all:")
        problems += [f"  {s}" for s in _outcomes["skipped"]]
    if _outcomes["passed"] == 0:
        problems.append("no test passed (nothing collected or everything skipped/failed)")
    return problems


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if _ci_problems() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    problems = _ci_problems()
    if problems:
        terminalreporter.section("CI=true: session marked as FAILED", sep="!", red=True)
        for line in problems:
            terminalreporter.write_line(line, red=True)


# ---------------------------------------------------------------- logs of failed tests

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when in ("setup", "call") and rep.failed:
        for srv in getattr(item, "_gelf_servers", []):
            rep.sections.append((f"gelf server {srv.dev} port {srv.port}", srv.log_text()))
        for name, lines in getattr(item, "_gelf_consoles", []):
            rep.sections.append((f"browser console {name}", "\n".join(lines) or "(empty)"))
        for name, pump in getattr(item, "_gelf_bg", []):
            rep.sections.append((f"process {name}", pump.text() or "(no output)"))


# ---------------------------------------------------------------- environment checks

@pytest.fixture(scope="session")
def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (tap devices, network namespaces)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    for tool in ("ip", "ping"):
        if not shutil.which(tool):
            pytest.skip(f"needs '{tool}' (make sysdeps)")


@pytest.fixture(scope="session")
def need_chromium():
    if not helpers.chromium_available():
        pytest.skip(f"needs Chromium at {helpers.CHROMIUM} (make sysdeps)")


# ---------------------------------------------------------------- namespaces, servers, processes

@pytest.fixture
def netns(need_root):
    """Factory: netns() -> name of a new, empty network namespace (deleted at teardown)."""
    created = []

    def make():
        name = f"gelf-{os.getpid()}-{helpers.unique('')}"
        helpers.netns_add(name)
        created.append(name)
        return name

    yield make
    for name in reversed(created):
        helpers.netns_del(name)


@pytest.fixture
def gelf_server(request, netns, need_root, tmp_path):
    """Factory: gelf_server(dev=None, port=None, mtu=1500) -> started GelfServer.

    Servers are stopped (SIGTERM, then SIGKILL) at teardown, before the namespaces go.
    """
    servers = []
    request.node._gelf_servers = servers

    def start(dev=None, port=None, mtu=1500, debug=True, extra=()):
        srv = GelfServer(dev or helpers.tap_name(), port or helpers.free_port(), mtu=mtu,
                         debug=debug, log_dir=tmp_path, extra=extra)
        servers.append(srv)
        return srv.start()

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def ns_addr(netns):
    """ns_addr(server, "10.77.0.1", ns=None, mac=None) -> namespace now holding the server's tap."""

    def move(server, addr, ns=None, mac=None):
        ns = ns or netns()
        helpers.move_tap(server.dev, ns, addr, mac=mac)
        server.ns = ns
        return ns

    return move


@pytest.fixture
def bg(request, netns):
    """Factory: bg(cmd, name) -> Popen of a background process, output drained; killed at teardown."""
    procs = []
    request.node._gelf_bg = []

    def start(cmd, name=None, **kw):
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, **kw)
        p.pump = helpers.LogPump(p.stdout)
        procs.append(p)
        request.node._gelf_bg.append((name or os.path.basename(str(cmd[0])), p.pump))
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


# ---------------------------------------------------------------- browser

@pytest.fixture(scope="session")
def browser(need_chromium):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=helpers.CHROMIUM, headless=True,
                               args=helpers.CHROMIUM_ARGS)
    except Exception:
        pw.stop()
        raise
    yield b
    try:
        b.close()
    finally:
        pw.stop()


@pytest.fixture
def open_page(request, browser):
    """Factory: open_page(url, **context_options) -> a Playwright Page in a fresh context
    (options as for browser.new_context: viewport, is_mobile, color_scheme...); closed at teardown."""
    contexts = []
    request.node._gelf_consoles = []

    def open_(url, **context_options):
        ctx = browser.new_context(**context_options)
        contexts.append(ctx)
        page = ctx.new_page()
        console = []
        request.node._gelf_consoles.append((url, console))
        page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
        page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
        page.set_default_timeout(60_000)
        page.goto(url)
        return page

    yield open_
    for ctx in contexts:
        try:
            ctx.close()
        except Exception:
            pass
