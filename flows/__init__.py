"""Prefect recipes over lens.pipeline: `lens-train` (flows.lens_train) trains and evaluates one arm;
`lens-compare` (flows.lens_compare) runs every arm of compare.arms and compares them. flows.runner runs
the pipeline's phases as Prefect tasks. Deployments are declared in infra/deployments.py."""
