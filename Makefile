# Relay: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 8000
# daphne's own frame limit sits above the relay's RELAY_MAX_FRAME_BYTES so the relay answers
# oversized frames with its own Error/close code.
DAPHNE_FLAGS ?= --websocket-max-message-size 4194304 --websocket-max-frame-size 4194304 --application-close-timeout 40

.PHONY: run serve-prod check-port test install install-dev migrate bench bench-engines bench-turn-model soak clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt requirements-turn-model.txt
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -r requirements-turn-model.txt
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev sdk-js

# Deepgram's JS SDK for tests/live/test_sdk_compat.py, pinned by tests/sdk/js/package-lock.json.
# Installed with `npm ci` when node and npm exist (the JS cases skip without node).
SDK_JS := tests/sdk/js
.PHONY: sdk-js
sdk-js:
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory $(SDK_JS)/node_modules/.installed; \
	else echo "sdk-js: node/npm not found; the JS SDK tests will skip"; fi

$(SDK_JS)/node_modules/.installed: $(SDK_JS)/package.json $(SDK_JS)/package-lock.json
	npm ci --prefix $(SDK_JS) --no-audit --no-fund --loglevel=error
	touch $@

migrate: install
	$(PY) manage.py migrate --noinput

# Says which port to pick instead of daphne's bare "[Errno 98] Address already in use".
check-port: install
	@$(PY) scripts/check_port.py "$(HOST)" "$(PORT)" "make $(firstword $(MAKECMDGOALS) run)"

run: check-port migrate
	@echo "Relay demo: http://$(HOST):$(PORT)/demo/ai-voice/   WebSocket: ws://$(HOST):$(PORT)/v2/listen"
	$(VENV)/bin/daphne -e tcp:port=$(PORT):interface=$(HOST):backlog=1024 $(DAPHNE_FLAGS) transcription_site.asgi:application

# One production process (docs/deploy.md): DJANGO_DEBUG=0, so DJANGO_SECRET_KEY and
# DJANGO_ALLOWED_HOSTS must be set (docs/settings.md). Migrates, collects the static files
# (hashed and compressed; whitenoise serves them), then serves. systemd: relay-setup.service.
serve-prod: export DJANGO_DEBUG = 0
serve-prod: check-port install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v 0
	@echo "Relay (production settings): http://$(HOST):$(PORT)/   WebSocket: ws://$(HOST):$(PORT)/v2/listen"
	exec $(VENV)/bin/daphne -e tcp:port=$(PORT):interface=$(HOST):backlog=1024 $(DAPHNE_FLAGS) transcription_site.asgi:application

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

# The relay benchmark suite (docs/benchmarks.md): bench/results/latest.md, .json and charts.
# BENCH_ARGS=--quick for a small smoke run. Needs PostgreSQL and Redis (see .ci/run).
bench: install-dev
	$(PY) -m bench.run $(BENCH_ARGS)

# A bounded soak with reconnect churn: memory over time and the four stability metrics.
SOAK_ARGS ?= --minutes 30 --streams 50
soak: install-dev
	$(PY) -m bench.soak $(SOAK_ARGS)

# The embedded engine through a real relay (docs/engines.md): 1, 4, 8 and 12 real-time WebSocket
# speakers; latency, WER, early closes, refusals, CPU, RSS, determinism; writes
# bench/results/engines.json, .md and .png (about 12 minutes). BENCH_ENGINES_ARGS=--quick for a smoke run.
bench-engines: install-dev
	$(PY) -m bench.engines $(BENCH_ENGINES_ARGS)

# Smart Turn v3.2 (a turn-detection model whose weights ship in pipecat-ai's wheel,
# requirements-turn-model.txt) against the whisper engine's completion probability
# (docs/engines.md). Writes bench/results/turn-model.md and .json.
bench-turn-model: install-dev
	$(PY) -m bench.turn_model $(BENCH_TURN_MODEL_ARGS)

clean:
	rm -rf $(VENV) staticfiles .pytest_cache
