"""The experts one base serves, as routers and composers see them, and the engines that run them.

An ``ExpertPool`` reads the registry once: every ready expert on one base model (LoRA adapters on
it, and full models fine-tuned from it) becomes an ``ExpertInfo`` with its examples. Engines are
built lazily: ``engine`` holds every adapter and model expert; ``mixture_engine`` is a second,
adapter-free copy of the base with the MoLoRA layer installed for token-level strategies.

Routing artifacts are persisted through the registry (``fitted``): an expert whose artifact for a
router is stored is loaded, not fitted again, so a newly registered expert costs one
``fit_expert`` and the others are untouched.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

from registry.errors import MoergeError, NotFoundError
from registry.hub import model_folder
from registry.models import Expert
from registry.service import Registry
from routers.base import Artifact, BaseRouter, ExpertExample, ExpertInfo, ExpertUnusable
from services.engines.devices import resolve_device, resolve_dtype
from services.engines.hf import HFEngine

ROUTING_ARTIFACT = "routing"
ARTIFACT_FILE = "routing.safetensors"  # inside the artifact's folder in the store
HEAD_ARTIFACT = "head"  # a router's own artifact over all its experts (expert_id NULL)
HEADS_TRIED = 8  # stored heads read before training a new one
DEFAULT_CONTEXT = 4096  # a base whose config and tokenizer name no context

log = logging.getLogger("moerge.moe")


class ExpertPool:
    """The ready experts of one base model (its adapters and full models), the engines that run
    them, and their routing artifacts. ``extra`` names experts from outside that base (other
    bases' adapters and models, external experts) that query-level strategies may also choose:
    ``engine`` then sends each of them to an engine that can run it."""

    def __init__(
        self,
        registry: Registry,
        base: str | None = None,
        *,
        max_batch_size: int = 64,
        engine=None,  # an Engine
        extra: Sequence[str] = (),
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        engine_args: Callable[[str], Mapping[str, Any]] | None = None,
    ) -> None:
        self.registry = registry
        # an engine that already serves every expert by name (the Ray deployments' RemoteEngine);
        # None: this process builds its own hf engine
        self._given_engine = engine
        self.max_batch_size = max_batch_size
        # every ready expert with its base's name
        ready = [(e, e.base.name) for e in registry.list_experts(status="ready") if e.base is not None]
        if base is None:
            counts = Counter(b for _, b in ready)
            if not counts:
                raise NotFoundError("no ready expert on any base model; build one with `moerge zoo build --register`")
            # the most recently registered base among those with the most experts
            base = max(counts, key=lambda b: (counts[b], max(e.id for e, eb in ready if eb == b)))
        self.base = registry.get_base(base)
        self._folders: dict[str, Path] = {}  # base uri -> local folder, looked up once per pool
        self.base_path = self._folder(self.base.uri)  # a hub reference: its cached snapshot
        # where this pool's own engines, merges and router fitting run ("auto": CUDA in bfloat16
        # where there is a GPU, else the CPU in float32); ``engine_args``: the serve config's for
        # this base, whose device and dtype win
        args = dict(engine_args(base)) if engine_args is not None else {}
        self.device = resolve_device(args.get("device", device))
        self.dtype = resolve_dtype(args.get("dtype", dtype), self.device)
        latest: dict[str, Expert] = {}
        for e, b in sorted(ready, key=lambda r: r[0].id):  # the newest version of each name wins
            if b == base and e.kind in ("adapter", "model"):
                latest[e.name] = e
        self.extra = self._extra_records(registry, extra, latest)
        latest.update(self.extra)
        self.records = latest
        self.experts: dict[str, ExpertInfo] = {name: self._info(rec) for name, rec in sorted(latest.items())}
        self._engine: HFEngine | None = None
        self._dispatch: Any = None  # ``engine`` when the pool has extra experts (a DispatchEngine)
        self._mixture_engine: HFEngine | None = None
        self._molora: Any = None  # composer.molora.MoLoRA, imported on first use (numba)
        self._tokenizer: Any = None  # the base's (``tokenizer``)
        self._context: int | None = None  # ``context``
        self._extra_tokenizers: list[Any] | None = None  # other bases' (``token_budget``)

    def _extra_records(self, registry: Registry, names: Sequence[str], own: dict[str, Expert]) -> dict[str, Expert]:
        """The newest ready version of each of ``names`` not already among the base's own."""
        if not names:
            return {}
        newest: dict[str, Expert] = {}
        for e in sorted(registry.list_experts(status="ready"), key=lambda e: e.id):
            if e.name in names and e.name not in own:
                newest[e.name] = e
        missing = [n for n in names if n not in newest and n not in own]
        if missing:
            raise NotFoundError(f"no ready expert named {', '.join(missing)}")
        return newest

    def _folder(self, uri: str) -> Path:
        if uri not in self._folders:
            self._folders[uri] = model_folder(uri)
        return self._folders[uri]

    def base_name_of(self, name: str) -> str | None:
        """The base model an expert of the pool runs on (None: an external expert)."""
        record = self.records[name]
        return record.base.name if record.base is not None and record.kind != "external" else None

    def _info(self, rec: Expert) -> ExpertInfo:
        examples = tuple(
            ExpertExample(x.prompt, x.reference or "", x.task or "", x.split or "train")
            for x in self.registry.get_examples(rec.name, rec.version)
        )
        path = self.registry.expert_path(rec)
        base = rec.base if rec.base is not None and rec.kind != "external" else None  # the one it runs on
        return ExpertInfo(
            name=rec.name,
            kind=rec.kind,
            domains=tuple(rec.domains or ()),
            skills=tuple(rec.skills or ()),
            description=rec.description or "",
            examples=examples,
            adapter_path=path if rec.kind == "adapter" else None,
            base_path=self._folder(base.uri) if base is not None else None,
            base_trust_remote_code=bool(base.trust_remote_code) if base is not None else False,
        )

    # ------------------------------------------------------------------ experts

    def names(self, kind: str | None = None) -> list[str]:
        return [n for n, e in self.experts.items() if kind is None or e.kind == kind]

    def adapters(self) -> dict[str, Path]:
        return {n: e.adapter_path for n, e in self.experts.items() if e.kind == "adapter" and e.adapter_path}

    @property
    def tokenizer(self) -> Any:
        """The base's tokenizer (token budgets, texts cut to the context)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                str(self.base_path), trust_remote_code=bool(self.base.trust_remote_code)
            )
        return self._tokenizer

    @property
    def context(self) -> int:
        """Tokens one scored pass over the base may read: what the given engine serves (its
        ``score_context``: vLLM's ``max_model_len`` less the token it generates, which a
        deployment may set below the model's own), else the base config's context, else its
        tokenizer's."""
        if self._context is None:
            served = getattr(self._given_engine, "score_context", None)
            if served:
                self._context = int(served)
            else:
                from transformers import AutoConfig

                from services.engines.prompting import context_length

                config = AutoConfig.from_pretrained(
                    str(self.base_path), trust_remote_code=bool(self.base.trust_remote_code)
                )
                limit = context_length(config) or getattr(self.tokenizer, "model_max_length", None)
                # tokenizers without a limit report a huge sentinel (int(1e30))
                self._context = int(limit) if limit and limit < 10**9 else DEFAULT_CONTEXT
        return self._context

    @property
    def text_tokens(self) -> int:
        """Tokens of a text scored whole (a score request with an empty prompt): the context less
        the one BOS (or EOS) token that prompt conditions on."""
        return self.context - 1

    def token_budget(self, references, slack: int = 4) -> int:
        """Tokens to generate for answers like ``references``: the longest one in the tokens of
        any base the pool's experts run on (the base's own, and each other base's or full
        model's in a cross-base pool), plus ``slack`` (the end token, and a little room)."""
        references = list(references)
        lengths = [
            len(tokenizer(r, add_special_tokens=False)["input_ids"])
            for tokenizer in self._budget_tokenizers()
            for r in references
        ]
        return max(lengths, default=0) + slack

    def _budget_tokenizers(self) -> list[Any]:
        """The base's tokenizer and, once loaded, each extra expert's (its base's, or a full
        model's own); an external expert's provider counts as the base does."""
        if self._extra_tokenizers is None:
            from transformers import AutoTokenizer

            by_folder: dict[Path, Any] = {}
            for record in self.extra.values():
                if record.kind == "external" or record.base is None:
                    continue
                folder = (
                    self._folder(record.base.uri) if record.kind == "adapter" else self.registry.expert_path(record)
                )
                if folder is not None and folder != self.base_path and folder not in by_folder:
                    by_folder[folder] = AutoTokenizer.from_pretrained(
                        str(folder), trust_remote_code=bool(record.base.trust_remote_code)
                    )
            self._extra_tokenizers = list(by_folder.values())
        return [self.tokenizer, *self._extra_tokenizers]

    # ------------------------------------------------------------------ engines

    def attach_engine(self, engine) -> None:  # an Engine
        self._given_engine = engine
        self._dispatch = None
        self._context = None  # what this engine serves

    @property
    def engine(self):  # an Engine
        """The engine query-level composers call: the given one, else ``local_engine``. With extra
        experts, a ``DispatchEngine`` in front: external experts through litellm, and (without a
        given engine, which serves every base) other bases' adapters on an hf engine per base."""
        inner = self._given_engine if self._given_engine is not None else self.local_engine
        if not self.extra:
            return inner
        if self._dispatch is None:
            from services.engines.dispatch import DispatchEngine

            self._dispatch = DispatchEngine(inner, self._extra_engines(own_engines=self._given_engine is None))
        return self._dispatch

    def _extra_engines(self, own_engines: bool) -> dict[str, Any]:
        """Engines for the extra experts: each external one's own, and with ``own_engines`` an hf
        engine per other base for its adapters (full models load on ``local_engine``)."""
        from services.engines.external import external_engine_for

        parts: dict[str, Any] = {}
        per_base: dict[str, HFEngine] = {}
        for name, record in self.extra.items():
            if record.kind == "external":
                engine = external_engine_for(record)
                engine.load_model(name, record.uri)
                parts[name] = engine
            elif own_engines and record.kind == "adapter" and record.base is not None:
                if record.base.name not in per_base:
                    per_base[record.base.name] = HFEngine(
                        self._folder(record.base.uri),
                        base_name=record.base.name,
                        max_batch_size=self.max_batch_size,
                        trust_remote_code=bool(record.base.trust_remote_code),
                        device=self.device,
                        dtype=self.dtype,
                    )
                path = self.registry.expert_path(record)
                assert path is not None  # a ready adapter has its folder in the store
                per_base[record.base.name].load_adapter(name, path)
                parts[name] = per_base[record.base.name]
        return parts

    @property
    def local_engine(self) -> HFEngine:
        """Every expert of the pool on one hf engine in this process (adapters on the base, models
        by name). Merges need it even when ``engine`` is remote: merged adapters live on this disk."""
        if self._engine is None:
            engine = HFEngine(
                self.base_path,
                base_name=self.base.name,
                max_batch_size=self.max_batch_size,
                trust_remote_code=bool(self.base.trust_remote_code),
                device=self.device,
                dtype=self.dtype,
            )
            for name, info in self.experts.items():
                if info.kind == "external" or (info.kind == "adapter" and name in self.extra):
                    continue  # on engines of their own (``engine``)
                if info.adapter_path is not None:  # the adapters' (ExpertInfo)
                    engine.load_adapter(name, info.adapter_path)
                else:
                    model_path = self.registry.expert_path(self.records[name])
                    assert model_path is not None  # a ready full model has its folder in the store
                    engine.load_model(name, model_path)
            self._engine = engine
        return self._engine

    def mixture_engine(self):
        """(engine, MoLoRA) — an adapter-free engine whose base carries the MoLoRA layer."""
        if self._mixture_engine is None:
            from composer.molora import MoLoRA

            engine = HFEngine(
                self.base_path,
                base_name=self.base.name,
                adapter_mode="unmerged",
                max_batch_size=self.max_batch_size,
                trust_remote_code=bool(self.base.trust_remote_code),
                device=self.device,
                dtype=self.dtype,
            )
            self._molora = MoLoRA(engine.base_model)
            self._mixture_engine = engine
        return self._mixture_engine, self._molora

    # ------------------------------------------------------------------ routing artifacts

    def fitted(
        self,
        router: BaseRouter,
        router_name: str,
        experts: list[str] | None = None,
        refit: bool = False,
        left_out: dict[str, str] | None = None,
    ) -> dict[str, float]:
        """Load every expert's stored artifact for ``router_name`` into ``router``, fitting (and
        storing) the ones that have none, or one the router does not accept (``accepts_artifact``:
        e.g. fitted by an older recipe). Returns seconds spent fitting, per fitted expert.

        An expert the router cannot use (no examples for an example-based router; an adapter a
        token-level mixture cannot express, such as DoRA) is left out, with a warning, and its
        reason goes to ``left_out``: one unusual expert never stops a whole strategy."""
        fit_seconds: dict[str, float] = {}
        for name in experts if experts is not None else list(self.experts):
            info, rec = self.experts[name], self.records[name]
            stored = self.registry.get_artifacts(
                router=router_name, expert=name, version=rec.version, kind=ROUTING_ARTIFACT
            )
            artifact = None
            if stored and not refit:
                artifact = read_artifact(self.registry.artifact_path(stored[0]) / ARTIFACT_FILE)
                if not router.accepts_artifact(artifact):
                    artifact = None  # fitted by an older recipe: fit again (it replaces the stored one)
            try:
                if artifact is None:
                    t0 = time.perf_counter()
                    artifact = router.fit_expert(info)
                    fit_seconds[name] = time.perf_counter() - t0
                    self.registry.add_artifact(
                        router_name,
                        ROUTING_ARTIFACT,
                        artifact_bytes(artifact),
                        expert=name,
                        version=rec.version,
                        filename=ARTIFACT_FILE,
                    )
                router.load_expert(info, artifact)
            except ExpertUnusable as exc:  # what routers raise for an expert they cannot take
                log.warning("router %s leaves out expert %s: %s", router_name, name, exc)
                if left_out is not None:
                    left_out[name] = str(exc)
        return fit_seconds

    def restore_head(self, router, router_name: str) -> bool:
        """A router trained over all its experts at once (the classifier's head): load the stored
        head when it was trained on exactly the loaded experts (True), else train it and store it
        for the next process (False). Saves each process that builds the router (CLI, leaderboard,
        every strategies replica) a retrain."""
        stored = self.registry.get_artifacts(router=router_name, kind=HEAD_ARTIFACT)
        stored = [a for a in stored if a.expert_id is None]
        # newest first: strategies over different expert sets each keep a head of their own
        for artifact in stored[::-1][:HEADS_TRIED]:
            if router.load_head(read_artifact(self.registry.artifact_path(artifact) / ARTIFACT_FILE)):
                return True
        router.retrain()
        self.registry.add_artifact(
            router_name, HEAD_ARTIFACT, artifact_bytes(router.head_artifact()), filename=ARTIFACT_FILE
        )
        return False


def artifact_bytes(artifact: Artifact) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in artifact.tensors.items()}
    return safetensors.torch.save(tensors, metadata=dict(artifact.metadata) or None)


def read_artifact(path: Path) -> Artifact:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # a damaged artifact file must say which one
        raise MoergeError(f"routing artifact {path} does not load: {exc}") from exc
    return Artifact(tensors=tensors, metadata=metadata)
