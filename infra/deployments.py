"""Every Prefect deployment of the project, declared once, and the process that serves them.

    lens-train/tiny      served by this process (infra/services.sh starts it): runs on this machine
    lens-compare/tiny    served by this process
    lens-study/tiny      served by this process
    lens-train/paper     registered for the GPU work pool LENS_GPU_POOL (default "lens-gpu"); a worker on
                         a GPU box runs it: `prefect worker start --pool lens-gpu` in a checkout of this
                         repository with the environment installed

Commands (PREFECT_API_URL must point at the server; infra/services.sh sets it):

    python infra/deployments.py serve      register the GPU deployment, then serve the local ones (blocks)
    python infra/deployments.py register   register every deployment once, serve nothing (CI, team setups)
    python infra/deployments.py list       print the declarations

Parameters are typed and the API enforces each deployment's parameter schema, so an unknown profile or
algo is refused before a flow run exists. When LENS_TRACKING_URI is set in the serving process's
environment (services.sh sets it to the local MLflow server), its flow runs log to that MLflow server
(flows.runner.resolve_params); a run's `-p 'overrides=[...]'` come on top of that.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # `python infra/deployments.py` from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

GPU_POOL = os.environ.get("LENS_GPU_POOL", "lens-gpu")
SERVE_LIMIT = int(os.environ.get("LENS_SERVE_LIMIT", "1"))  # runs share runs/<profile>/: one at a time


@dataclass(frozen=True)
class Deployment:
    flow: str                       # "lens-train" | "lens-compare" | "lens-study"
    name: str
    parameters: dict
    description: str
    work_pool: str | None = None    # None: served by this process
    job_variables: dict = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"


def declared() -> list[Deployment]:
    return [
        Deployment("lens-train", "tiny", {"profile": "tiny", "algo": "lens", "overrides": []},
                   "One algorithm on the tiny profile (CPU, minutes): -p algo=grpo|lens, -p 'overrides=[...]'.",
                   tags=("tiny", "cpu")),
        Deployment("lens-compare", "tiny", {"profile": "tiny", "overrides": []},
                   "GRPO vs LENS on the tiny profile: same data, seed and budget; per-level comparison.",
                   tags=("tiny", "cpu")),
        Deployment("lens-study", "tiny", {"profile": "tiny", "overrides": []},
                   "Estimators x seeds on the tiny profile from one warm start: CIs over seeds, paired differences.",
                   tags=("tiny", "cpu")),
        Deployment("lens-train", "paper", {"profile": "paper", "algo": "lens", "overrides": []},
                   "The paper's setup (Qwen2.5-3B on MATH, vLLM rollouts) on a GPU work pool.",
                   work_pool=GPU_POOL, job_variables={"env": {"TOKENIZERS_PARALLELISM": "false"}},
                   tags=("paper", "gpu")),
    ]


def _flow(name: str):
    from flows.lens_compare import lens_compare
    from flows.lens_study import lens_study
    from flows.lens_train import lens_train

    return {"lens-train": lens_train, "lens-compare": lens_compare, "lens-study": lens_study}[name]


def runner_deployment(d: Deployment):
    """The Prefect RunnerDeployment of a declaration (parameter schema enforced)."""
    from prefect.types.entrypoint import EntrypointType

    # "flows.lens_train.lens_train": importable wherever the project is installed, whatever the cwd.
    kwargs = dict(name=d.name, parameters=d.parameters, description=d.description, tags=list(d.tags),
                  enforce_parameter_schema=True, entrypoint_type=EntrypointType.MODULE_PATH)
    if d.work_pool:
        kwargs |= dict(work_pool_name=d.work_pool, job_variables=d.job_variables)
    return _flow(d.flow).to_deployment(**kwargs)


def ensure_work_pool(name: str) -> None:
    """Create the (process-type) work pool if the server has none of that name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", description="GPU machines running `prefect worker start --pool ...`",
                base_job_template=ProcessWorker.get_default_base_job_template()))
            print(f"created work pool {name!r} (type process)")


def register_remote(deployments: list[Deployment]) -> list[str]:
    """Register the work-pool deployments (their runs wait for a worker of that pool)."""
    names = []
    for d in deployments:
        if d.work_pool:
            ensure_work_pool(d.work_pool)
            runner_deployment(d).apply()
            names.append(d.full_name)
            print(f"registered {d.full_name} on work pool {d.work_pool!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "register", "list"])
    args = parser.parse_args(argv)
    deployments = declared()
    if args.command == "list":
        for d in deployments:
            where = f"work pool {d.work_pool}" if d.work_pool else "served locally"
            print(f"{d.full_name:22s} {where:24s} {d.parameters}")
        return 0
    if not os.environ.get("PREFECT_API_URL"):
        print("PREFECT_API_URL is not set: start the services (infra/services.sh start) or export it",
              file=sys.stderr)
        return 2
    register_remote(deployments)
    local = [d for d in deployments if not d.work_pool]
    if args.command == "register":
        for d in local:
            runner_deployment(d).apply()
            print(f"registered {d.full_name} (served by `python infra/deployments.py serve`)")
        return 0
    from prefect import serve

    tracking = os.environ.get("LENS_TRACKING_URI")
    print(f"serving {', '.join(d.full_name for d in local)} (at most {SERVE_LIMIT} run(s) at a time); "
          f"MLflow tracking: {tracking or 'as params.yaml says'}", flush=True)
    serve(*(runner_deployment(d) for d in local), limit=SERVE_LIMIT, print_starting_message=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
