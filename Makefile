# gelf: Ethernet over WebSockets.
#   make setup    install what gelf needs (Debian packages as root, then .venv): after it,
#                 `sudo python gelf.py --host 0.0.0.0 --enc 7001` runs from the checkout
#   make run      set up, then run a gelf server: PORT=7001 and ARGS="--host 0.0.0.0 --enc ..."
#   make venv     create .venv and install gelf (pip install -e .); remakes a half-made .venv
#   make sysdeps  install the system tools gelf and its tests use (Debian, as root)
#   make test     set up everything the tests need, then run them (root; Chromium for most)
#   make bench    run the benchmark (root, < 20 min): LAN rows and the pressure part (~10 min), then
#                 the WAN part (~7 min);
#                 tables on stdout and in bench/results.md (BENCH_ARGS=--quick for a smoke run,
#                 BENCH_ARGS="--only R1 direct" for some LAN rows, BENCH_ARGS="--only wan" for the WAN part)
#   make soak     10 minutes of traffic with page reloads and relay restarts (root): RSS, links, log
#                 errors on stdout and in bench/soak.md (SOAK_ARGS="--minutes 2" for a short one)
#   make clean    remove the venv and build/test leftovers
#   make install  install system-wide (as root): venv /opt/gelf, /usr/local/bin/gelf, systemd units,
#                 /etc/gelf/gelf.conf; DESTDIR=/stage stages it instead (README: Running as a service)
#   make uninstall  remove what install put there; keeps /etc/gelf (configs and keys)

PYTHON      ?= python3
VENV        := .venv
VPY         := $(VENV)/bin/python
PORT        ?= 7001
ARGS        ?=
PYTEST_ARGS ?= -ra -v --timeout=300 -p no:cacheprovider
BENCH_ARGS  ?=
SOAK_ARGS   ?=

# What running gelf needs (python is python3, so the seed's `sudo python gelf.py` works), and
# what the tests and the benchmark need on top: command to look for, and Debian package.
RUN_DEPS  := sudo:sudo python:python-is-python3 ip:iproute2 python3-venv:python3-venv
TEST_DEPS := $(RUN_DEPS) chromium:chromium iperf3:iperf3 ping:iputils-ping tcpdump:tcpdump \
             openssl:openssl systemd-analyze:systemd nft:nftables nginx:nginx-light wrk:wrk

.PHONY: setup venv sysdeps sysdeps-run install-deps run test bench soak clean

setup: sysdeps-run venv

venv: $(VENV)/.installed

# A venv left half-made (python3 -m venv fails without python3-venv, and leaves .venv/bin/python
# without pip behind) is made again instead of failing forever.
$(VENV)/.installed: setup.py pyproject.toml
	@if [ -e $(VENV) ] && ! $(VPY) -m pip --version >/dev/null 2>&1; then \
		echo "venv: $(VENV) is half-made (was python3-venv missing?): making it again"; rm -rf $(VENV); \
	fi
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "venv: '$(PYTHON) -m venv' failed: install python3-venv (sudo make sysdeps-run)" >&2; exit 1; }
	$(VPY) -m pip install --disable-pip-version-check -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(VPY) -m pip install --disable-pip-version-check -q -r requirements-test.txt
	touch $@

sysdeps-run:
	@$(MAKE) -s --no-print-directory install-deps DEPS="$(RUN_DEPS)"

sysdeps:
	@$(MAKE) -s --no-print-directory install-deps DEPS="$(TEST_DEPS)"

# Installs the Debian packages of DEPS whose command is missing (python3-venv: whose module is),
# looking where sudo looks (its secure_path), not in a user's own PATH.
SYSTEM_PATH := /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
install-deps:
	@missing=""; \
	for dep in $(DEPS); do \
		cmd=$${dep%%:*}; pkg=$${dep#*:}; \
		if [ "$$cmd" = python3-venv ]; then $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null && continue; \
		elif PATH=$(SYSTEM_PATH) command -v $$cmd >/dev/null 2>&1; then continue; fi; \
		missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then \
		echo "sysdeps: all present"; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "sysdeps: installing$$missing"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	else \
		echo "sysdeps: missing$$missing; run as root (sudo make ...), or: sudo apt-get install -y$$missing" >&2; \
		exit 1; \
	fi

run: setup
	$(VPY) gelf.py $(ARGS) $(PORT)

test: sysdeps $(VENV)/.test-installed
	$(VPY) -m pytest $(PYTEST_ARGS) tests

bench: sysdeps venv
	$(VPY) bench/bench.py $(BENCH_ARGS)

soak: sysdeps venv
	$(VPY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# ---------------------------------------------------------------- install (systemd service)
# Paths as the system will see them; DESTDIR is prepended to every one when files are written.
DESTDIR    ?=
PREFIX     ?= /usr/local
GELF_HOME  ?= /opt/gelf
SYSCONFDIR ?= /etc
UNITDIR    ?= /etc/systemd/system
PIP_ARGS   ?=
UNITS      := gelf.service gelf@.service
# The units and the sample config name /usr/local/bin/gelf and /etc/gelf: follow PREFIX/SYSCONFDIR.
UNIT_SED   := sed -e 's|/usr/local/bin/gelf|$(PREFIX)/bin/gelf|g' -e 's|/etc/gelf/|$(SYSCONFDIR)/gelf/|g'
# systemctl only on a machine booted with systemd (what sd_booted() checks), never when staging.
SYSTEMD_UP := test -z "$(DESTDIR)" && test -d /run/systemd/system

.PHONY: install install-venv install-units install-config uninstall

install: install-venv install-units install-config
	@if $(SYSTEMD_UP); then \
		systemctl daemon-reload; \
		echo "install: done. Edit $(SYSCONFDIR)/gelf/gelf.conf, then: systemctl enable --now gelf"; \
		echo "install: running services keep the old code until: systemctl try-restart gelf 'gelf@*'"; \
	else \
		echo "install: systemd is not running here (or DESTDIR is set): no systemctl daemon-reload"; \
	fi

# A venv of its own under GELF_HOME, with gelf and its dependencies (not editable), and the command
# in PREFIX/bin. When staging into DESTDIR, the venv's scripts are rewritten to name GELF_HOME.
install-venv:
	@case "$$($(PYTHON) -c 'import os, sys; print(os.path.realpath(sys.executable))')" in \
		/home/*|/root/*|/run/user/*) echo "install: warning: $(PYTHON) lives under a home directory," \
			"which the service cannot see (ProtectHome=yes): use PYTHON=/usr/bin/python3" >&2;; \
	esac
	$(PYTHON) -m venv $(DESTDIR)$(GELF_HOME)
	@# Built from a copy, so that no build/ or *.egg-info (owned by root) is left in the checkout.
	src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
	tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
		--exclude='./*.egg-info' --exclude=./tests . | tar -xf - -C "$$src" && \
	$(DESTDIR)$(GELF_HOME)/bin/python -m pip install --disable-pip-version-check -q --upgrade $(PIP_ARGS) "$$src"
	@if [ -n "$(DESTDIR)" ]; then \
		grep -rlF "$(DESTDIR)$(GELF_HOME)" $(DESTDIR)$(GELF_HOME)/bin $(DESTDIR)$(GELF_HOME)/pyvenv.cfg \
			| xargs -r sed -i 's|$(DESTDIR)$(GELF_HOME)|$(GELF_HOME)|g'; \
	fi
	install -d -m 0755 $(DESTDIR)$(PREFIX)/bin
	ln -sfn $(GELF_HOME)/bin/gelf $(DESTDIR)$(PREFIX)/bin/gelf

install-units:
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	@for u in $(UNITS); do \
		echo "install: $(DESTDIR)$(UNITDIR)/$$u"; \
		$(UNIT_SED) systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u.tmp && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u.tmp \
			&& mv -f $(DESTDIR)$(UNITDIR)/$$u.tmp $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done

# /etc/gelf is root's alone (0700) and so are the key and token files in it (0600: gelf refuses
# group- or world-readable ones). An existing gelf.conf is never overwritten; the example always is.
install-config:
	install -d -m 0700 $(DESTDIR)$(SYSCONFDIR)/gelf
	chmod 0700 $(DESTDIR)$(SYSCONFDIR)/gelf
	$(UNIT_SED) systemd/gelf.conf.example > $(DESTDIR)$(SYSCONFDIR)/gelf/gelf.conf.example
	chmod 0600 $(DESTDIR)$(SYSCONFDIR)/gelf/gelf.conf.example
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/gelf/gelf.conf ]; then \
		echo "install: keeping $(DESTDIR)$(SYSCONFDIR)/gelf/gelf.conf"; \
	else \
		echo "install: $(DESTDIR)$(SYSCONFDIR)/gelf/gelf.conf (from gelf.conf.example)"; \
		install -m 0600 $(DESTDIR)$(SYSCONFDIR)/gelf/gelf.conf.example $(DESTDIR)$(SYSCONFDIR)/gelf/gelf.conf; \
	fi
	@for f in $(DESTDIR)$(SYSCONFDIR)/gelf/*.key $(DESTDIR)$(SYSCONFDIR)/gelf/*.token; do \
		if [ -f "$$f" ]; then chmod 0600 "$$f"; echo "install: chmod 0600 $$f"; fi; \
	done

uninstall:
	@if $(SYSTEMD_UP); then \
		systemctl stop gelf.service 'gelf@*.service' || true; \
		systemctl disable gelf.service gelf@.service || true; \
	fi
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS))
	@if [ "$$(readlink $(DESTDIR)$(PREFIX)/bin/gelf)" = "$(GELF_HOME)/bin/gelf" ]; then \
		rm -f $(DESTDIR)$(PREFIX)/bin/gelf; \
	fi
	@if [ -f $(DESTDIR)$(GELF_HOME)/pyvenv.cfg ]; then \
		rm -rf $(DESTDIR)$(GELF_HOME); \
	elif [ -e $(DESTDIR)$(GELF_HOME) ]; then \
		echo "uninstall: $(DESTDIR)$(GELF_HOME) is not a venv: left alone" >&2; \
	fi
	rm -f $(DESTDIR)$(SYSCONFDIR)/gelf/gelf.conf.example
	@rmdir $(DESTDIR)$(SYSCONFDIR)/gelf 2>/dev/null \
		|| echo "uninstall: kept $(DESTDIR)$(SYSCONFDIR)/gelf (configs and keys): remove it yourself"
	@if $(SYSTEMD_UP); then systemctl daemon-reload; fi
