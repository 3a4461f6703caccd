# idle-cull: `make install`, `make test`, `make lint`, `make bench`, `make bench-hub`, `make demo`,
# `make image`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NODE_DIR := .node
NODE_BIN := $(abspath $(NODE_DIR))/node_modules/.bin
CHP := $(NODE_BIN)/configurable-http-proxy
STAMP := $(VENV)/.installed

.PHONY: install proxy test lint bench bench-hub demo clean upstream

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

install: $(STAMP)

# The end-to-end tests run a real configurable-http-proxy in front of a real JupyterHub.
$(CHP):
	npm install --silent --no-audit --no-fund --prefix $(NODE_DIR) configurable-http-proxy@5.3.0

proxy: $(CHP)

# Needs no root: checks whose tools are missing (systemd-analyze, flock, podman, ...), or that
# act as another user of the machine (root only), are skipped, and pytest's summary at the end
# names each one with what it lacked.
# `make test-tools` (root, Debian) installs them; CI does, and fails on any such skip.
test: install $(CHP) upstream
	PATH="$(NODE_BIN):$$PATH" $(PY) -m pytest -q

# tests/test_migration.py runs the upstream culler beside idle-cull: 2.0.0 (the benchmark's venv,
# below) and 1.4.0, which Zero to JupyterHub and The Littlest JupyterHub pin. Outside CI an
# install that fails only makes that test skip; in CI (CI=true or IDLE_CULL_REQUIRE_ALL=1) it
# fails `make test`.
UPSTREAM_1_4 := .bench-venv/upstream-1.4

$(UPSTREAM_1_4)/.installed:
	$(PYTHON) -m venv $(UPSTREAM_1_4)
	$(UPSTREAM_1_4)/bin/pip install -q --disable-pip-version-check jupyterhub-idle-culler==1.4.0 \
		tornado==6.6.1 python-dateutil==4.0.0 packaging==26.4
	touch $@

upstream:
	@$(MAKE) --no-print-directory $(BENCH_VENV)/.installed $(UPSTREAM_1_4)/.installed || { \
		test "$$CI" != true && test "$$IDLE_CULL_REQUIRE_ALL" != 1 && \
		echo "upstream jupyterhub-idle-culler not installed: the migration test will skip" >&2; }

lint: install
	$(PY) -m ruff check idle_cull.py tests
	$(PY) -m ruff format --check idle_cull.py tests

clean:
	rm -rf $(VENV) $(NODE_DIR) .pytest_cache .ruff_cache .hypothesis

# --- Scheduling (README "Running on a schedule") ---
# What the scheduler and image checks run, from Debian's packages: systemd-analyze and systemd
# itself (systemd), flock and unshare (util-linux), and the container engine with what makes the
# image's base (podman, runc, mmdebstrap).
TEST_TOOLS := systemd-analyze:systemd flock:util-linux unshare:util-linux podman:podman \
	runc:runc mmdebstrap:mmdebstrap
test-tools:
	@missing=; for pair in $(TEST_TOOLS); do \
		command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	[ -z "$$missing" ] || { apt-get update -q && \
		apt-get install -y -q -o DPkg::Lock::Timeout=300 \
		--no-install-recommends $$missing; }

# Copies the units and the example settings, then enables the timer. Expects idle-cull in
# /opt/idle-cull/venv and the Hub token in /etc/idle-cull/token (README). Never overwrites an
# existing /etc/idle-cull/idle-cull.env. With DESTDIR set it only lays out files under DESTDIR
# and enables the timer there, offline (the tests use that).
install-systemd:
	@test -s $(DESTDIR)/etc/idle-cull/token || \
		{ echo "install-systemd: put the Hub API token in $(DESTDIR)/etc/idle-cull/token first" >&2; exit 1; }
	install -d -m 0755 $(DESTDIR)/etc/systemd/system
	install -m 0644 systemd/idle-cull.service systemd/idle-cull.timer $(DESTDIR)/etc/systemd/system/
	test -e $(DESTDIR)/etc/idle-cull/idle-cull.env || \
		install -m 0644 systemd/idle-cull.env.example $(DESTDIR)/etc/idle-cull/idle-cull.env
ifeq ($(DESTDIR),)
	systemctl daemon-reload
	systemctl enable --now idle-cull.timer
else
	systemctl --root=$(DESTDIR) enable idle-cull.timer
endif

.PHONY: test-tools install-systemd

# --- make demo (README "Try it") ---
# A throw-away JupyterHub + proxy on 127.0.0.1 with a few users; the culler runs as a dry run,
# then for real, and everything started is stopped again (tests/demo.py).
demo: install $(CHP)
	PATH="$(NODE_BIN):$$PATH" $(PY) tests/demo.py

# --- Benchmark (issue 6; not part of `make test`) ---
# Ours against the upstream jupyterhub-idle-culler 2.0.0, which gets a venv of its own.
# Prints the results table and PASS/FAIL per target (exit 1 on a FAIL); about 2 minutes, with
# the looks row (1,000 servers looked inside, each with a token of its owner made for it and
# revoked after: 3.5 requests per server; target 1.5x the bound). Sizes are user counts; the
# 100,000-user runs add about 18 minutes: make bench SIZES=1000,10000,100000
# REPEAT=3 shows the median of 3 runs (this machine is shared; single runs vary by ~15%).
BENCH_VENV := .bench-venv/upstream
SIZES ?= 1000,10000
LATENCIES ?= 0,10
# A small Hub far away: start-up and the first round trips weigh most there.
CASES ?= 400@50
REPEAT ?= 1

$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --disable-pip-version-check jupyterhub-idle-culler==2.0.0 \
		tornado==6.6.1 traitlets==5.16.1 python-dateutil==4.0.0 packaging==26.4
	touch $@

bench: install $(BENCH_VENV)/.installed
	$(PY) tests/bench/bench.py --sizes $(SIZES) --latencies $(LATENCIES) --cases "$(CASES)" \
		--repeat $(REPEAT) --upstream-python $(BENCH_VENV)/bin/python

# --- Real-Hub benchmark (issue 18; not part of `make test`) ---
# What a pass costs a real JupyterHub (from .venv, with the real configurable-http-proxy) and a
# user of it: 5,000 users, 1,000 running stand-in servers, 500 of them idle, restored before each
# pass; upstream 2.0.0 and each variant of ours take turns, HUB_PAIRS times each; then the Hub's
# CPU per request for each kind of token. Prints the table and PASS/FAIL per target (README "What
# a pass costs the Hub"; exit 1 on a FAIL). About 10 minutes with the defaults below.
# HUB_VARIANTS: NAME[@TOKEN]=ARGS,... (TOKEN: config, the service's api_token from the Hub's
# config, or generated, one the Hub made); the first is held to the targets.
HUB_PAIRS ?= 3
HUB_VARIANTS ?= ours=,ours-generated-token@generated=,ours-c1=--concurrency 1

bench-hub: install $(CHP) $(BENCH_VENV)/.installed
	PATH="$(NODE_BIN):$$PATH" $(PY) tests/bench/realhub_bench.py --pairs $(HUB_PAIRS) \
		--variants "$(HUB_VARIANTS)" --upstream-python $(BENCH_VENV)/bin/python

# --- Container image (README "Kubernetes CronJob") ---
# The image installs examples/kubernetes/requirements.lock with `pip install --require-hashes`:
# requirements.txt's pins and what they pull in, each with the sha256 of every file PyPI serves
# for it (all platforms). LOCK_DATE pins what requirements.txt leaves open (certifi, idna,
# charset-normalizer): nothing uploaded to PyPI after it is considered, so `make lock` gives the
# same file on any day until requirements.txt or LOCK_DATE changes (a test reruns it and
# compares). To move the dependencies on: change requirements.txt and/or LOCK_DATE, then
# `make lock`.
LOCK := examples/kubernetes/requirements.lock
LOCK_DATE := 2026-12-04T00:00:00Z

lock: install
	$(VENV)/bin/uv pip compile --quiet --generate-hashes --universal --python-version 3.11 \
		--exclude-newer $(LOCK_DATE) --custom-compile-command 'make lock' requirements.txt -o $(LOCK)

# Built with podman from a base made of Debian's packages by mmdebstrap, so no image registry
# is needed (the Dockerfile's own default base is the public python:3.12-slim, pinned by digest).
# The base tarball is kept in IMAGE_CACHE, named by a hash of the command that makes it; the
# engine's layer cache (/var/lib/containers) keeps the rest, so a rebuild with unchanged inputs
# takes seconds. Needs root (rootful podman) and PyPI for the pip install inside the build.
IMAGE ?= localhost/idle-cull:latest
IMAGE_CACHE ?= /var/cache/idle-cull
# Python 3.11 and its venv module, without documentation (copyright files kept).
MMDEBSTRAP := mmdebstrap --quiet --variant=essential --include=python3-venv,ca-certificates \
	'--dpkgopt=path-exclude=/usr/share/man/*' '--dpkgopt=path-exclude=/usr/share/info/*' \
	'--dpkgopt=path-exclude=/usr/share/locale/*' '--dpkgopt=path-exclude=/usr/share/doc/*' \
	'--dpkgopt=path-include=/usr/share/doc/*/copyright' bookworm
BASE_KEY := $(shell echo "$(MMDEBSTRAP)" | sha256sum | cut -c1-16)
BASE_TAR := $(IMAGE_CACHE)/base-$(BASE_KEY).tar
BASE_IMAGE := localhost/idle-cull-base:$(BASE_KEY)
# RUN steps in a chroot, not an OCI runtime: builds where containers get no cgroups or rlimits.
# The build (not the image) sees the host's pip settings and CA certificates, for a machine
# whose PyPI comes through a mirror or a proxy with its own CA (an empty /etc/pip.conf, the
# mount point, stays in the image).
IMAGE_BUILD_FLAGS := --isolation chroot --network host \
	$(foreach f,/etc/pip.conf /etc/ssl/certs,$(if $(wildcard $f),--volume $f:$f:ro))

# Built under a name of its own ($$$$: the shell's PID), then renamed: two checkouts building at
# once never write into one file.
$(BASE_TAR):
	mkdir -p $(IMAGE_CACHE)
	$(MMDEBSTRAP) $(IMAGE_CACHE)/base-$(BASE_KEY).$$$$.tar && mv $(IMAGE_CACHE)/base-$(BASE_KEY).$$$$.tar $@

image-base: $(BASE_TAR)
	@podman image exists $(BASE_IMAGE) || podman import --quiet $(BASE_TAR) $(BASE_IMAGE)
	@echo $(BASE_IMAGE)

# The image that IMAGE named before is removed when nothing else uses or names it, so that
# rebuilds leave no untagged images behind.
image: image-base
	@previous=$$(podman image inspect --format '{{.Id}}' $(IMAGE) 2>/dev/null); \
	podman build --quiet $(IMAGE_BUILD_FLAGS) --build-arg BASE=$(BASE_IMAGE) \
		-f examples/kubernetes/Dockerfile --ignorefile examples/kubernetes/Dockerfile.dockerignore \
		-t $(IMAGE) . >/dev/null && \
	if [ -n "$$previous" ] && [ "$$(podman image inspect --format '{{.Id}}' $(IMAGE))" != "$$previous" ]; \
		then podman image rm $$previous >/dev/null 2>&1 || true; fi
	@podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' $(IMAGE)

.PHONY: lock image-base image
