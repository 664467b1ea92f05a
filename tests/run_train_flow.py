"""The lens-train flow in a process of its own, for tests that kill it or its Prefect API:

    python -m tests.run_train_flow <output root> [--new-policy] [key=value ...]

prints `STATE <type>` when the flow run ends. A module (not `python -c`) with a main guard: the verifier's
spawned workers re-import the main module.
"""

import sys

if __name__ == "__main__":
    from flows.lens_train import lens_train
    from tests.helpers import SMALL, random_policy, small_params

    root, *rest = sys.argv[1:]
    overrides = [f"run.output_root={root}", *SMALL, "warm_start.enabled=false", "tracking.enabled=false",
                 "data.synthetic.eval_per_level=2", *(a for a in rest if a != "--new-policy")]
    if "--new-policy" in rest:
        random_policy(small_params(root, *overrides[1:]))
    state = lens_train(profile="tiny", algo="lens", overrides=overrides, return_state=True)
    print("STATE", state.type.value, state.message, flush=True)
