#!/usr/bin/env bash
# The README's main command: set up the environment, start the local services, register the deployments,
# run GRPO vs LENS on the tiny profile through Prefect, and say where to look.
#
#   bash infra/demo.sh                                   # the tiny profile as params.yaml defines it
#   bash infra/demo.sh -p 'overrides=["train.steps=10"]' # extra arguments go to `prefect deployment run`
#
# Services stay up afterwards (browse the UIs); `infra/services.sh stop` ends them. Ports and homes:
# see infra/services.sh (LENS_PREFECT_PORT, LENS_MLFLOW_PORT, ...).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=$ROOT/.venv/bin
t0=$SECONDS
step() { printf '\n\033[1m==> %s\033[0m  (%ds)\n' "$*" $((SECONDS - t0)); }

step "1/5 environment: infra/setup.sh"
bash infra/setup.sh

step "2/5 services on 127.0.0.1: Prefect server, MLflow server, deployment-serving process"
bash infra/services.sh start
eval "$(bash infra/services.sh env)"

step "3/5 deployments (declared in infra/deployments.py)"
"$BIN/prefect" deployment ls

step "4/5 prefect deployment run lens-compare/tiny --watch  (logs stream below; the UI shows the task graph)"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
"$BIN/prefect" deployment run lens-compare/tiny --watch "$@" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e
flow_run_id=$(grep -oE 'UUID: [0-9a-f-]{36}' "$out" | head -n1 | cut -d' ' -f2 || true)

step "5/5 where to look"
"$BIN/python" - "$flow_run_id" "$rc" <<'EOF'
import json, os, sys, urllib.parse, urllib.request

flow_run_id, rc = sys.argv[1], int(sys.argv[2])
api = os.environ["PREFECT_API_URL"]
ui = api[: -len("/api")] if api.endswith("/api") else api
mlflow_ui = os.environ["MLFLOW_TRACKING_URI"]
print(f"Prefect UI : {ui}" + (f"/runs/flow-run/{flow_run_id}" if flow_run_id else ""))

def get(url, data=None):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())

try:  # the MLflow parent run of this flow run (tagged with its id: flows/runner.py PrefectRunner.run_tags)
    exp = get(f"{mlflow_ui}/api/2.0/mlflow/experiments/get-by-name?"
              + urllib.parse.urlencode({"experiment_name": "lens-tiny"}))["experiment"]
    runs = get(f"{mlflow_ui}/api/2.0/mlflow/runs/search",
               {"experiment_ids": [exp["experiment_id"]], "max_results": 10,
                "filter": f"tags.`prefect.flow_run_id` = '{flow_run_id}'"}).get("runs", [])
    parent = next((r for r in runs if "mlflow.parentRunId" not in {t["key"] for t in r["data"].get("tags", [])}), None)
    where = f"#/experiments/{exp['experiment_id']}" + (f"/runs/{parent['info']['run_id']}" if parent else "")
    print(f"MLflow UI  : {mlflow_ui}/{where}   (compare the grpo and lens child runs there)")
except Exception as exc:  # tracking may be off in params.yaml: still say where the UI is
    print(f"MLflow UI  : {mlflow_ui}  ({exc})")

try:  # the comparison table this run published
    arts = get(f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": ["tiny-compare"]},
                                                         "flow_run_id": {"any_": [flow_run_id]}}})
except Exception:
    arts = []
if arts:
    print("Comparison : Prefect artifact 'tiny-compare'; files in runs/tiny/compare/ "
          "(compare.md, compare.csv, compare.json, accuracy_by_level.png, learning_curves.png)\n")
    print(arts[0]["data"])
elif rc == 0 and os.path.exists("runs/tiny/compare/compare.md"):
    print("Comparison : runs/tiny/compare/compare.md\n")
    print(open("runs/tiny/compare/compare.md").read())
else:
    print("Comparison : none published (the flow run did not complete); logs: .services/logs/deployments.log")
EOF
printf '\nTotal %ds. Services keep running: infra/services.sh status | stop\n' $((SECONDS - t0))
exit "$rc"
