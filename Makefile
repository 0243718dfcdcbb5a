# distillery: the two commands a user needs are `make demo` and `make test`.
# Everything runs from the project's own virtual environment (.venv), created on first use.
# State lives inside the project: Prefect's SQLite database and results in .prefect/,
# artifacts in artifacts/, pid files and logs in .run/.

.PHONY: demo test test-all lint venv server worker deploy stop results clean-state

demo: venv        ## start/reuse server + worker, deploy everything, run pipeline/cpu, print the report
	scripts/distillery.sh demo

test: venv        ## lint + format check, then the whole fast test suite (what CI runs)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/python -m pytest

lint: venv        ## apply the formatter and the linter's safe fixes
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

test-all: venv    ## also the slow end-to-end tests
	.venv/bin/python -m pytest -m ""

venv: .venv/.installed

.venv/.installed: pyproject.toml scripts/install.sh
	scripts/install.sh

server: venv      ## start (or reuse) the Prefect server on 127.0.0.1
	scripts/distillery.sh server

worker: venv      ## start (or reuse) a process worker on work pool "local"
	scripts/distillery.sh worker

deploy: venv      ## create work pool "local" and deploy deployments/prefect.yaml
	scripts/distillery.sh deploy

results: venv     ## print the newest metrics table from the artifact store
	scripts/distillery.sh results

stop:             ## stop exactly the server and worker this project started (pid files)
	scripts/distillery.sh stop

clean-state: stop ## forget Prefect state and artifacts (keeps .venv)
	rm -rf .prefect artifacts .run
