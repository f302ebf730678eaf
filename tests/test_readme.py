"""The README as a newcomer follows it (issue 13): a fresh clone, the set-up command and the seed's
line; a venv left half-made; and every recipe of the README run as written, each of its hosts a
network namespace of its own.

What runs is the committed state: a module-wide clone of this checkout's HEAD in a temporary
directory, where the README's set-up command makes the venv (from the package index, as it does for
a newcomer: minutes, hence the generous bounds) and every recipe runs. Commit a README change before
testing it. The commands, the output the README shows under them and the few commands its prose
gives (the page's address, the peer to add, the relay, how a VM joins the bridge) are read out of
README.md, never copied here, so these tests follow the README when it changes; what the prose only
promises in words (the ping that works) is checked by a function per recipe, in RECIPE_CHECKS.

A README recipe is a fenced block of `host$ command` lines; lines without a prompt show what the
command before them prints (`...`: more follows). Each host is a namespace, with
/etc/netns/<namespace>/hosts naming the others (`ip netns exec` bind-mounts it over /etc/hosts), and
veth links and bridges stand in for the networks the README describes. A command runs as written,
`ip netns exec NS sh -c 'COMMAND'` from the clone, in README order; a gelf server runs in the
background until the recipe is done. Every address is inside namespaces made here (the "internet" of
the tethering recipe too); only the set-up command reaches out, to the package index.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import helpers
from helpers import CHROMIUM, CHROMIUM_ARGS, REPO, LogPump, run, wait_for

pytestmark = pytest.mark.usefixtures("need_root")

SETUP_TIMEOUT = 1200  # `sudo make setup` in a fresh clone: pip installs gelf's dependencies
START_TIMEOUT = 90    # a gelf server's start-up lines (re-executing under the venv, busy machine)
PING_TIMEOUT = 60     # the first answered ping once everything is linked
PAGE_TIMEOUT = 60     # a page loads and its links open


# ---------------------------------------------------------------- reading README.md

PROMPT = re.compile(r"^(?P<host>[a-z][a-z0-9-]*)\$\s+(?P<command>\S.*)$")


@dataclass
class Step:
    host: str
    command: str
    shown: list = field(default_factory=list)  # the output the README shows under the command
    elided: bool = False                       # the shown output ends with "...": more follows

    def __str__(self):
        return f"{self.host}$ {self.command}"


@dataclass
class Recipe:
    section: str
    steps: list


def fenced_blocks(text):
    """(section heading, lines) of every fenced code block, in README order."""
    section, block = "", None
    for line in text.splitlines():
        if line.startswith("```"):
            if block is None:
                block = []
            else:
                yield section, block
                block = None
        elif block is not None:
            block.append(line)
        elif line.startswith("## "):
            section = line[3:].strip()


def recipes(text):
    """Every fenced block with `host$ command` lines, as Recipes."""
    found = []
    for section, lines in fenced_blocks(text):
        steps, joined = [], []
        for line in lines:
            if joined or (PROMPT.match(line) and line.endswith("\\")):
                joined.append((line[:-1] if line.endswith("\\") else line).strip())
                if line.endswith("\\"):
                    continue  # a command continued on the next line, as the shell joins it
                line, joined = " ".join(joined), []
            m = PROMPT.match(line)
            if m:
                steps.append(Step(m["host"], m["command"].strip()))
            elif line.strip() == "...":
                if steps:
                    steps[-1].elided = True
            elif line.strip() and steps:
                steps[-1].shown.append(line.rstrip())
        if steps:
            found.append(Recipe(section, steps))
    return found


def section_text(text, heading_start):
    m = re.search(rf"^## {re.escape(heading_start)}.*?(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README.md has no section '## {heading_start}...'"
    return m.group(0)


def from_prose(text, heading_start, pattern, what):
    """A command or address the README's prose gives, in `code`; whitespace as one space."""
    prose = " ".join((section_text(text, heading_start) if heading_start else text).split())
    m = re.search(pattern, prose)
    where = f"README.md's section '{heading_start}'" if heading_start else "README.md"
    assert m, f"{where} no longer says {what} (looked for {pattern!r})"
    return m


def setup_command(text):
    return from_prose(text, None, r"`([^`]+)` installs without starting anything",
                      "which command sets up a checkout").group(1)


def seed_step(text):
    """The seed's usage line as the README writes it: the gelf server started with --enc."""
    for recipe in recipes(text):
        for step in recipe.steps:
            if re.search(r"\bgelf\.py\b.*\s--enc\b", step.command):
                return step
    raise AssertionError("README.md runs no `gelf.py ... --enc` (the seed's usage line)")


def is_server(command):
    """A gelf server runs until stopped: it goes to the background."""
    return re.search(r"\bgelf\.py\b", command) and not re.search(r"\bgelf\.py\s+relay\b", command)


def shown_pattern(line):
    """A shown output line as a regex: a 32-hex-digit key stands for any key."""
    return re.compile(re.sub(r"[0-9a-f]{32}", "[0-9a-f]{32}", re.escape(line)) + r"\s*$")


def shown_mismatch(step, printed):
    """None if `printed` starts with what the README shows under `step` (and, unless the README
    elides the rest, nothing but link events follows); else a description of the difference."""
    for i, want in enumerate(step.shown):
        if i >= len(printed) or not shown_pattern(want).match(printed[i]):
            break
    else:
        extra = [l for l in printed[len(step.shown):] if not l.startswith("[Gelf] link ")]
        if step.elided or not extra:
            return None
    return ("`%s` printed what the README does not show.\nREADME shows:\n  %s\nprinted:\n  %s"
            % (step, "\n  ".join(step.shown + (["..."] if step.elided else [])),
               "\n  ".join(printed) or "(nothing)"))


# ---------------------------------------------------------------- processes

def newcomer_env():
    """The environment without this test run's own venv: a newcomer's shell."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not os.path.exists(os.path.join(p, "..", "pyvenv.cfg")))
    return env


def children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(d))
    return kids


def start_in(ns, command, cwd, node, name):
    """`ip netns exec NS sh -c COMMAND` in the background, output drained; in a session of its own
    so that what is left of it can be killed at the end."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "sh", "-c", command], cwd=cwd,
                            env=newcomer_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.pump = LogPump(proc.stdout)
    if not hasattr(node, "_gelf_bg"):
        node._gelf_bg = []
    node._gelf_bg.append((name, proc.pump))
    return proc


def stop(proc, timeout=30):
    """Stop what the shell runs as a person would (`kill` sends SIGTERM; sudo passes it on);
    return the shell's exit status, which is the command's, or None if it had to be killed."""
    if proc.poll() is None:
        for pid in children(proc.pid) or [proc.pid]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        rc = None
    proc.pump.thread.join(5)
    return rc


def kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def wait_started(proc, step):
    """Wait for a server's `Relay listening` line; fail with its output if it exits or hangs."""
    ok = proc.pump.wait_line(r"\[Gelf\] Relay listening: ", START_TIMEOUT,
                             alive=lambda: proc.poll() is None)
    assert ok, (f"README command did not work as written: `{step}` "
                f"(exit status {proc.poll()}) printed:\n{proc.pump.text() or '(nothing)'}")


def created_tap(proc):
    m = re.search(r"\[Gelf\] Created interface: (\S+)", proc.pump.text())
    return m and m.group(1)


# ---------------------------------------------------------------- the fresh clone

@pytest.fixture(scope="module")
def clone(tmp_path_factory, need_root):
    """A clone of this checkout's HEAD (the committed state), shared by the tests of this
    module in their order: the seed's line on the fresh clone, the half-made venv, the recipes."""
    sha = run(["git", "-C", str(REPO), "rev-parse", "HEAD"]).stdout.strip()
    dest = tmp_path_factory.mktemp("readme") / "gelf"
    run(["git", "clone", "-q", "--no-checkout", str(REPO), str(dest)], timeout=300)
    run(["git", "-C", str(dest), "checkout", "-q", "--detach", sha], timeout=120)
    yield dest
    shutil.rmtree(dest, ignore_errors=True)


def readme_of(checkout):
    return (checkout / "README.md").read_text()


def run_setup(checkout):
    command = setup_command(readme_of(checkout))
    res = subprocess.run(["sh", "-c", command], cwd=checkout, env=newcomer_env(),
                         capture_output=True, text=True, timeout=SETUP_TIMEOUT)
    assert res.returncode == 0, (f"README command did not work as written: `{command}` "
                                 f"exited {res.returncode}:\n{res.stdout}{res.stderr}")
    return res


@pytest.mark.timeout(SETUP_TIMEOUT + 600)
def test_a_fresh_clone_runs_the_seeds_line(clone, request):
    """The README's set-up command on a fresh clone, then the seed's line as the README writes it,
    in a namespace of its own (so 0.0.0.0:7001 is that namespace's): the server prints the lines
    the README shows, and SIGTERM stops it with exit 0, its tap gone."""
    assert not (clone / ".venv").exists()
    run_setup(clone)

    step = seed_step(readme_of(clone))
    seed_lines = [r"\[Gelf\] Encryption key: [0-9a-f]{32}$", r"\[Gelf\] Created interface: tap0$",
                  r"\[Gelf\] Relay listening: 0\.0\.0\.0 7001$"]
    for pattern in seed_lines:  # the README still shows the seed's lines under its line
        assert any(re.match(pattern, l) for l in step.shown), \
            f"README.md no longer shows {pattern!r} under `{step}`"

    ns = f"gelf-{os.getpid()}-seed"
    helpers.netns_add(ns)
    proc = None
    try:
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        proc = start_in(ns, step.command, clone, request.node, "the seed's line")
        wait_started(proc, step)
        wait_for(lambda: len(proc.pump.lines) >= len(step.shown), START_TIMEOUT,
                 what=f"the {len(step.shown)} lines the README shows under `{step}`")
        problem = shown_mismatch(step, list(proc.pump.lines))
        assert problem is None, problem
        for pattern in seed_lines:
            assert any(re.match(pattern, l) for l in proc.pump.lines), proc.pump.text()
        tap = created_tap(proc)
        assert helpers.iface_exists(tap, ns)

        rc = stop(proc)
        assert rc == 0, f"`{step}` exited {rc} on SIGTERM:\n{proc.pump.text()}"
        assert not helpers.iface_exists(tap, ns), f"{tap} is left behind after SIGTERM"
    finally:
        if proc is not None and proc.poll() is None:
            kill(proc)
        helpers.netns_del(ns)


@pytest.mark.timeout(SETUP_TIMEOUT + 300)
def test_a_half_made_venv_is_made_again(clone):
    """Without a venv, `python3 gelf.py` says in one line to run `make venv`; a venv left half-made
    (`python3 -m venv` without python3-venv leaves .venv/bin/python and no pip) is made again by
    `make venv` instead of failing for ever."""
    shutil.rmtree(clone / ".venv", ignore_errors=True)
    env = newcomer_env()
    res = subprocess.run(["python3", "gelf.py", "--version"], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=60)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 1, f"exit {res.returncode}:\n{out}"
    assert "Traceback" not in out, out
    assert len(out.splitlines()) == 1, out
    assert out.startswith("gelf: error:") and "make venv" in out, out

    run(["python3", "-m", "venv", "--without-pip", ".venv"], cwd=clone, env=env, timeout=120)
    assert os.access(clone / ".venv/bin/python", os.X_OK)
    assert subprocess.run([clone / ".venv/bin/python", "-m", "pip", "--version"],
                          capture_output=True).returncode != 0, "the venv is not half-made"

    res = subprocess.run(["make", "venv"], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=SETUP_TIMEOUT)
    assert res.returncode == 0, f"make venv exited {res.returncode}:\n{res.stdout}{res.stderr}"
    res = subprocess.run([clone / ".venv/bin/python", "-m", "pip", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr

    res = subprocess.run(["python3", "gelf.py", "--version"], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout}{res.stderr}"


# ---------------------------------------------------------------- a world of namespaces

class World:
    """Namespaces standing in for one recipe's machines and networks, and what runs in them.
    close() stops every process, deletes the namespaces (their taps go with them) and the
    /etc/netns/<namespace>/ directories it wrote."""

    def __init__(self, tag, checkout, node, tmp_path, browser_type):
        self.prefix = f"gelf-{os.getpid()}-{tag}"
        self.checkout = checkout
        self.node = node
        self.tmp_path = tmp_path
        self.browser_type = browser_type
        self.ns = {}       # host -> namespace
        self.names = {}    # host name -> the address the others know it by
        self.procs = []
        self.browsers = []
        self.etc = []      # /etc/netns/<namespace> directories written

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- building

    def host(self, name):
        if name not in self.ns:
            ns = f"{self.prefix}-{name}"
            helpers.netns_add(ns)
            self.ns[name] = ns
            self.ip(name, "link", "set", "lo", "up")
        return self.ns[name]

    def ip(self, host, *args):
        return run(["ip", "-n", self.host(host), *args])

    def sysctl(self, host, setting):
        run(["ip", "netns", "exec", self.host(host), "sysctl", "-q", "-w", setting])

    def up(self, host, dev, cidr=None):
        if cidr:
            self.ip(host, "addr", "add", cidr, "dev", dev)
        self.ip(host, "link", "set", dev, "up")

    def link(self, a, dev_a, cidr_a, b, dev_b, cidr_b):
        """A veth pair between hosts a and b (a cable, or a radio link). A host is known to the
        others by the first address it gets."""
        self.host(b)
        self.ip(a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b,
                "netns", self.ns[b])
        for host, dev, cidr in ((a, dev_a, cidr_a), (b, dev_b, cidr_b)):
            self.up(host, dev, cidr)
            if cidr:
                self.names.setdefault(host, cidr.split("/")[0])

    def lan(self, switch, members):
        """A switch (a bridge in a namespace of its own) with each member's eth0 plugged in."""
        self.ip(switch, "link", "add", "sw", "type", "bridge")
        self.up(switch, "sw")
        for i, (host, cidr) in enumerate(members):
            self.link(host, "eth0", cidr, switch, f"p{i}", None)
            self.ip(switch, "link", "set", f"p{i}", "master", "sw")

    def write_hosts(self):
        """/etc/netns/<namespace>/hosts for every host, naming all the others, and this machine's
        own name as Debian's /etc/hosts does (the namespaces share it; sudo looks it up)."""
        table = f"127.0.1.1\t{socket.gethostname()}\n"
        table += "".join(f"{addr}\t{name}\n" for name, addr in self.names.items())
        for host, ns in self.ns.items():
            d = Path("/etc/netns") / ns
            d.mkdir(parents=True, exist_ok=True)
            self.etc.append(d)
            (d / "hosts").write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n{table}")

    # -- running

    def sh(self, host, command, timeout=120):
        """A command that ends: run it as written, return its output; it must exit 0."""
        res = subprocess.run(["ip", "netns", "exec", self.ns[host], "sh", "-c", command],
                             cwd=self.checkout, env=newcomer_env(), stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=timeout)
        out = res.stdout + res.stderr
        assert res.returncode == 0, (f"README command did not work as written: `{host}$ {command}`"
                                     f" exited {res.returncode}:\n{out or '(no output)'}")
        return out

    def start(self, host, command):
        proc = start_in(self.ns[host], command, self.checkout, self.node, f"{host}$ {command}")
        self.procs.append(proc)
        return proc

    def run_recipe(self, recipe):
        """Every command of the recipe as written, in order, each on its host; servers stay up.
        Returns {step index: server process}."""
        servers = {}
        for i, step in enumerate(recipe.steps):
            assert step.host in self.ns, f"no namespace stands for host {step.host!r} of `{step}`"
            if is_server(step.command):
                proc = self.start(step.host, step.command)
                wait_started(proc, step)
                servers[i] = proc
            else:
                out = self.sh(step.host, step.command)
                if step.shown:
                    problem = shown_mismatch(step, out.splitlines())
                    assert problem is None, problem
        return servers

    def check_shown_and_stop(self, recipe, servers):
        """What the servers printed is what the README shows; SIGTERM stops each with exit 0 and
        removes its tap."""
        for i, proc in servers.items():
            step = recipe.steps[i]
            if step.shown:
                wait_for(lambda: len(proc.pump.lines) >= len(step.shown), START_TIMEOUT,
                         what=f"the lines the README shows under `{step}`")
                problem = shown_mismatch(step, list(proc.pump.lines))
                assert problem is None, problem
        for i, proc in servers.items():
            step, tap = recipe.steps[i], created_tap(proc)
            rc = stop(proc)
            assert rc == 0, f"`{step}` exited {rc} on SIGTERM:\n{proc.pump.text()}"
            assert tap and not helpers.iface_exists(tap, self.ns[step.host]), \
                f"`{step}` left its tap {tap} behind"

    def browser(self, host):
        """Chromium running inside host's namespace, driven by Playwright over its pipe."""
        wrapper = self.tmp_path / f"chromium-in-{self.ns[host]}"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {self.ns[host]} {CHROMIUM} "$@"\n')
        wrapper.chmod(0o755)
        b = self.browser_type.launch(executable_path=str(wrapper), headless=True,
                                     args=CHROMIUM_ARGS)
        self.browsers.append(b)
        return b

    def open_page(self, host, url):
        page = self.browser(host).new_page()
        page.set_default_timeout(PAGE_TIMEOUT * 1000)
        console = []
        if not hasattr(self.node, "_gelf_consoles"):
            self.node._gelf_consoles = []
        self.node._gelf_consoles.append((f"{host}: {url}", console))
        page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
        page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
        page.goto(url)
        return page

    def close(self):
        for b in self.browsers:
            try:
                b.close()
            except Exception:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                kill(proc)
        for ns in reversed(list(self.ns.values())):
            helpers.netns_del(ns)
        for d in self.etc:
            shutil.rmtree(d, ignore_errors=True)
        try:
            os.rmdir("/etc/netns")  # only if no one else keeps files there
        except OSError:
            pass


def wait_links_open(page, count, timeout=PAGE_TIMEOUT):
    """Wait until the page shows `count` links, every one open; fail naming each link's state."""
    try:
        _wait_links_open(page, count, timeout)
    except Exception as err:
        links = page.eval_on_selector_all("li.link", """ls => ls.map(l =>
            l.dataset.url + ': ' + (l.querySelector('.state') || {}).textContent)""")
        raise AssertionError(f"{page.url} did not show {count} open links within {timeout}s "
                             f"({type(err).__name__}); it shows: {links or 'no links'}") from None


def _wait_links_open(page, count, timeout):
    page.wait_for_function(
        """n => {
            const ls = [...document.querySelectorAll('li.link')];
            return ls.length === n && ls.every(l => {
                const s = l.querySelector('.state');
                return s && s.textContent.trim() === 'open';
            });
        }""", arg=count, timeout=timeout * 1000, polling=200)


def assert_ping(world, host, addr, what):
    assert helpers.wait_ping(world.ns[host], addr, timeout=PING_TIMEOUT), \
        f"{what}: no ping from {host} to {addr} answered within {PING_TIMEOUT}s"
    loss, out = helpers.ping(world.ns[host], addr, count=10)
    assert loss == 0, f"{what}: ping from {host} to {addr} lost {loss}%:\n{out}"


def assert_no_ping(world, host, addr, what):
    loss, out = helpers.ping(world.ns[host], addr, count=3)
    assert loss == 100, f"{what}: {host} reaches {addr} already:\n{out}"


# ---------------------------------------------------------------- what each recipe promises

def two_servers_and_a_browser(world):
    """server1 and server2 on one LAN, with a machine running a browser that reaches both."""
    world.lan("lan", [("server1", "192.168.1.1/24"), ("server2", "192.168.1.2/24"),
                      ("browser", "192.168.1.100/24")])
    world.write_hosts()


def quick_start(world, recipe, text):
    """Open the page on server1, add server2 in its form: `ping 10.10.10.2` works from server1.
    Then the relay paragraph: with the page gone, `python gelf.py relay server1:7001 server2:7001`
    from a host without a browser carries the ping instead."""
    two_servers_and_a_browser(world)
    servers = world.run_recipe(recipe)

    heading = "Quick start"
    url = from_prose(text, heading, r"Open `(http://[^`]+)` in any browser",
                     "which page to open")[1]
    peer = from_prose(text, heading, r"type `([^`]+)` in the form", "which peer to add")[1]
    m = from_prose(text, heading, r"Now `ping (\S+)` works from (\w+)", "what ping works")
    addr, pinger = m[1], m[2]

    page = world.open_page("browser", url)
    host, port = peer.rsplit(":", 1)
    helpers.add_peer(page, int(port), host=host)
    wait_links_open(page, 2)
    assert_ping(world, pinger, addr, f"after adding {peer} on {url}")

    world.browsers.pop().close()
    helpers.assert_pings_fail(world.ns[pinger], addr)

    relay = from_prose(text, "Direct links", r"`(python gelf\.py relay (?:(?!\.\.\.)[^`])+)`",
                       "how to run the relay on a host with no browser")[1]
    proc = world.start("browser", relay)
    assert_ping(world, pinger, addr, f"with `{relay}` in place of the page")
    rc = stop(proc)
    assert rc == 0, f"`{relay}` exited {rc} on SIGTERM:\n{proc.pump.text()}"

    world.check_shown_and_stop(recipe, servers)


def tethering(world, recipe, text):
    """A laptop with no way out but a phone's hotspot; a VPS with eth0 to the Internet; a host out
    there, `example`. With the recipe run and the page open on the phone, the laptop reaches that
    host through the tunnel and the VPS's masquerade."""
    internet_host, vps = "192.0.2.1", "203.0.113.10"  # vps: the VPS's public address, its eth0's
    world.link("vps", "eth0", vps + "/24", "internet", "vps0", "203.0.113.1/24")
    world.link("phone", "wwan0", "198.51.100.20/24", "internet", "phone0", "198.51.100.1/24")
    world.link("laptop", "wlan0", "192.168.43.20/24", "phone", "wlan0", "192.168.43.1/24")
    world.link("example", "eth0", internet_host + "/24", "internet", "site0", "192.0.2.254/24")
    world.ip("example", "route", "add", "default", "via", "192.0.2.254")
    world.sysctl("internet", "net.ipv4.ip_forward=1")  # routes between the phone and the VPS
    world.sysctl("phone", "net.ipv4.ip_forward=0")     # the hotspot gives the laptop no way out
    world.ip("vps", "route", "add", "default", "via", "203.0.113.1")
    world.ip("phone", "route", "add", "default", "via", "198.51.100.1")
    world.ip("laptop", "route", "add", "default", "via", "192.168.43.1")  # the hotspot's route
    world.write_hosts()
    assert_no_ping(world, "laptop", internet_host, "before the recipe")
    # The Internet knows no way back to 10.10.10.0/24: only the VPS's masquerade gets replies home.
    assert run(["ip", "-n", world.ns["internet"], "route", "get", "10.10.10.2"],
               check=False).returncode != 0

    if not shutil.which("nft", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"):
        pytest.fail("nft is missing on this machine (the README: Debian's nftables package)")
    # The key file is made on the VPS and copied to the laptop: both run in the same checkout
    # here, so the laptop's `--key-file gelf.key` finds the VPS's file, copied already.
    servers = world.run_recipe(recipe)

    addrs = world.sh("laptop", "ip -4 addr")  # the README: `ip -4 addr` on the laptop shows it
    laptop = re.search(r"inet (192\.168\.43\.\d+)/", addrs)[1]
    url = from_prose(text, "Tethering", r"On the phone, open `([^`]+)`",
                     "which page the phone opens")[1]
    url = url.replace("LAPTOP", laptop).replace("VPS", vps)

    page = world.open_page("phone", url)
    wait_links_open(page, 2)
    assert_ping(world, "laptop", internet_host, f"with {url} open on the phone")

    world.check_shown_and_stop(recipe, servers)


def hypervisors(world, recipe, text):
    """Two hypervisors on a LAN, a VM on each (a veth whose host end joins br0, as libvirt or
    `ip link set vnet0 master br0` does): the VMs share one segment over the direct link."""
    world.link("hv1", "eth0", "192.168.2.1/24", "hv2", "eth0", "192.168.2.2/24")
    vms = {"hv1": ("vm1", "10.20.0.1/24"), "hv2": ("vm2", "10.20.0.2/24")}
    for hv, (vm, cidr) in vms.items():
        world.link(hv, "vnet0", None, vm, "eth0", cidr)
    world.write_hosts()

    servers = world.run_recipe(recipe)

    attach = from_prose(text, "Direct links", r"`(ip link set \S+ master \S+)`",
                        "how a VM's interface joins the bridge")[1]
    for hv in vms:
        world.sh(hv, attach)
    for i, proc in servers.items():
        assert not proc.pump.wait_line(r"warning: bridge .* is down", 0), \
            f"`{recipe.steps[i]}` joined a bridge that was down:\n{proc.pump.text()}"
    for hv in vms:
        flags = run(["ip", "-n", world.ns[hv], "-o", "link", "show", "br0"]).stdout
        assert re.search(r"<[^>]*\bUP\b", flags), f"br0 on {hv} is down after the recipe: {flags}"
        tap = run(["ip", "-n", world.ns[hv], "-o", "link", "show", "master", "br0"]).stdout
        assert "ethws0" in tap, f"gelf's tap is not in br0 on {hv}: {tap}"

    assert_ping(world, "vm1", vms["hv2"][1].split("/")[0], "VM to VM over the direct link")
    world.check_shown_and_stop(recipe, servers)


def encryption(world, recipe, text):
    """The two servers print what the README shows (the key of --enc, `Encryption enabled` for
    --key) and stop cleanly. The block's second key is the README's example: as written, the two
    servers do not share a key, and the README does not say they join."""
    two_servers_and_a_browser(world)
    servers = world.run_recipe(recipe)
    world.check_shown_and_stop(recipe, servers)


RECIPE_CHECKS = {
    "Quick start": quick_start,
    "Tethering": tethering,
    "Direct links": hypervisors,
    "Encryption": encryption,
}


@pytest.mark.timeout(SETUP_TIMEOUT + 1200)
def test_every_readme_recipe_runs_as_written(clone, request, browser, tmp_path):
    """Every recipe of the README, in README order and in one checkout (as a reader going down
    the page), each in a world of namespaces of its own; all recipes run even when one fails,
    and every failure is reported."""
    run_setup(clone)  # done already by the first test; a no-op then
    text = readme_of(clone)
    found = recipes(text)
    problems, durations = [], []
    for n, recipe in enumerate(found):
        check = next((f for k, f in RECIPE_CHECKS.items() if recipe.section.startswith(k)), None)
        if check is None:
            problems.append(f"README recipe under '{recipe.section}' has no check in this test")
            continue
        t0 = time.monotonic()
        with World(f"r{n}", clone, request.node, tmp_path, browser.browser_type) as world:
            for step in recipe.steps:
                world.host(step.host)
            try:
                check(world, recipe, text)
            except (Exception, pytest.fail.Exception) as err:  # report it, go on with the next
                # the message only: pytest's rewritten asserts append their own evaluation
                message = str(err).split("\nassert ")[0]
                if not isinstance(err, (AssertionError, pytest.fail.Exception)):
                    message = f"{type(err).__name__}: {message}"
                problems.append(f"[{recipe.section}] {message}")
        durations.append(f"{recipe.section}: {time.monotonic() - t0:.0f} s")
    print("\n".join(durations))
    sections = [r.section for r in found]
    for key in RECIPE_CHECKS:
        if not any(s.startswith(key) for s in sections):
            problems.append(f"README.md has no recipe under a '{key}...' section any more")
    assert not problems, "\n\n".join(problems)
    left = [ns for ns in run(["ip", "netns", "list"]).stdout.split()
            if ns.startswith(f"gelf-{os.getpid()}-r")]
    assert not left, f"namespaces left behind: {left}"
