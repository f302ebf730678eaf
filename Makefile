# gelf: Ethernet over WebSockets.
#   make venv     create .venv and install gelf (pip install -e .)
#   make sysdeps  install the system tools the tests use (Debian, as root)
#   make run      run a gelf server on 127.0.0.1:7001 (needs root)
#   make test     run the test suite (needs root and Chromium for most tests)
#   make bench    run the benchmark (root, < 10 min): table on stdout and in bench/results.md
#                 (BENCH_ARGS=--quick for a smoke run, BENCH_ARGS="--only R1 direct" for some rows)
#   make clean    remove the venv and build/test leftovers
#   make install  install system-wide (as root): venv /opt/gelf, /usr/local/bin/gelf, systemd units,
#                 /etc/gelf/gelf.conf; DESTDIR=/stage stages it instead (README: Running as a service)
#   make uninstall  remove what install put there; keeps /etc/gelf (configs and keys)

PYTHON      ?= python3
VENV        := .venv
VPY         := $(VENV)/bin/python
PORT        ?= 7001
PYTEST_ARGS ?= -ra -v --timeout=300 -p no:cacheprovider
BENCH_ARGS  ?=

SYS_COMMANDS := chromium iperf3 ping ip tcpdump openssl systemd-analyze
SYS_PACKAGES := chromium iperf3 iputils-ping iproute2 tcpdump openssl systemd

.PHONY: venv sysdeps run test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --disable-pip-version-check -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(VPY) -m pip install --disable-pip-version-check -q -r requirements-test.txt
	touch $@

sysdeps:
	@missing=""; \
	for c in $(SYS_COMMANDS); do \
		PATH="$$PATH:/usr/sbin:/sbin" command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; \
	done; \
	if [ -z "$$missing" ]; then \
		echo "sysdeps: all present ($(SYS_COMMANDS))"; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "sysdeps: missing$$missing, installing"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(SYS_PACKAGES); \
	else \
		echo "sysdeps: missing$$missing; as root run: apt-get install -y $(SYS_PACKAGES)"; \
	fi

run: venv
	$(VPY) gelf.py $(PORT)

test: sysdeps $(VENV)/.test-installed
	$(VPY) -m pytest $(PYTEST_ARGS) tests

bench: sysdeps venv
	$(VPY) bench/bench.py $(BENCH_ARGS)

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
