# make demo      - create .venv, generate the demo world, train the demo model, evaluate it, print results
# make test      - create .venv and run the whole test suite
# make test-fast - the tests not marked slow (the quick loop while editing)
# make app       - the web page (app.py) on the demo model; CHECKPOINT=... FEATURES=images.npz PORT=... to change
# make browser   - install Debian's chromium (apt-get) when /usr/bin/chromium is missing; the web page's test drives it
# make lint      - ruff (configured in pyproject.toml)
# make bench     - run the benchmarks and write bench/RESULTS.md (not part of the tests)
# make bench-gpu - the paper model on one CUDA GPU, written to bench/RESULTS-gpu.md (fails at once without CUDA)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN := runs/demo
MM := runs/demo-matchmap
RESULTS := $(RUN)/results.json
DSVE := --results $(RESULTS) --results-key models.dsve.
MATCHMAP := --results $(RESULTS) --results-key models.matchmap.
CHECKPOINT ?= $(RUN)/best.pth.tar
PORT ?= 7860
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: demo test test-fast lint bench bench-gpu clean app browser

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py --preset demo --out $(RUN) --channels-last --no-progress
	$(PY) eval_retrieval.py -p $(RUN)/best.pth.tar --json $(RUN)/retrieval.json $(DSVE)retrieval --no-progress
	$(PY) pointing_game.py -p $(RUN)/best.pth.tar --split test --size 96 --json $(RUN)/pointing_game.json $(DSVE)pointing_game --overlays $(RUN) --no-progress
	$(PY) pointing_game.py -p $(RUN)/best.pth.tar --split test --size 96 --protocol centre --json $(RUN)/pointing_game_centre.json $(DSVE)pointing_game_centre --no-progress
	$(PY) pointing_game.py -p $(RUN)/best.pth.tar --dataset demo_entities --split test --size 96 --json $(RUN)/pointing_game_entities.json $(DSVE)pointing_game_entities --no-progress
	$(PY) semantic_seg.py -p $(RUN)/best.pth.tar --split test --json $(RUN)/semantic_seg.json $(DSVE)semantic_segmentation --no-progress
	$(PY) semantic_seg.py -p $(RUN)/best.pth.tar --split test --protocol ranked --json $(RUN)/semantic_seg_ranked.json $(DSVE)semantic_segmentation_ranked --no-progress
	$(PY) localize.py -p $(RUN)/best.pth.tar -i "$$(ls data/demo/images/val2014/*.jpg | head -n 1)" -t "a red diamond" -t "a green rhombus" -t "a blue circle" -o $(RUN)/localize.png
	$(PY) train.py --preset demo-matchmap --out $(MM) --channels-last --no-progress
	$(PY) eval_retrieval.py -p $(MM)/best.pth.tar --json $(MM)/retrieval.json $(MATCHMAP)retrieval --no-progress
	$(PY) pointing_game.py -p $(MM)/best.pth.tar --split test --size 96 --json $(MM)/pointing_game.json $(MATCHMAP)pointing_game --no-progress
	$(PY) pointing_game.py -p $(MM)/best.pth.tar --dataset demo_entities --split test --size 96 --json $(MM)/pointing_game_entities.json $(MATCHMAP)pointing_game_entities --no-progress
	$(PY) pointing_game.py -p $(MM)/best.pth.tar --dataset demo_entities --split test --protocol das2019 --json $(MM)/pointing_game_entities_das2019.json $(MATCHMAP)pointing_entities_das2019 --no-progress
	@echo "results: $(RESULTS)"

test: $(STAMP) browser
	$(PY) -m pytest

browser:
	test -x $(CHROMIUM) || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

app: $(STAMP)
	$(PY) app.py -p $(CHECKPOINT) --port $(PORT) $(if $(FEATURES),--features $(FEATURES))

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/run.py

bench-gpu: $(STAMP)
	$(PY) bench/gpu.py

clean:
	rm -rf $(RUN) $(MM) data/demo
