"""The systemd service (issue 6): systemd/gelf.service, the template systemd/gelf@.service, the
sample config systemd/gelf.conf.example, and `make install` / `make uninstall`.

systemd is not PID 1 in the test machine, so nothing here is started by systemd. Instead:
- `systemd-analyze verify` checks both units (on a copy whose ExecStart names an existing file:
  verify insists that the command exists, and /usr/local/bin/gelf is only there after install);
- the ExecStart line is taken from the unit and expanded as systemd does (specifiers such as %i,
  Environment= defaults overridden by the EnvironmentFile, `${VAR}` as one word, `$VAR` split on
  whitespace), then run as root with the unit's environment only (`env -i`), its capability
  bounding set and NoNewPrivileges (`setpriv`), and its taps are moved into test namespaces and
  pinged through;
- `make install DESTDIR=...` stages the whole installation in a temporary root.

The installed command, /usr/local/bin/gelf, is played by `python -m gelf` run from this checkout
(see INSTALLED_GELF): the same program as the installed entry point, with this tree's code.
"""

import json
import os
import re
import shlex
import shutil
import stat
import sys

import pytest

import helpers
from helpers import ADDR, REPO, GelfServer, assert_pings, run

SYSTEMD_DIR = REPO / "systemd"
UNITS = ["gelf.service", "gelf@.service"]
EXAMPLE = SYSTEMD_DIR / "gelf.conf.example"
INSTANCE = "peer"  # the instance name the tests give the template (gelf@peer.service)

# Where `make install` puts the command (the units' ExecStart) and what stands for it here.
INSTALLED_PATH = "/usr/local/bin/gelf"
INSTALLED_GELF = [sys.executable, "-m", "gelf"]  # run with cwd=REPO (GelfServer.start does)

# The PATH systemd (Debian 12) gives system services; the rest of the environment is the unit's.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CAPS = {"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12}
KEY = "5f0c3e1d2b4a69788796a5b4c3d2e1f0"


# ---------------------------------------------------------------- reading units as systemd does

def parse_unit(path):
    """{section: [(key, value), ...]} with comments dropped and backslash continuations joined."""
    sections, current, pending = {}, None, ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path}: cannot parse line {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit, key, section="Service"):
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit, key, section="Service"):
    found = values(unit, key, section)
    assert len(found) == 1, f"expected exactly one {key}= in [{section}], found {found}"
    return found[0]


def specifiers(text, unit_name):
    """Expand the specifiers the units use (%i %I %n %N %p %%); any other one is an error here."""
    prefix, _, rest = unit_name.partition("@")
    instance = rest.rsplit(".", 1)[0] if rest else ""
    table = {"i": instance, "I": instance, "n": unit_name, "N": unit_name.rsplit(".", 1)[0],
             "p": prefix.rsplit(".", 1)[0] if not rest else prefix, "%": "%"}

    def sub(m):
        assert m.group(1) in table, f"specifier %{m.group(1)} not handled by this test"
        return table[m.group(1)]

    return re.sub(r"%(.)", sub, text)


def unit_environment(unit):
    """The variables of all Environment= lines, in order (quoted words as systemd reads them)."""
    env = {}
    for line in values(unit, "Environment"):
        for word in shlex.split(line):
            name, sep, value = word.partition("=")
            assert sep, f"Environment= word without '=': {word!r}"
            env[name] = value
    return env


def read_env_file(path):
    """An EnvironmentFile: VAR=value lines, comments (# ;) and blank lines skipped, one level of
    matching quotes around the value removed; nothing is expanded."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path}: not VAR=value: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[name.strip()] = value
    return env


def expand_exec(line, env):
    """ExecStart= as systemd expands it: split into words (quotes honoured), then a word that is
    exactly $VAR becomes the value split on whitespace (no word when empty), and ${VAR} inside a
    word is replaced by the value (empty when unset)."""
    assert line[:1] not in "@-:+!", f"ExecStart prefixes are not handled by this test: {line!r}"
    argv = []
    for word in shlex.split(line):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            argv += env.get(m.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda v: env.get(v.group(1), ""), word))
    return argv


def service_command(unit_file, unit_name, etc_root):
    """(argv, environment) that systemd would use to start unit_name from unit_file, reading its
    EnvironmentFile (an absolute /etc/... path in the unit) under the directory etc_root."""
    unit = parse_unit(unit_file)
    env = {"PATH": SYSTEMD_PATH}
    env.update(unit_environment(unit))
    for path in values(unit, "EnvironmentFile"):
        path = specifiers(path, unit_name)
        optional = path.startswith("-")
        path = path.lstrip("-")
        assert path.startswith("/etc/gelf/"), path
        local = etc_root / path.lstrip("/")
        if local.exists() or not optional:
            env.update(read_env_file(local))
    argv = expand_exec(specifiers(one(unit, "ExecStart"), unit_name), env)
    return argv, env


def sandbox_prefix(unit):
    """setpriv arguments giving a process the unit's CapabilityBoundingSet and NoNewPrivileges."""
    caps = " ".join(values(unit, "CapabilityBoundingSet")).split()
    assert caps and all(c in CAPS for c in caps), caps
    prefix = ["setpriv", "--bounding-set", "-all," + ",".join("+" + c[4:].lower() for c in caps)]
    if one(unit, "NoNewPrivileges") in ("yes", "true", "1", "on"):
        prefix.append("--no-new-privs")
    return prefix


def cap_mask(unit):
    return sum(1 << CAPS[c] for c in " ".join(values(unit, "CapabilityBoundingSet")).split())


# ---------------------------------------------------------------- the units' content

@pytest.mark.parametrize("name", UNITS)
def test_unit_runs_gelf_from_its_config_with_hardening(name):
    unit = parse_unit(SYSTEMD_DIR / name)
    env_file = "/etc/gelf/%i.conf" if "@" in name else "/etc/gelf/gelf.conf"
    assert values(unit, "EnvironmentFile") == [env_file]
    assert one(unit, "ExecStart") == f"{INSTALLED_PATH} --host ${{GELF_HOST}} $GELF_ARGS ${{GELF_PORT}}"
    env = unit_environment(unit)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert {"GELF_HOST", "GELF_PORT", "GELF_ARGS"} <= set(env), "defaults for every variable"
    expected = {
        "Restart": "on-failure", "RestartSec": "2",
        "AmbientCapabilities": "CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "DevicePolicy": "closed", "DeviceAllow": "/dev/net/tun rw",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "SyslogIdentifier": "gelf-%i" if "@" in name else "gelf",
    }
    for key, value in expected.items():
        assert one(unit, key) == value, key
    for forbidden in ("User", "DynamicUser", "PrivateDevices", "PrivateNetwork", "PrivateUsers"):
        assert not values(unit, forbidden), f"{forbidden}= would stop gelf from creating its tap"
    assert one(unit, "WantedBy", "Install") == "multi-user.target"


def test_template_differs_only_in_config_and_names():
    plain, template = (parse_unit(SYSTEMD_DIR / n) for n in UNITS)
    differ = {"Description", "EnvironmentFile", "SyslogIdentifier"}
    strip = lambda u: {s: [(k, v) for k, v in kv if k not in differ] for s, kv in u.items()}
    assert strip(plain) == strip(template)


def test_example_config_gives_gelf_valid_arguments():
    """The example's active settings, and each commented GELF_ARGS example, make a command line
    that gelf's own parser accepts."""
    from gelf.cli import build_parser

    unit = parse_unit(SYSTEMD_DIR / "gelf.service")
    base = unit_environment(unit)
    active = read_env_file(EXAMPLE)
    assert set(active) == {"GELF_HOST", "GELF_PORT", "GELF_ARGS"}
    examples = [l[1:] for l in EXAMPLE.read_text().splitlines() if l.startswith("#GELF_ARGS=")]
    assert len(examples) >= 3
    for override in [None] + examples:
        env = dict(base, **active)
        if override:
            env["GELF_ARGS"] = override.partition("=")[2]
        argv = expand_exec(one(unit, "ExecStart"), env)
        assert argv[0] == INSTALLED_PATH
        args = build_parser().parse_args(argv[1:])
        assert args.user is None
        assert args.port == int(env["GELF_PORT"])


# ---------------------------------------------------------------- systemd-analyze verify

def verify(unit_file):
    """systemd-analyze verify: (return code, the output lines that concern this unit)."""
    res = run(["systemd-analyze", "verify", "--man=no", str(unit_file)], check=False, timeout=60)
    name = unit_file.name.split("@")[0]
    lines = [l for l in (res.stdout + res.stderr).splitlines()
             if str(unit_file.parent) in l or name + "." in l or name + "@" in l]
    return res.returncode, lines, res.stdout + res.stderr


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify(name, tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("needs systemd-analyze (make sysdeps installs Debian's systemd)")
    source = (SYSTEMD_DIR / name).read_text()
    assert f"ExecStart={INSTALLED_PATH} " in source
    # verify checks that the command exists: point the copy at an existing gelf entry point.
    stand_in = os.path.join(os.path.dirname(sys.executable), "gelf")
    assert os.access(stand_in, os.X_OK), stand_in
    copy = tmp_path / name
    copy.write_text(source.replace(f"ExecStart={INSTALLED_PATH} ", f"ExecStart={stand_in} "))
    rc, lines, out = verify(copy)
    assert rc == 0 and not lines, f"systemd-analyze verify {name} -> {rc}:\n{out}"

    # The check catches real mistakes (an unknown key only warns, with return code 0).
    broken = tmp_path / "broken" / name
    broken.parent.mkdir()
    broken.write_text(copy.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomme=yes"))
    rc, lines, out = verify(broken)
    assert any("ProtectHomme" in l for l in lines), f"a broken unit went unnoticed:\n{out}"


# ---------------------------------------------------------------- ExecStart, run as systemd would

class UnitGelfServer(GelfServer):
    """A gelf server started from a unit's expanded ExecStart, with only the unit's environment
    (env -i) and its capability bounding set and NoNewPrivileges (setpriv); optionally inside a
    network namespace. setpriv, env and `ip netns exec` all exec, so proc.pid is gelf itself."""

    def __init__(self, argv, env, prefix, log_dir, netns=None):
        dev = argv[argv.index("--dev") + 1]
        super().__init__(dev, int(argv[-1]), log_dir=log_dir)
        self.argv, self.env, self.prefix, self.netns = argv, env, prefix, netns

    def cmd(self):
        assert self.argv[0] == INSTALLED_PATH
        argv = INSTALLED_GELF + self.argv[1:]  # the installed command, played by this checkout
        env = ["env", "-i"] + [f"{k}={v}" for k, v in sorted(self.env.items())]
        ns = ["ip", "netns", "exec", self.netns] if self.netns else []
        return ns + self.prefix + env + argv

    def status(self, field):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
        return None


@pytest.fixture
def etc_root(tmp_path):
    """A stand-in for / holding etc/gelf (mode 0700), where the tests write configs and the key."""
    root = tmp_path / "root"
    etc = root / "etc" / "gelf"
    etc.mkdir(parents=True)
    etc.chmod(0o700)
    key = etc / "segment.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    return root


@pytest.fixture
def unit_server(request, gelf_server, etc_root, tmp_path):
    """Factory: unit_server(unit, config_text, netns=None) -> started UnitGelfServer.

    It joins gelf_server's list, so it is stopped (and its log shown on failure) like the other
    servers, before the namespaces are deleted."""

    def start(unit, config, netns=None):
        unit_name = unit.replace("@.", f"@{INSTANCE}.")
        conf = "gelf.conf" if unit_name == "gelf.service" else f"{INSTANCE}.conf"
        path = etc_root / "etc" / "gelf" / conf
        path.write_text(config)
        path.chmod(0o600)
        argv, env = service_command(SYSTEMD_DIR / unit, unit_name, etc_root)
        srv = UnitGelfServer(argv, env, sandbox_prefix(parse_unit(SYSTEMD_DIR / unit)), tmp_path, netns)
        request.node._gelf_servers.append(srv)
        return srv.start()

    return start


def need_setpriv():
    if not shutil.which("setpriv"):
        pytest.fail("needs setpriv (util-linux)")


def test_exec_start_of_both_units_links_two_taps(need_root, unit_server, ns_addr, etc_root):
    """gelf.service and gelf@peer.service, each from its own config; the second dials the first
    (GELF_ARGS --connect), both with the same key file: pings cross between their namespaces."""
    need_setpriv()
    key = etc_root / "etc" / "gelf" / "segment.key"
    dev_a, dev_b = helpers.tap_name(), helpers.tap_name()
    port_a, port_b = helpers.free_port(), helpers.free_port()

    # gelf.service: every variable set, GELF_ARGS quoted (systemd removes the quotes).
    a = unit_server("gelf.service", f'# test config\nGELF_HOST=127.0.0.1\nGELF_PORT={port_a}\n'
                                    f'GELF_ARGS="--dev {dev_a} --key-file {key}"\n')
    # gelf@peer.service: GELF_HOST from the unit's default, GELF_ARGS unquoted.
    b = unit_server("gelf@.service", f"GELF_PORT={port_b}\nGELF_ARGS=--dev {dev_b} --key-file {key} "
                                     f"--connect ws://127.0.0.1:{port_a}/ws\n")
    assert a.argv == [INSTALLED_PATH, "--host", "127.0.0.1", "--dev", dev_a, "--key-file", str(key),
                      str(port_a)]
    assert b.argv == [INSTALLED_PATH, "--host", "127.0.0.1", "--dev", dev_b, "--key-file", str(key),
                      "--connect", f"ws://127.0.0.1:{port_a}/ws", str(port_b)]
    assert b.env["PYTHONUNBUFFERED"] == "1"

    unit = parse_unit(SYSTEMD_DIR / "gelf.service")
    for srv in (a, b):
        assert int(srv.status("CapBnd"), 16) == cap_mask(unit) == (1 << 12) | (1 << 10)
        assert srv.status("NoNewPrivs") == "1"
        assert srv.logs[-1].wait_line(r"\[Gelf\] Encryption enabled", 30), srv.log_text()

    ns_a = ns_addr(a, ADDR[0])
    ns_b = ns_addr(b, ADDR[1])
    assert_pings(ns_a, ADDR[1], count=10)
    assert_pings(ns_b, ADDR[0], count=5)

    # systemctl stop sends SIGTERM: exit status 0 (a clean stop, no restart) and the tap is gone.
    for srv, ns in ((b, ns_b), (a, ns_a)):
        assert srv.stop() == 0, srv.log_text()
        assert not helpers.iface_exists(srv.dev, ns)


def test_exec_start_runs_ip_for_address_and_bridge(need_root, unit_server, netns):
    """Under the unit's capability bounding set and NoNewPrivileges, the ip(8) children gelf
    starts for --address and --bridge still work (server and tap inside a test namespace)."""
    need_setpriv()
    ns = netns()
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "link", "add", "gbr0", "type", "bridge"])
    dev, port = helpers.tap_name(), helpers.free_port()
    srv = unit_server("gelf@.service", f"GELF_PORT={port}\n"
                                       f"GELF_ARGS=--dev {dev} --address 10.77.0.9/24 --bridge gbr0\n",
                      netns=ns)
    info = json.loads(run(["ip", "-n", ns, "-j", "addr", "show", "dev", dev]).stdout)[0]
    assert info.get("master") == "gbr0", info
    assert any(a.get("local") == "10.77.0.9" and a.get("prefixlen") == 24 for a in info["addr_info"]), info
    assert int(srv.status("CapBnd"), 16) == cap_mask(parse_unit(SYSTEMD_DIR / "gelf@.service"))
    assert srv.stop() == 0, srv.log_text()
    assert not helpers.iface_exists(dev, ns)


# ---------------------------------------------------------------- make install / uninstall

def make(*args, timeout=60):
    if not shutil.which("make"):
        pytest.fail("needs make")
    res = run(["make", "--no-print-directory", "-C", str(REPO)] + list(args), check=False, timeout=timeout)
    assert res.returncode == 0, f"make {' '.join(args)} -> {res.returncode}\n{res.stdout}{res.stderr}"
    return res.stdout + res.stderr


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_make_install_into_destdir_and_uninstall(tmp_path):
    stage = tmp_path / "stage"
    out = make("install", f"DESTDIR={stage}", timeout=280)
    assert "no systemctl daemon-reload" in out

    # The units, unchanged for the default PREFIX and SYSCONFDIR.
    units = stage / "etc" / "systemd" / "system"
    for name in UNITS:
        assert (units / name).read_text() == (SYSTEMD_DIR / name).read_text()
        assert mode(units / name) == 0o644

    # /etc/gelf: root's alone; the example, and gelf.conf made from it.
    etc = stage / "etc" / "gelf"
    assert mode(etc) == 0o700
    for name in ("gelf.conf.example", "gelf.conf"):
        assert (etc / name).read_text() == EXAMPLE.read_text()
        assert mode(etc / name) == 0o600

    # The command: /usr/local/bin/gelf -> /opt/gelf/bin/gelf, a venv's entry point whose scripts
    # name /opt/gelf (where it will live), not the staging directory.
    link = stage / "usr" / "local" / "bin" / "gelf"
    assert os.readlink(link) == "/opt/gelf/bin/gelf"
    venv = stage / "opt" / "gelf"
    script = venv / "bin" / "gelf"
    assert os.access(script, os.X_OK)
    assert script.read_text().splitlines()[0] in ("#!/opt/gelf/bin/python", "#!/opt/gelf/bin/python3")
    for f in [venv / "pyvenv.cfg"] + [p for p in (venv / "bin").iterdir() if p.is_file()]:
        assert str(stage).encode() not in f.read_bytes(), f"{f} names the staging directory"

    # It runs, from its own venv (not this checkout), with the page's files installed beside it.
    py = str(venv / "bin" / "python")
    res = run([py, str(script), "--version"], cwd="/")
    assert res.stdout.strip().startswith("gelf ")
    res = run([py, "-c", "import gelf.server as s; print(s.__file__); "
                          "print(s.asset_dir('static')); print(s.asset_dir('templates'))"], cwd="/")
    module, static, templates = res.stdout.split()
    assert module.startswith(str(venv / "lib"))
    assert static == str(venv / "share" / "gelf" / "static") and os.path.isfile(f"{static}/gelf.js")
    assert templates == str(venv / "share" / "gelf" / "templates")

    # Installing again keeps an edited gelf.conf and tightens key files to 0600.
    (etc / "gelf.conf").write_text("GELF_PORT=7009\n")
    (etc / "lab.key").write_text(KEY + "\n")
    (etc / "lab.key").chmod(0o644)
    make("install-units", "install-config", f"DESTDIR={stage}")
    assert (etc / "gelf.conf").read_text() == "GELF_PORT=7009\n"
    assert mode(etc / "lab.key") == 0o600

    # Other PREFIX and SYSCONFDIR: the units follow.
    other = tmp_path / "other"
    make("install-units", "install-config", f"DESTDIR={other}", "PREFIX=/usr", "SYSCONFDIR=/srv/etc")
    for name in UNITS:
        text = (other / "etc" / "systemd" / "system" / name).read_text()
        assert "ExecStart=/usr/bin/gelf --host " in text
        assert "EnvironmentFile=/srv/etc/gelf/" in text
        assert INSTALLED_PATH not in text and "=/etc/gelf" not in text
    assert (other / "srv" / "etc" / "gelf" / "gelf.conf").exists()

    # Uninstall removes the units, the command and the venv, and keeps configs and keys.
    out = make("uninstall", f"DESTDIR={stage}")
    assert "kept" in out
    assert not any((units / name).exists() for name in UNITS)
    assert not os.path.lexists(link)
    assert not venv.exists()
    assert not (etc / "gelf.conf.example").exists()
    assert (etc / "gelf.conf").read_text() == "GELF_PORT=7009\n" and (etc / "lab.key").exists()
