# The two commands of the README: `make demo` (set-up + the main job) and `make test` (set-up + tests).
.PHONY: setup demo test test-fast clean

setup:
	@bash infra/setup.sh

demo: setup
	bash infra/demo.sh

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider

test-fast: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

clean:
	rm -rf runs mlruns mlflow.db .prefect
