"""Prefect recipes over `lens.stages`: `flows.lens_train.lens_train` ("lens-train") trains and evaluates one
algorithm; `flows.lens_compare.lens_compare` ("lens-compare") runs GRPO and LENS on the same data, seed and
budget and publishes the comparison. Shared tasks and the training session live in `flows.common`.
Deployments are declared in infra/deployments.py."""
