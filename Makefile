.PHONY: setup demo test lint

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/trojscan demo

test: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/lint-imports
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/lint-imports
