"""The hf engine: one base model, many peft LoRA adapters on it, and full-model experts, on CPU or GPU.

Work is grouped by target: every item for the same adapter (or model, or the base) runs as one
batched ``generate`` / forward pass, and results come back in request order.

Adapters are applied in one of two ways (``adapter_mode``):

- ``"merge"`` (default): the group's adapter is merged into the base weights (peft
  ``merge_adapter``) and stays merged until another target is asked for, so an adapter runs at the
  base model's speed and consecutive requests for it pay no switch at all. A switch costs one
  unmerge + one merge (measured in bench/bench_hf_engine.py, see docs/benchmarks.md).
- ``"unmerged"``: peft's LoRA layers run beside the base weights (``set_adapter``); no weights
  change, at the price of the extra low-rank matmuls on every step.

Sampling is done per row with the request's own ``torch.Generator`` (see ``_RowLogits``), so a
sampled completion depends on its seed only, not on what else was in the batch, and the engine
never touches torch's global RNG.

Where a token-level mixture will go: ``_bind`` turns a target into the module to run. A mixture
(the MoLoRA layer) becomes one more kind of target whose ``_bind`` installs the mixture layers on
the unmerged base and removes them on exit; ``generate`` and ``score`` do not change.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from services.engines.base import (
    Emit,
    EngineError,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
)
from services.engines.devices import resolve_device, resolve_dtype
from services.engines.prompting import (
    adapter_tokenizer,
    check_context,
    check_logit_bias,
    check_score_context,
    context_length,
    end_token_ids,
    load_tokenizer,
    render,
    score_tokens,
    ships_tokenizer,
    stop_ids,
)

ADAPTER_MODES = ("merge", "unmerged")


class HFEngine:
    """Engine protocol on transformers + peft. One instance per thread / actor."""

    kind = "hf"

    def __init__(
        self,
        base_path: str | Path,
        *,
        base_name: str = "base",
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        adapter_mode: str = "merge",
        max_batch_size: int = 32,
        trust_remote_code: bool = False,
    ) -> None:
        if adapter_mode not in ADAPTER_MODES:
            raise EngineError(f"adapter_mode must be one of {ADAPTER_MODES}, got {adapter_mode!r}")
        self.base_name = base_name
        # "auto": CUDA in bfloat16 where there is a GPU, else the CPU in float32 (devices.py)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.adapter_mode = adapter_mode
        self.max_batch_size = max_batch_size
        # explicit either way: left unset, transformers asks on stdin whether to run a model's code
        self.trust_remote_code = trust_remote_code
        self._base_path = Path(base_path)
        self._base: PreTrainedModel = self._load_causal_lm(base_path)
        self._tokenizer = load_tokenizer(base_path, trust_remote_code)
        self._peft: PeftModel | None = None  # created when the first adapter is loaded
        self._adapters: dict[str, str] = {}  # name -> folder it came from
        # adapters that ship a tokenizer rendering otherwise than the base's (prompting.adapter_tokenizer)
        self._adapter_tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._models: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
        self._merged: str | None = None  # adapter currently merged into the base weights
        # (tuner layer, [(base parameter, its value before the merge)]) of the merged adapter
        self._snapshot: list[tuple[BaseTunerLayer, list[tuple[torch.nn.Parameter, torch.Tensor]]]] = []
        self._unmergeable: set[str] = set()  # adapters on a tied output layer: never merged

    @property
    def base_model(self) -> PreTrainedModel:
        """The base model object itself (what the base target runs while no adapter is loaded).
        Token-level mixtures install their MoLoRA layer into it on an adapter-free engine."""
        if self._peft is not None:
            raise EngineError("base_model is only exposed on an engine with no adapters loaded")
        return self._base

    @property
    def score_context(self) -> int | None:
        """Tokens one score request on the base may hold: its config's context (None: unstated)."""
        return context_length(getattr(self._base, "config", None))

    # ------------------------------------------------------------------ loading

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a peft LoRA folder (adapter_config.json + adapter_model.safetensors) as ``name``."""
        self._check_free(name)
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise EngineError(f"adapter {name!r}: {path} has no adapter_config.json (not a peft folder)")
        own_tokenizer = adapter_tokenizer(path, self._tokenizer)
        self._unmerge()  # peft injects new layers into unmerged modules only
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._base, str(path), adapter_name=name, is_trainable=False)
                self._peft.eval()
            else:
                self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            self._drop_partial(name)
            raise EngineError(f"adapter {name!r} from {path} does not load on this base: {exc}") from exc
        self._adapters[name] = str(path)
        if own_tokenizer is not None:
            self._adapter_tokenizers[name] = own_tokenizer
        if self._touches_tied_weights(name):
            # merged into the embedding matrix (its own LoRA, or a tied output layer's), it would
            # change the other use of that matrix as well: it runs unmerged, as peft runs it
            self._unmergeable.add(name)

    def _touches_tied_weights(self, name: str) -> bool:
        assert self._peft is not None
        embedding = self._peft.get_input_embeddings().weight
        return any(
            isinstance(m, BaseTunerLayer) and _holds(m, name) and m.get_base_layer().weight is embedding
            for m in self._peft.modules()
        )

    def _drop_partial(self, name: str) -> None:
        """A load that failed half-way (a wrong shape) leaves layers injected under ``name``:
        remove them, so the other adapters and the base run exactly as before."""
        if self._peft is None:
            # the first adapter: peft injected its layers into the base before failing, and left
            # no wrapper to remove them with; load the base again
            if any(isinstance(m, BaseTunerLayer) for m in self._base.modules()):
                self._base = self._load_causal_lm(self._base_path)
            return
        if name not in self._peft.peft_config:
            return
        if name in self._peft.active_adapters:
            self._peft.set_adapter(next(iter(self._adapters)))
        self._peft.delete_adapter(name)

    def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise EngineError(f"adapter {name!r} is not loaded on this engine")
        self._unmerge()
        assert self._peft is not None
        if len(self._adapters) == 1:
            # peft keeps at least one adapter; with none left, strip the LoRA layers altogether
            self._base = self._peft.unload()
            self._peft = None
        else:
            if name in self._peft.active_adapters:  # move off it first, or peft warns
                self._peft.set_adapter(next(n for n in self._adapters if n != name))
            self._peft.delete_adapter(name)
        del self._adapters[name]
        self._adapter_tokenizers.pop(name, None)
        self._unmergeable.discard(name)

    def load_model(self, name: str, path: str | Path) -> None:
        """Load a full-model expert (a ``from_pretrained`` folder); its own tokenizer if it has one."""
        self._check_free(name)
        try:
            # a base's trust in its own code is not a full model's: experts never run their code
            model = self._load_causal_lm(path, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise EngineError(f"model {name!r} from {path} does not load: {exc}") from exc
        tokenizer = load_tokenizer(path) if ships_tokenizer(path) else self._tokenizer
        self._models[name] = (model, tokenizer)

    def unload_model(self, name: str) -> None:
        if name not in self._models:
            raise EngineError(f"model {name!r} is not loaded on this engine")
        del self._models[name]

    def targets(self) -> dict[str, str]:
        found = {self.base_name: "base"}
        found.update({name: "adapter" for name in self._adapters})
        found.update({name: "model" for name in self._models})
        return found

    def activate(self, target: str | None) -> None:
        """Make ``target`` the active one now (what a group does first); for measuring switches."""
        with self._bind(target):
            pass

    # ------------------------------------------------------------------ generate

    # streamed rows share batches with whole ones: ``generate(requests, emits)`` (engine servers
    # read this flag; an engine without it answers a streamed request at once)
    streams = True

    @torch.inference_mode()
    def generate(
        self, requests: Sequence[GenerateRequest], emits: Sequence[Emit | None] | None = None
    ) -> list[GenerateResult]:
        """``emits``: per request, None or a function handed that request's text in pieces while it
        is generated (a token's worth at a time; the pieces joined equal the result's text). Streamed
        and whole requests share batches like any others. Blocking."""
        if emits is not None and len(emits) != len(requests):
            raise ValueError(f"{len(emits)} emits for {len(requests)} requests")
        results: list[GenerateResult | None] = [None] * len(requests)
        for target, indices in self._groups(requests):
            with self._bind(target) as (model, tokenizer):
                for chunk in _chunks(indices, self.max_batch_size):
                    batch = [requests[i] for i in chunk]
                    row_emits = [emits[i] for i in chunk] if emits is not None else None
                    for i, result in zip(chunk, self._generate_batch(model, tokenizer, batch, row_emits)):
                        results[i] = result
        return results  # type: ignore[return-value]

    def _generate_batch(
        self,
        model: Any,  # a PreTrainedModel, or the PeftModel over one
        tokenizer: PreTrainedTokenizerBase,
        batch: list[GenerateRequest],
        emits: Sequence[Emit | None] | None = None,
    ) -> list[GenerateResult]:
        pad_id = _pad_id(tokenizer)
        rendered = [render(tokenizer, r) for r in batch]
        context = context_length(getattr(model, "config", None))
        vocab = model.get_output_embeddings().weight.shape[0]
        for (ids, _), r in zip(rendered, batch):
            check_context(len(ids), r, context)
            check_logit_bias(r, vocab)
        prompts = [ids for ids, _ in rendered]
        ends = end_token_ids(tokenizer, getattr(model, "generation_config", None))
        stops = [stop_ids(r, ends) for r in batch]
        input_ids, attention_mask = _pad(prompts, pad_id, left=True, device=self.device)
        prompt_len = input_ids.shape[1]
        config = GenerationConfig(
            do_sample=False,  # sampling happens per row in _RowLogits; greedy picks its choice
            max_new_tokens=max(r.max_new_tokens for r in batch),
            # no end token of generate's own: each row ends on its own stop ids (_RowStops), which
            # differ per row (ignore_eos, stop_token_ids); an empty list also keeps generate from
            # filling in the model's generation_config eos
            eos_token_id=[],
            pad_token_id=pad_id,
        )
        streamer = _BatchStreamer(tokenizer, batch, emits, stops) if emits and any(emits) else None
        with _without_model_defaults(model):
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([_RowLogits(batch, prompts, prompt_len, self.device)]),
                stopping_criteria=StoppingCriteriaList([_RowStops(batch, prompt_len, tokenizer, stops)]),
                streamer=streamer,
            )
        results = [
            _finish(tokenizer, request, output[row, prompt_len:].tolist(), len(prompts[row]), stops[row], rule)
            for row, (request, (_, rule)) in enumerate(zip(batch, rendered))
        ]
        if streamer is not None:
            streamer.finish(results)
        return results

    # ------------------------------------------------------------------ score

    @torch.inference_mode()
    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        results: list[ScoreResult | None] = [None] * len(requests)
        for target, indices in self._groups(requests):
            with self._bind(target) as (model, tokenizer):
                for chunk in _chunks(indices, self.max_batch_size):
                    batch = [requests[i] for i in chunk]
                    for i, result in zip(chunk, self._score_batch(model, tokenizer, batch)):
                        results[i] = result
        return results  # type: ignore[return-value]

    def _score_batch(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, batch: list[ScoreRequest]
    ) -> list[ScoreResult]:
        rows, spans, offsets = [], [], []
        limit = context_length(getattr(model, "config", None))
        for r in batch:
            context, continuation, where = score_tokens(tokenizer, r)
            check_score_context(len(context) + len(continuation), limit)
            offsets.append(where)
            rows.append(context + continuation)
            spans.append((len(context), len(continuation)))
        # Right padding: positions then start at 0 in every row, and causal attention keeps the
        # trailing pads from influencing the real tokens.
        input_ids, attention_mask = _pad(rows, _pad_id(tokenizer), left=False, device=self.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        results = []
        for row, (n_context, n_cont) in enumerate(spans):
            span = slice(n_context - 1, n_context - 1 + n_cont)  # logits at t predict token t + 1
            # one row's scored positions at a time in float32: a batch of whole documents over a
            # large vocabulary would not fit as one [B, T, V] float32 copy
            logprobs = torch.log_softmax(logits[row, span].float(), dim=-1)
            targets = input_ids[row, n_context : n_context + n_cont]
            token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
            results.append(
                ScoreResult(
                    logprob=float(sum(token_logprobs)),
                    num_tokens=n_cont,
                    is_greedy=bool((logprobs.argmax(-1) == targets).all()),
                    token_logprobs=token_logprobs,
                    offsets=offsets[row],
                )
            )
        return results

    # ------------------------------------------------------------------ targets

    def _groups(self, requests: Sequence[GenerateRequest | ScoreRequest]) -> list[tuple[str | None, list[int]]]:
        """Request indices by target, in first-seen order, the currently merged adapter first so a
        call that includes it does not switch away and back."""
        groups: dict[str | None, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            target = None if r.target in (None, self.base_name) else r.target
            if target is not None and target not in self._adapters and target not in self._models:
                raise EngineError(f"target {target!r} is not loaded on this engine (loaded: {sorted(self.targets())})")
            groups[target].append(i)
        return sorted(groups.items(), key=lambda item: item[0] != self._merged or item[0] is None)

    @contextlib.contextmanager
    def _bind(self, target: str | None) -> Iterator[tuple[torch.nn.Module, PreTrainedTokenizerBase]]:
        """Prepare the weights for ``target`` and yield the module to run and its tokenizer."""
        if target is None or target == self.base_name:
            self._unmerge()
            if self._peft is None:
                yield self._base, self._tokenizer
            else:
                with self._peft.disable_adapter():
                    yield self._peft, self._tokenizer
        elif target in self._models:
            yield self._models[target]
        elif target in self._adapters:
            assert self._peft is not None
            if self.adapter_mode == "merge" and target not in self._unmergeable:
                if self._merged != target:
                    self._unmerge()
                    self._peft.set_adapter(target)
                    self._merge(target)
            else:
                self._unmerge()
                self._peft.set_adapter(target)
            yield self._peft, self._adapter_tokenizers.get(target, self._tokenizer)
        else:
            raise EngineError(f"target {target!r} is not loaded on this engine (loaded: {sorted(self.targets())})")

    @torch.no_grad()
    def _merge(self, target: str) -> None:
        """Merge ``target`` into the base weights with peft's own merge (which knows DoRA, lora
        biases, fan-in-fan-out layers), after keeping a copy of every base parameter it is about to
        change: ``_unmerge`` puts those copies back. Subtracting the delta again instead would
        leave float rounding behind on every switch, and for DoRA it needs peft's cached weight
        norms, which a failed or out-of-mode unmerge loses (the delta then stays in the shared
        base). The copy costs the touched layers' weights once more while an adapter is merged: in
        host memory (pinned) for a GPU engine, so a base that fits its GPU still does."""
        assert self._peft is not None
        self._snapshot = []
        for module in self._peft.modules():
            if isinstance(module, BaseTunerLayer) and _holds(module, target):
                base = module.get_base_layer()
                self._snapshot.append((module, [(p, _kept(p)) for p in base.parameters(recurse=False)]))
        self._merged = target
        self._peft.base_model.merge_adapter(adapter_names=[target])  # type: ignore[operator]  # a LoraModel

    @torch.no_grad()
    def _unmerge(self) -> None:
        if self._merged is None:
            return
        for module, params in self._snapshot:
            for param, kept in params:
                param.copy_(kept)
            module.merged_adapters.clear()
            getattr(module, "_caches", {}).pop(f"{self._merged}-weight_norm", None)  # DoRA's
        self._snapshot = []
        self._merged = None

    def _check_free(self, name: str) -> None:
        if not name or name == self.base_name or name in self._adapters or name in self._models:
            raise EngineError(f"target name {name!r} is empty or already taken on this engine; unload it first")

    def _load_causal_lm(self, path: str | Path, trust_remote_code: bool | None = None) -> PreTrainedModel:
        trust = self.trust_remote_code if trust_remote_code is None else trust_remote_code
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype, trust_remote_code=trust)
        return model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to


# ---------------------------------------------------------------------- decoding helpers


class _RowLogits(LogitsProcessor):
    """Each row's own logit rules, in vLLM's order: ``logit_bias``; the repetition penalty (over
    the prompt and the completion), frequency and presence penalties (over the completion); then,
    for a sampled row, temperature, ``min_p``, ``top_k``, ``top_p`` and a draw from the row's own
    seeded generator.

    A sampled row keeps only its drawn token (every other logit -inf), so the surrounding greedy
    ``generate`` picks it; a greedy row gets its biased and penalised logits, whose argmax it takes.
    Rows without any of these pass through untouched.
    """

    def __init__(
        self, batch: list[GenerateRequest], prompts: list[list[int]], prompt_len: int, device: torch.device
    ) -> None:
        self.prompt_len = prompt_len
        self.rows: list[tuple[int, GenerateRequest, torch.Tensor | None, torch.Generator | None]] = []
        for row, r in enumerate(batch):
            if r.temperature <= 0 and not r.penalised:
                continue
            gen = None
            if r.temperature > 0:
                gen = torch.Generator(device=device)
                if r.seed is None:
                    gen.seed()  # fresh entropy, not torch's global RNG
                else:
                    gen.manual_seed(r.seed)
            seen = torch.tensor(prompts[row], dtype=torch.long, device=device) if r.repetition_penalty != 1.0 else None
            self.rows.append((row, r, seen, gen))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, r, prompt_ids, gen in self.rows:
            logits = scores[row].float()
            if r.logit_bias:
                ids = torch.tensor([t for t, _ in r.logit_bias], device=logits.device)
                logits[ids] += torch.tensor([b for _, b in r.logit_bias], device=logits.device)
            completion = input_ids[row, self.prompt_len :]
            if prompt_ids is not None:
                seen = torch.unique(torch.cat([prompt_ids, completion]))
                picked = logits[seen]
                logits[seen] = torch.where(picked > 0, picked / r.repetition_penalty, picked * r.repetition_penalty)
            if r.frequency_penalty or r.presence_penalty:
                counts = torch.bincount(completion, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
                logits -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0).to(logits.dtype)
            if gen is None:
                scores[row] = logits.to(scores.dtype)
                continue
            probs = torch.softmax(logits / r.temperature, dim=-1)
            if r.min_p > 0:
                probs[probs < r.min_p * probs.max()] = 0.0
            if 0 < r.top_k < probs.shape[-1]:
                probs[probs < probs.topk(r.top_k).values[-1]] = 0.0
            if r.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                sorted_probs /= sorted_probs.sum()
                # keep the smallest prefix whose mass reaches top_p (always the top token)
                drop = sorted_probs.cumsum(-1) - sorted_probs >= r.top_p
                sorted_probs[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
            choice = torch.multinomial(probs, 1, generator=gen)
            scores[row] = float("-inf")
            scores[row, choice] = 0.0
        return scores


class _BatchStreamer(BaseStreamer):
    """transformers' streamer hook for a batch: ``generate`` hands it the prompt first, then each
    step's new token of every row; rows with an emit stream through their own ``_DeltaStreamer``."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        batch: list[GenerateRequest],
        emits: Sequence[Emit | None],
        stops: Sequence[frozenset[int]],
    ) -> None:
        self.rows = [
            (row, _DeltaStreamer(tokenizer, request, emit, stops[row]))
            for row, (request, emit) in enumerate(zip(batch, emits, strict=True))
            if emit is not None
        ]
        self.size = len(batch)
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        tokens = value.reshape(self.size, -1).tolist()
        for row, stream in self.rows:
            stream.add(tokens[row])

    def end(self) -> None:
        pass

    def finish(self, results: list[GenerateResult]) -> None:
        """The rest of each streamed row's final text (after stop strings and limits were applied)."""
        for row, stream in self.rows:
            stream.send(results[row].text)


class _DeltaStreamer:
    """One row's stream: each new token's text goes to ``emit``, except what could still change — a
    trailing partial character (decoded as U+FFFD) and the last len(longest stop string) - 1
    characters, which a stop string completed later would cut. Tokens after the row's end (its EOS,
    its own token limit: the batch goes on for longer rows, padding the finished ones) are ignored."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, request: GenerateRequest, emit: Emit, ends: frozenset[int]
    ) -> None:
        self.tokenizer, self.emit, self.ends = tokenizer, emit, ends
        self.skip_special = request.skip_special_tokens
        self.stop = [s for s in request.stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.limit = request.max_new_tokens
        self.ids: list[int] = []
        self.sent = ""
        self.ended = False

    def add(self, tokens: list[int]) -> None:
        if self.ended:
            return
        for token in tokens:
            if token in self.ends:  # never part of the text (``_finish``)
                self.ended = True
                break
            self.ids.append(token)
            if len(self.ids) >= self.limit:
                self.ended = True
                break
        text = cast(str, self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special))  # one sequence
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:  # the answer ends before the stop string; generation stops after this token
            self.ended = True
            self.send(text[: min(hits)])
            return
        self.send(text[: len(text) - self.hold].rstrip("\ufffd"))

    def send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit(text[len(self.sent) :])
            self.sent = text


class _RowStops(StoppingCriteria):
    """Per-row stop: one of the row's stop ids (the model's end tokens, its stop_token_ids), its
    own max_new_tokens, or one of its stop strings in the completion."""

    def __init__(
        self,
        batch: list[GenerateRequest],
        prompt_len: int,
        tokenizer: PreTrainedTokenizerBase,
        ends: Sequence[frozenset[int]],
    ) -> None:
        self.limits = [r.max_new_tokens for r in batch]
        self.stops = [r.stop for r in batch]
        self.skip_special = [r.skip_special_tokens for r in batch]
        self.ends = ends
        self.done = [False] * len(batch)
        self.prompt_len = prompt_len
        self.tokenizer = tokenizer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        produced = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        for row, stops in enumerate(self.stops):
            if self.done[row]:  # sticky: the rows after an end are padding
                continue
            text_stop = bool(stops) and any(
                s
                in self.tokenizer.decode(input_ids[row, self.prompt_len :], skip_special_tokens=self.skip_special[row])
                for s in stops
            )
            self.done[row] = produced >= self.limits[row] or last[row] in self.ends[row] or text_stop
        return cast(torch.BoolTensor, torch.tensor(self.done, dtype=torch.bool, device=input_ids.device))


def _finish(
    tokenizer: PreTrainedTokenizerBase,
    request: GenerateRequest,
    produced: list[int],
    prompt_tokens: int,
    ends: frozenset[int],
    rule: str = "raw",
) -> GenerateResult:
    ids = produced[: request.max_new_tokens]
    reason = "length"
    end = next((i for i, token in enumerate(ids) if token in ends), None)
    if end is not None:
        ids = ids[: end + 1]
        reason = "stop"
    skip = request.skip_special_tokens

    def text_of(tokens: list[int]) -> str:
        # the end token itself is never part of the text (vLLM's rule), special or not
        if tokens and reason == "stop" and tokens[-1] in ends:
            tokens = tokens[:-1]
        # a byte-level BPE answer cut inside a character ends in the replacement character: vLLM's
        # incremental detokenizer holds those bytes back, and so does the stream (_DeltaStreamer)
        return cast(str, tokenizer.decode(tokens, skip_special_tokens=skip)).rstrip("\ufffd")

    text = text_of(ids)
    hits = [text.find(s) for s in request.stop if s and s in text]
    if hits:
        text = text[: min(hits)]
        reason = "stop"
        # keep the tokens up to the one that completed the stop string
        for n in range(1, len(ids) + 1):
            if any(s in tokenizer.decode(ids[:n], skip_special_tokens=skip) for s in request.stop if s):
                ids = ids[:n]
                break
    return GenerateResult(
        text=text,
        token_ids=ids,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(ids),
        finish_reason=reason,  # type: ignore[arg-type]
        prompt_rule=rule,  # type: ignore[arg-type]
    )


@contextlib.contextmanager
def _without_model_defaults(model: Any) -> Iterator[None]:
    """``generate`` fills every field our config leaves unset from the model's own
    generation_config.json (Qwen2.5-Instruct's repetition_penalty 1.05, top_k 20, …), even for
    greedy decoding. A request says what it wants, as vLLM's ``SamplingParams`` do, so the hf and
    vllm engines answer alike: the model's defaults are set aside while it generates (its eos
    list is read before, by ``end_token_ids``)."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    kept = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = kept


def _kept(param: torch.Tensor) -> torch.Tensor:
    """A copy of ``param`` to put back later: on the host for a GPU tensor."""
    if param.device.type == "cuda":
        return param.detach().to("cpu", copy=True).pin_memory()
    return param.detach().clone()


def _holds(module: BaseTunerLayer, adapter: str) -> bool:
    """Whether this tuner layer has weights of ``adapter`` (LoRA's A matrices, or an embedding's)."""
    return any(adapter in getattr(module, attr, {}) for attr in ("lora_A", "lora_embedding_A"))


def _pad(rows: list[list[int]], pad_id: int, *, left: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise EngineError("the tokenizer has neither a pad nor an EOS token; cannot batch")


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
