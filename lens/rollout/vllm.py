"""The vLLM rollout engine: a colocated, in-process `vllm.LLM` behind the `RolloutEngine` interface.

Same contract as `HFEngine`; how each part maps onto vLLM 0.32:

- In-process. `VLLM_ENABLE_V1_MULTIPROCESSING=0` (set below, before vLLM is imported) keeps the engine
  core and its worker in this process, so weight sync hands the worker a generator over the trainer's live
  tensors; the multiprocess engine would pickle a full copy of the weights per step.
- Weights. The engine starts from `model.config` with `load_format="dummy"` and gets the weights through
  the same path as every later sync (the worker's `reload_weights`, vLLM's layerwise in-place reload; plain
  `load_weights` fails on CPU once vLLM has repacked linear weights), so it never reads a checkpoint and
  always starts from the `model` it was given.
- Log-probs. `logprobs_mode="processed_logprobs"` with `logprobs=0`: the sampled token's log-prob after
  temperature. With top_p < 1 "processed" also means renormalised over the nucleus, unlike `HFEngine`;
  keep top_p = 1 for ratios that start at exactly 1, or set `train.recompute_old_logprobs`.
- Tokens in, tokens out. Prompts are tokenised as `HFEngine` does and passed as ids; vLLM runs without a
  tokenizer and stops at the model and tokenizer EOS ids (`stop_token_ids`, generation_config.json
  ignored); the EOS stays in the completion and the text is decoded with the trainer's tokenizer.
- Seeds. vLLM seeds sample k of a request with `seed + k`, so each prompt gets its own seed derived from
  (sampling.seed, prompt index); one shared seed would correlate the prompts' samples.
- Memory. GPU: `gpu_memory_utilization` as usual. CPU: vLLM reads it as a fraction of RAM minus the
  process's RSS, which in-process includes the trainer, so the KV cache is given explicitly instead:
  that fraction of total RAM, capped at what `max_num_seqs` full-length sequences can use.
- Lengths. `max_model_len` defaults to min(the model's positions, max_new_tokens + 2048); a completion
  reaching it is truncated, a longer prompt raises vLLM's validation error.
- Engines share vLLM's process-wide parallel state, shut down by the last one closed, so an evaluation
  engine can live beside the trainer's.
- Several processes (accelerate DDP or FSDP2): every rank hosts its own engine through vLLM's
  `external_launcher` executor (TRL's colocate mode) with tensor_parallel_size 1 and no vLLM data
  parallelism, so vLLM's groups are one rank each and ranks generate independently (different prompts,
  or only the main rank, as the periodic evaluation does). Building the engine is a collective (group
  creation, KV-cache size agreed by all-reduce); so is `sync_weights` under FSDP2, which gathers the
  sharded weights parameter by parameter. Closing keeps the trainer's default process group.
- Streaming. `generate` enqueues every prompt and runs vLLM's step loop itself (as `LLM.generate` does), so
  each group can go to `on_groups` (the verifier, lens.scoring) the moment vLLM finishes it; a failure
  aborts the requests left, so the next call starts clean.
- Sleep mode (CUDA, `rollout.vllm.sleep_between_steps`): after `generate` the engine sleeps (level 1),
  `sync_weights` wakes the weights and `generate` the KV cache, so training gets the GPU memory.
"""

from __future__ import annotations

import os

# Must precede the first `import vllm` anywhere in the process (see the module docstring).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import contextlib  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lens.rollout.base import Rollout, SamplingConfig, cut_at_eos, eos_token_ids  # noqa: E402
from lens.step_stats import memory_text  # noqa: E402

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROMPT_BUDGET = 2048  # tokens reserved for the prompt when max_model_len is derived

# In-process engines share vLLM's process-wide parallel state (a one-process torch.distributed group and
# vLLM's TP/PP groups). Shutting an engine down destroys that state, so only the last engine closed does.
_live_engines = 0


class VLLMEngine:
    """Colocated vLLM sampling from the trainer's current weights (see the module docstring)."""

    def __init__(self, model, tokenizer, *, dtype: str = "float32", seed: int = 0,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = True,
                 max_model_len: int | None = None, max_num_seqs: int = 256,
                 sleep_between_steps: bool = False, kv_cache_memory_bytes: int | None = None,
                 max_new_tokens_hint: int = 16, **llm_kwargs):
        """`llm_kwargs` go to `vllm.LLM` as they are (e.g. block_size), overriding the defaults here."""
        global _live_engines
        self.rank, world = _process_group()
        self.external_launcher = world > 1
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.on_cuda = torch.cuda.is_available()
        self.sleep_between_steps = bool(sleep_between_steps and self.on_cuda)
        self.last_sync_seconds = 0.0
        self._asleep: set[str] = set()  # tags vLLM has put to sleep ("weights", "kv_cache")

        config = model.config
        positions = getattr(config, "max_position_embeddings", None) or 4096
        self.max_model_len = max_model_len or min(positions, max_new_tokens_hint + PROMPT_BUDGET)
        if not self.on_cuda and kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = _cpu_kv_cache_bytes(config, dtype, gpu_memory_utilization,
                                                        self.max_model_len, max_num_seqs)

        # vLLM reads only config.json here (dummy weights, no tokenizer): the real weights come from `model`.
        self._config_dir = Path(tempfile.mkdtemp(prefix="lens-vllm-"))
        config.save_pretrained(self._config_dir)

        from vllm import LLM

        kwargs = dict(
            dtype=dtype, seed=seed, enforce_eager=enforce_eager, max_model_len=self.max_model_len,
            max_num_seqs=max_num_seqs, logprobs_mode="processed_logprobs", load_format="dummy",
            skip_tokenizer_init=True, generation_config="vllm", trust_remote_code=False,
            gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_bytes=kv_cache_memory_bytes,
        )
        if self.sleep_between_steps:
            kwargs["enable_sleep_mode"] = True
        if self.external_launcher:
            # One engine per rank in the trainer's process group: vLLM's executor reads RANK / LOCAL_RANK
            # (set by torchrun and accelerate launch). Unseeded requests get a stream per rank.
            os.environ.setdefault("RANK", str(self.rank))
            os.environ.setdefault("LOCAL_RANK", str(self.rank))
            kwargs |= dict(distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                           seed=seed + self.rank)
        kwargs |= llm_kwargs
        try:
            with _preserve_process_state():
                self.llm = LLM(str(self._config_dir), **kwargs)
        except BaseException:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            raise
        _live_engines += 1
        log.info("vLLM engine (rank %d of %d): max_model_len=%d, max_num_seqs=%d, dtype=%s, kv_cache_bytes=%s, "
                 "sleep=%s; %s", self.rank, world, self.max_model_len, max_num_seqs, dtype, kv_cache_memory_bytes,
                 self.sleep_between_steps, memory_text(_device()))
        from vllm.v1.engine.core_client import InprocClient

        if not isinstance(self.llm.llm_engine.engine_core, InprocClient):
            self.close()
            raise RuntimeError("vLLM started a separate engine process: VLLM_ENABLE_V1_MULTIPROCESSING=0 must be "
                               "set before vllm is first imported (import lens.rollout.vllm first)")
        self.sync_weights(model)

    @classmethod
    def from_params(cls, params, model, tokenizer, synced_gpus: bool = False, **llm_kwargs) -> VLLMEngine:
        """`synced_gpus` (FSDP) needs nothing here: each rank's engine generates on its own, and
        `sync_weights` gathers the shards."""
        vp = params.rollout.vllm
        return cls(
            model, tokenizer, dtype=params.model.compute_dtype, seed=params.run.seed,
            gpu_memory_utilization=vp.gpu_memory_utilization, enforce_eager=vp.enforce_eager,
            max_model_len=getattr(vp, "max_model_len", None), max_num_seqs=params.rollout.batch_size,
            sleep_between_steps=vp.sleep_between_steps,
            max_new_tokens_hint=max(params.rollout.max_new_tokens, params.eval.max_new_tokens), **llm_kwargs)

    # ---- weights --------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s current weights into the engine; the time taken is `last_sync_seconds`."""
        t0 = time.perf_counter()
        _debug_memory("vLLM sync_weights start")
        if "weights" in self._asleep:
            _free_cached_memory()
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        # A generator over the live tensors: the in-process worker reads them one by one (no full copy).
        weights = _full_weights(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        for _ in weights:  # gathers vLLM left unread: every rank must join every FSDP all-gather
            pass
        # Cached prefixes hold keys/values computed with the old weights.
        self.llm.reset_prefix_cache()
        if self.on_cuda:
            torch.cuda.synchronize()
        self.last_sync_seconds = time.perf_counter() - t0
        _debug_memory(f"vLLM sync_weights done in {self.last_sync_seconds:.2f} s")

    # ---- sampling -------------------------------------------------------------------------------
    def generate(self, prompts: list[str], n: int, sampling: SamplingConfig,
                 on_groups: Callable[[list[Rollout]], None] | None = None) -> list[Rollout]:
        """All prompts go to vLLM at once; each group is handed to `on_groups` as soon as vLLM finishes it
        (vLLM's own step loop, as `LLM.generate` runs it), so it can be verified while the rest generate."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        reps = 1 if sampling.greedy else n
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        common = dict(max_tokens=sampling.max_new_tokens, logprobs=0, stop_token_ids=sorted(self.eos_ids),
                      detokenize=False, skip_special_tokens=True)
        if sampling.greedy:
            per_prompt = [SamplingParams(n=1, temperature=0.0, **common)] * len(prompts)
        else:
            per_prompt = [SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                                         seed=_prompt_seed(sampling.seed, i), **common)
                          for i in range(len(prompts))]
        self._wake()
        groups: list[list[Rollout] | None] = [None] * len(prompts)
        engine, prompt_of, internal = self.llm.llm_engine, {}, {}
        try:
            request_ids = self.llm.enqueue([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], per_prompt,
                                           use_tqdm=False)
            # enqueue returns vLLM's internal ids ("<counter>-<8 random chars>"); outputs carry the counter
            internal = dict(zip((rid.rsplit("-", 1)[0] for rid in request_ids), request_ids))
            prompt_of = {external: p for p, external in enumerate(internal)}
            while engine.has_unfinished_requests():
                finished = []
                for out in engine.step():
                    if out.finished:
                        p = prompt_of[out.request_id]
                        groups[p] = self._group(p, out, prompt_ids[p], reps)
                        finished += groups[p]
                if finished and on_groups is not None:
                    on_groups(finished)
        except BaseException:
            unfinished = [internal[rid] for rid, p in prompt_of.items() if groups[p] is None]
            if unfinished:  # the next call must not receive this one's leftovers
                engine.abort_request(unfinished, internal=True)
            raise
        finally:
            self._sleep()
        missing = [p for p, g in enumerate(groups) if g is None]
        if missing:
            raise RuntimeError(f"vLLM finished without outputs for prompts {missing[:5]}")
        return [r for g in groups for r in g]

    def _group(self, p: int, out, prompt_ids: list[int], reps: int) -> list[Rollout]:
        """The rollouts of prompt `p` from vLLM's finished request `out`, in sample order."""
        samples = sorted(out.outputs, key=lambda c: c.index)
        if len(samples) != reps:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {p}, expected {reps}")
        rollouts = []
        for c in samples:
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM finished a sample with {c.finish_reason!r}")
            token_ids = list(c.token_ids)
            logprobs = [step[tok].logprob for step, tok in zip(c.logprobs, token_ids)]
            ids, lps, _ = cut_at_eos(token_ids, logprobs, self.eos_ids)
            rollouts.append(Rollout(
                prompt_index=p, prompt_ids=list(prompt_ids), completion_ids=ids,
                text=self.tokenizer.decode(ids, skip_special_tokens=True), logprobs=lps,
                truncated=c.finish_reason == "length"))
        return rollouts

    # ---- GPU memory between phases ----------------------------------------------------------------
    def _wake(self) -> None:
        if self._asleep:
            _free_cached_memory()
            self.llm.wake_up(tags=sorted(self._asleep))
            self._asleep.clear()

    def _sleep(self) -> None:
        if self.sleep_between_steps and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def close(self) -> None:
        global _live_engines
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            _live_engines -= 1
            _shutdown(llm.llm_engine.engine_core, last=_live_engines == 0, keep_default_group=self.external_launcher)
            del llm
            gc.collect()
            if self.on_cuda:
                torch.cuda.empty_cache()
        shutil.rmtree(getattr(self, "_config_dir", ""), ignore_errors=True)

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ExpectedWarnings(logging.Filter):
    """Drop two vLLM warnings that this configuration causes on purpose, so real ones stay visible:
    the layerwise reload says at every sync that RotaryEmbedding loaded no weights (it has none in a
    checkpoint; vLLM keeps its computed cos/sin cache), and the chat-template warm-up at start fails
    with a traceback because the engine runs without a tokenizer (`skip_tokenizer_init`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.msg == "Chat template warmup failed" and "skip_tokenizer_init" in str(exc))


for _name in ("vllm.model_executor.model_loader.reload.layerwise", "vllm.renderers.base"):
    logging.getLogger(_name).addFilter(_ExpectedWarnings())


def _shutdown(client, last: bool, keep_default_group: bool) -> None:
    """Free an in-process engine core; keep the shared parallel state while other engines use it, and
    torch's default process group when it is the trainer's (`keep_default_group`)."""
    if last and not keep_default_group:
        client.shutdown()  # EngineCore.shutdown also runs vLLM's cleanup_dist_env_and_memory
        return
    finalizer = getattr(client, "_finalizer", None)
    if finalizer is not None:
        finalizer.detach()  # it would run the full shutdown when the client is collected
    core = client.engine_core
    core.structured_output_manager.clear_backend()
    core.model_executor.shutdown()
    core.scheduler.shutdown()
    gc.unfreeze()  # the engine core gc.freeze()s its start-up objects (weights, KV cache)
    if last:
        # vLLM's destroy_distributed_environment would also destroy torch's default group, which
        # accelerate owns: destroy only vLLM's own groups (subgroups; destroying them is local).
        from vllm.distributed import parallel_state

        parallel_state.destroy_model_parallel()
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = parallel_state._NODE_COUNT = None


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the trainer's torch.distributed group; (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _full_weights(model: torch.nn.Module):
    """(name, tensor) over `model`'s state dict, FSDP2 shards (DTensor) gathered one parameter at a time
    (never the whole model at once); each gather is a collective, so all ranks walk the same names in order."""
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _free_cached_memory() -> None:
    """Hand the trainer's cached CUDA blocks back before vLLM wakes (verl does the same), or its weights
    and KV cache may not fit beside the trainer's allocator cache."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _debug_memory(what: str) -> None:
    """Memory around the weight sync (the trainer logs it around each phase, generation included)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: %s", what, memory_text(_device()))


def _prompt_seed(seed: int | None, index: int) -> int | None:
    if seed is None:
        return None
    # 31 bits: vLLM adds the sample index to the seed, and its CPU sampler seeds torch generators with it.
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0]) & 0x7FFF_FFFF


def _cpu_kv_cache_bytes(config, dtype: str, fraction: float, max_model_len: int, max_num_seqs: int) -> int:
    """KV-cache budget on CPU: `fraction` of RAM, but no more than the engine could ever fill."""
    import psutil

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_token = config.num_hidden_layers * 2 * kv_heads * head_dim * DTYPE_BYTES[dtype]
    block = 128  # vLLM's CPU block size: room for one partly filled block per sequence
    needed = max_num_seqs * (max_model_len + block) * per_token
    return int(min(fraction * psutil.virtual_memory().total, needed))


@contextlib.contextmanager
def _preserve_process_state():
    """Building an in-process engine reseeds the global RNGs and changes torch's thread settings; the
    trainer shares this process, so give it back what it had (its runs stay reproducible and fast)."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        torch.set_num_threads = set_num_threads  # the CPU worker replaces it with a no-op
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
