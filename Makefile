# The two commands of the README: `make start` serves the model, `make test` runs every test.
.PHONY: start stop status test lint

start:
	@scripts/setup.sh
	@.venv/bin/python launch.py start

stop status:
	@.venv/bin/python launch.py $@

test:
	@scripts/setup.sh --test
	@scripts/test_prereqs.sh
	.venv/bin/python -m ruff check .
	.venv/bin/python -m ruff format --check .
	.venv/bin/python -m mypy .
	.venv/bin/python -m pytest
