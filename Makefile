# The two commands a fresh machine needs (see README): `make demo` and `make test`.
# Both install what they need: uv (from PyPI) and the locked environment in .venv (uv.lock), compiled to
# bytecode once (every `studio` command and campaign worker process starts seconds faster), with the extras the
# tests exercise: ray (campaigns on Ray), safety (the NudeNet content check) and web (`studio web`); `make test`
# also installs Debian's chromium where it is missing (the browser tests).
UV_VERSION := 0.13.8
EXTRAS := --extra ray --extra safety --extra web
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
PROMPT ?= a 30-year-old Nordic architect, round glasses, Copenhagen sunlight

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser demo test lint

setup:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --frozen $(EXTRAS) --compile-bytecode

# The main job on the tiny profile: enrol a demo identity (scikit-image's public-domain astronaut photo),
# then draft two pictures and refine their faces to it.
demo: setup
	$(UV) run --frozen python -c "from pathlib import Path; from skimage import data; from studio.imageio import write_image; write_image(Path('outputs/demo/astronaut.png'), data.astronaut()[:, :, ::-1].copy())"
	$(UV) run --frozen studio identity add demo-astronaut outputs/demo/astronaut.png --replace --profile tiny --consent "demo: scikit-image sample photo, public domain"
	$(UV) run --frozen studio generate "$(PROMPT)" --profile tiny -n 2 --identity demo-astronaut

# sd-parsers (an independent A1111 infotext parser) lives in its own venv: the tests read our metadata with it.
SD_PARSERS := sd-parsers==0.6

# The browser tests drive Debian's Chromium with Playwright (Playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: setup browser
	$(UV) venv --quiet --allow-existing --python 3.11 .venv-sdparsers
	$(UV) pip install --quiet --python .venv-sdparsers/bin/python "$(SD_PARSERS)"
	$(UV) run --frozen ruff check .
	STUDIO_REQUIRE_BROWSER=1 STUDIO_SD_PARSERS_PYTHON=$(CURDIR)/.venv-sdparsers/bin/python \
		$(UV) run --frozen $(EXTRAS) pytest

lint: setup
	$(UV) run --frozen ruff check .
