# gelf: Ethernet over WebSockets.
#   make venv     create .venv and install gelf (pip install -e .)
#   make sysdeps  install the system tools the tests use (Debian, as root)
#   make run      run a gelf server on 127.0.0.1:7001 (needs root)
#   make test     run the test suite (needs root and Chromium for most tests)
#   make bench    run the benchmark (root, < 10 min): table on stdout and in bench/results.md
#                 (BENCH_ARGS=--quick for a smoke run, BENCH_ARGS="--only R1 direct" for some rows)
#   make clean    remove the venv and build/test leftovers

PYTHON      ?= python3
VENV        := .venv
VPY         := $(VENV)/bin/python
PORT        ?= 7001
PYTEST_ARGS ?= -ra -v --timeout=300 -p no:cacheprovider
BENCH_ARGS  ?=

SYS_COMMANDS := chromium iperf3 ping ip tcpdump openssl
SYS_PACKAGES := chromium iperf3 iputils-ping iproute2 tcpdump openssl

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
