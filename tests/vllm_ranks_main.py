"""`python -m tests.vllm_ranks_main [--fsdp-on-cpu] [--stale-engine] <lens train args>`: the lens CLI as
tests/test_vllm_ranks.py launches it under `accelerate launch` (two CPU processes, rollout.engine=vllm).

--fsdp-on-cpu: FSDP2 over gloo (tests.test_multiprocess.force_fsdp_on_cpu).
--stale-engine: injected fault: the engine takes the starting weights and ignores every later sync, so
  the test can show that its on-policy check fails when the engine does not follow the updates.
"""

import sys

import lens.rollout.vllm  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vllm is imported)


def ignore_syncs_after_the_first() -> None:
    from lens.rollout.vllm import VLLMEngine

    real_sync = VLLMEngine.sync_weights

    def sync_weights(self, model):
        if not getattr(self, "_stale_synced", False):  # the first sync: the engine's starting weights
            self._stale_synced = True
            real_sync(self, model)

    VLLMEngine.sync_weights = sync_weights


if __name__ == "__main__":
    from lens import cli

    argv = sys.argv[1:]
    if "--fsdp-on-cpu" in argv:
        from tests.test_multiprocess import force_fsdp_on_cpu

        argv.remove("--fsdp-on-cpu")
        force_fsdp_on_cpu()
    if "--stale-engine" in argv:
        argv.remove("--stale-engine")
        ignore_syncs_after_the_first()
    sys.exit(cli.main(argv))
