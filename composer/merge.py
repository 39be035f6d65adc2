"""Parameter merging of LoRA experts into one adapter, cached on disk, and the plan that serves it.

Methods (``method``), all in ΔW space unless the name says otherwise:

- ``task_arithmetic``: ΔW = Σ w_i ΔW_i (λ folds into the weights).
- ``ties``: TIES-merging: per task vector keep the top ``density`` fraction by magnitude, elect
  each entry's sign by total mass, average the entries that agree with it (weights applied first).
- ``dare_linear`` / ``dare_ties``: DARE: drop each entry with probability 1 − ``density`` and
  rescale by 1 / ``density``, then a weighted sum / TIES. The drop mask is drawn from ``seed``.
- ``linear_factors``: factor space, Â = Σ w_i A_i and B̂ = Σ w_i B_i (LoraHub's composition). This
  is a *different model* from task arithmetic: B̂Â has cross terms w_i w_j B_i A_j. It needs equal
  ranks, alphas and target modules. (peft's own ``linear`` combination is yet another factor-space
  variant, √w on each factor; moerge does not offer it.)

The ΔW-space methods run through peft's ``add_weighted_adapter`` on the base model, which forms
each module's ΔW_i = scale_i · B_i A_i, combines them, and re-factors the result:

- ``combination="svd"`` (peft ``svd`` / ``ties_svd`` / ``dare_linear_svd`` / ``dare_ties_svd``):
  truncated SVD at ``svd_rank``. moerge's default rank is the sum of the input ranks (capped by
  the module size), where a task-arithmetic sum is exact; peft's own default (the largest input
  rank) would truncate it. TIES / DARE results are full rank, so any rank truncates them.
- ``combination="cat"``: exact for task arithmetic (A and B concatenated, rank = Σ r_i). TIES
  and DARE act on ΔW entries and have no exact factor form, so they need ``svd``.

peft caveat: with a single adapter, peft always takes its ``linear`` path, which for one adapter
is exactly w · ΔW — so TIES / DARE of a single adapter are not pruned.

Every merge is cached in ``out_dir`` under a key of (base, adapter folders with their size and
mtime, weights, method, parameters): asking again returns the same folder without recomputing.
Each folder is a plain peft adapter (``PeftModel.from_pretrained`` or ``engine.load_adapter``) with
a ``moerge_merge.json`` sidecar recording how it was made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from composer.base import (
    BaseComposer,
    Completion,
    ComposeError,
    Provenance,
    Scored,
    StrategyRuntime,
    base_target,
    output_of,
    top_experts,
    with_target,
)
from composer.engine_protocol import Engine, GenerateRequest, ScoreRequest
from routers.base import Decision
from routers.params import Param

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "linear_factors")
# methods whose combination is already a mean (over the experts that agree with each entry's
# sign): a strategy's equal or router weights are scaled to average 1 for them, as TIES and
# DARE-TIES merge at λ = 1, rather than to sum to 1, which would divide that mean by n again
AGREEING_MEAN = ("ties", "dare_ties")
COMBINATIONS = ("svd", "cat")
SIDECAR = "moerge_merge.json"
DEFAULT_DENSITY = 0.5  # for ties / dare_* when none is given

_PEFT_TYPES = {
    ("task_arithmetic", "svd"): "svd",
    ("task_arithmetic", "cat"): "cat",
    ("ties", "svd"): "ties_svd",
    ("dare_linear", "svd"): "dare_linear_svd",
    ("dare_ties", "svd"): "dare_ties_svd",
}


@dataclass(frozen=True)
class MergedAdapter:
    """A merged adapter folder; usable wherever a path is (``os.fspath``, ``str``)."""

    path: Path
    key: str
    cached: bool  # True when the folder came from the cache (nothing was computed)
    spec: dict = field(default_factory=dict)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def merge_adapters(
    base_path: str | Path,
    adapters: Mapping[str, str | Path],
    weights: Sequence[float] | Mapping[str, float] | None = None,
    method: str = "task_arithmetic",
    density: float | None = None,
    combination: str = "svd",
    out_dir: str | Path = "merged",
    *,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MergedAdapter:
    """Merge ``adapters`` (expert name → peft folder) with ``weights`` (same order, or by name;
    default uniform 1/n) into a peft folder under ``out_dir`` (the cache). ``trust_remote_code``:
    the base was registered with ``--trust-remote-code``. ``device``/``dtype``: where the base is
    loaded for peft's merge; peft keeps the adapters' factors in float32 whatever the base's dtype,
    so neither changes the result beyond float rounding (nor the cache key)."""
    if method not in METHODS:
        raise ComposeError(f"merge method must be one of {METHODS}, got {method!r}")
    if combination not in COMBINATIONS:
        raise ComposeError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
    if not adapters:
        raise ComposeError("merge: no adapters given")
    if method != "linear_factors" and (method, combination) not in _PEFT_TYPES:
        raise ComposeError(
            f"merge: {method} acts on ΔW entries and has no exact factor form; use combination='svd' "
            "(combination='cat' is exact for task_arithmetic only)"
        )
    names = list(adapters)
    w = _weights(names, weights)
    if method in ("ties", "dare_linear", "dare_ties"):
        density = DEFAULT_DENSITY if density is None else float(density)
        if not 0 < density <= 1:
            raise ComposeError(f"density must be in (0, 1], got {density}")
    else:
        density = None
    spec = {
        "method": method,
        "combination": combination if method != "linear_factors" else "factors",
        "experts": names,
        "weights": w,
        "density": density,
        "svd_rank": svd_rank,
        "majority_sign_method": majority_sign_method if method in ("ties", "dare_ties") else None,
        "seed": seed if method.startswith("dare") else None,
        "base": str(Path(base_path).resolve()),
    }
    key = _cache_key(spec, adapters)
    out_dir = Path(out_dir)
    final = out_dir / f"{method}-{key[:16]}"
    if _complete(final):
        return MergedAdapter(final, key, True, spec)

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
    try:
        paths = [Path(adapters[n]) for n in names]
        if method == "linear_factors":
            config, state = factor_space_state(paths, w)
            write_adapter_folder(tmp, config, state)
        else:
            info = _build(
                base_path,
                paths,
                w,
                _PEFT_TYPES[(method, combination)],
                density,
                svd_rank,
                majority_sign_method,
                seed,
                tmp,
                trust_remote_code,
                device,
                dtype,
            )
            spec["svd_rank"] = info["rank"] if combination == "svd" else None
            spec["rank"] = info["rank"]
        (tmp / SIDECAR).write_text(json.dumps({"key": key, **spec}, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same merge first: theirs is as good
            if not _complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return MergedAdapter(final, key, False, spec)


# ------------------------------------------------------------------------- ΔW space (peft)


def _build(
    base_path: str | Path,
    paths: list[Path],
    weights: list[float],
    combination_type: str,
    density: float | None,
    svd_rank: int | None,
    majority_sign_method: str,
    seed: int,
    dest: Path,
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Load the base with every adapter, let peft combine them, save only the result to ``dest``."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    # the base's own code only when it was registered with --trust-remote-code; never a prompt asking
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype, trust_remote_code=trust_remote_code)
    base.to(device)  # type: ignore[arg-type]  # transformers' wrapped .to
    names = [f"e{i}" for i in range(len(paths))]
    try:
        model = PeftModel.from_pretrained(base, str(paths[0]), adapter_name=names[0], is_trainable=False)
        for name, path in zip(names[1:], paths[1:]):
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ComposeError(f"merge: an adapter does not load on base {base_path}: {exc}") from exc

    configs: list[Any] = [model.peft_config[n] for n in names]  # LoraConfigs (peft types them PeftConfig)
    ranks = [c.r for c in configs]
    if any(c.rank_pattern for c in configs):
        ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    rank = sum(ranks) if combination_type == "cat" else (svd_rank or sum(ranks))
    if combination_type != "cat":
        # the SVD keeps at most min(d_out, d_in) directions in any module
        lora_layers: list[Any] = [m for m in model.modules() if isinstance(m, LoraLayer)]
        smallest = min(min(m.in_features, m.out_features) for m in lora_layers)
        rank = min(rank, smallest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # DARE's drop masks come from torch's global RNG
        model.add_weighted_adapter(
            adapters=names,
            weights=list(weights),
            adapter_name="merged",
            combination_type=combination_type,
            svd_rank=rank,
            density=density,
            majority_sign_method=majority_sign_method,
        )
    model.peft_config["merged"].base_model_name_or_path = str(base_path)
    staging = dest.with_name(dest.name + "-peft")
    try:
        model.save_pretrained(str(staging), selected_adapters=["merged"])
        # peft writes a non-default adapter into a sub-folder named after it
        produced = staging / "merged" if (staging / "merged" / "adapter_config.json").is_file() else staging
        os.rename(produced, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    merged: Any = model.peft_config["merged"]
    return {"rank": merged.r}


# ------------------------------------------------------------------------- factor space


def factor_space_state(paths: Sequence[Path], weights: Sequence[float]) -> tuple[dict, dict[str, torch.Tensor]]:
    """LoraHub's composition: every LoRA tensor is Σ w_i · tensor_i (A and B alike).

    Returns the first adapter's config (as a dict) and the composed state dict. The adapters must
    share rank, alpha, target modules and tensor keys, or the sum is not defined."""
    configs, states = load_factor_states(paths)
    return configs[0], combine_factor_states(states, weights)


def load_factor_states(paths: Sequence[Path]) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    from peft.utils import load_peft_weights

    configs = [json.loads((Path(p) / "adapter_config.json").read_text()) for p in paths]
    fields = ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora")
    for p, c in zip(paths[1:], configs[1:]):
        diff = [f for f in fields if c.get(f) != configs[0].get(f)]
        if _modules(c) != _modules(configs[0]):
            diff.append("target_modules")
        if diff:
            raise ComposeError(
                f"factor-space composition needs identical LoRA configs; {p} differs from {paths[0]} in {diff}"
            )
    if configs[0].get("use_dora"):
        raise ComposeError("factor-space composition does not support DoRA adapters")
    states = [{k: v.float() for k, v in load_peft_weights(str(p), device="cpu").items()} for p in paths]
    for p, s in zip(paths[1:], states[1:]):
        if set(s) != set(states[0]) or any(s[k].shape != states[0][k].shape for k in s):
            raise ComposeError(f"factor-space composition: {p} has other LoRA tensors than {paths[0]}")
    return configs, states


def combine_factor_states(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | np.ndarray
) -> dict[str, torch.Tensor]:
    out = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key])
        for w, s in zip(weights, states):
            acc.add_(s[key], alpha=float(w))
        out[key] = acc
    return out


def write_adapter_folder(dest: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "adapter_model.safetensors"))


def _modules(config: dict):
    tm = config.get("target_modules")
    return sorted(tm) if isinstance(tm, list) else tm


# ------------------------------------------------------------------------- cache helpers


def _weights(names: list[str], weights: Sequence[float] | Mapping[str, float] | None) -> list[float]:
    if weights is None:
        return [1.0 / len(names)] * len(names)
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        if missing:
            raise ComposeError(f"merge: no weight for {missing}")
        return [float(weights[n]) for n in names]
    if len(weights) != len(names):
        raise ComposeError(f"merge: {len(names)} adapters but {len(weights)} weights")
    return [float(x) for x in weights]


def _cache_key(spec: dict, adapters: Mapping[str, str | Path]) -> str:
    def identity(path: str | Path) -> list:
        p = Path(path).resolve()
        files = sorted(
            f
            for f in p.iterdir()
            if f.name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
        )
        return [str(p)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]

    blob = json.dumps({"spec": spec, "adapters": [identity(adapters[n]) for n in spec["experts"]]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _complete(folder: Path) -> bool:
    return (folder / SIDECAR).is_file() and (folder / "adapter_config.json").is_file()


# ------------------------------------------------------------------------- the plan


def mergeable(adapters: Mapping[str, Path | None]) -> tuple[dict, dict[str, str]]:
    """The adapters a ΔW merge can combine, and why the others are left out: peft's weighted merge
    takes each layer's LoRA delta only, so a DoRA adapter would lose its magnitudes and one with
    modules_to_save its own modules."""
    keep, left_out = {}, {}
    for name, path in adapters.items():
        if path is None:  # a full model or an external expert: nothing to merge
            left_out[name] = "not a LoRA adapter"
            continue
        try:
            config = json.loads((path / "adapter_config.json").read_text())
        except (OSError, ValueError):
            config = {}
        if config.get("use_dora"):
            left_out[name] = "a DoRA adapter: a ΔW merge would drop its magnitude vectors"
        elif config.get("modules_to_save"):
            left_out[name] = f"modules_to_save ({', '.join(config['modules_to_save'])}) cannot be merged"
        else:
            keep[name] = path
    return keep, left_out


class Merged(BaseComposer):
    """Composer: merge the decision's experts (router weights or uniform) and let the merged adapter
    answer. Merges come from the cache after the first time; merged adapters stay loaded on the
    engine (at most ``max_loaded`` of them, oldest unloaded first)."""

    level = "query"
    kinds = ("adapter",)
    runs_on = "local"  # it loads the adapter it merged: the engine must read this process's files
    one_base = True
    scores_text = True
    usable = staticmethod(mergeable)  # the adapters a ΔW merge can take
    PARAMS = (
        Param("method", "str", "task_arithmetic", "how the adapters merge", choices=METHODS),
        Param("k", "int", None, "merge the decision's first k experts (default: every one it names)", minimum=1),
        Param("density", "float", None, "share of each delta kept (TIES, DARE)", minimum=0, maximum=1),
        Param("scale", "float", 1.0, "task arithmetic's λ", minimum=0),
        Param(
            "weighting",
            "str",
            "uniform",
            "equal weights, or the router's; they sum to 1 (TIES, DARE-TIES: average 1)",
            choices=("uniform", "router"),
        ),
        Param("seed", "int", 0, "DARE's drop seed"),
    )

    def __init__(
        self,
        base_path: str | Path,
        adapter_paths: Mapping[str, str | Path],
        cache_dir: str | Path,
        method: str = "task_arithmetic",
        *,
        k: int | None = None,
        weighting: str = "router",  # router | uniform
        scale: float = 1.0,  # task arithmetic's λ
        density: float | None = None,
        combination: str = "svd",
        svd_rank: int | None = None,
        seed: int = 0,
        max_loaded: int = 4,
        trust_remote_code: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if weighting not in ("router", "uniform"):
            raise ComposeError(f"weighting must be 'router' or 'uniform', got {weighting!r}")
        self.base_path = base_path
        self.adapter_paths = adapter_paths
        self.cache_dir = Path(cache_dir)
        self.method = method
        self.k = k
        self.weighting = weighting
        self.scale = scale
        self.density = density
        self.combination = combination
        self.svd_rank = svd_rank
        self.seed = seed
        self.max_loaded = max_loaded
        self.trust_remote_code = trust_remote_code
        self.device, self.dtype = device, dtype
        self._loaded: list[str] = []
        self.name = f"merge-{method}"

    @classmethod
    def from_strategy(cls, runtime: StrategyRuntime, strategy) -> Merged:  # noqa: ANN001 - a Strategy
        params = {"weighting": "uniform", **strategy.composer_params}  # PARAMS' default
        return cls(
            runtime.base_path,
            runtime.adapter_paths(runtime.experts_of(strategy)),
            runtime.merge_cache,
            trust_remote_code=runtime.trust_remote_code,
            device=runtime.device,  # where the strategy's engines run
            dtype=runtime.dtype,
            **params,
        )

    def execute(self, decision: Decision, request: GenerateRequest, engine: Engine) -> Completion:
        target, weights, merged = self._merged_target(decision, engine)
        [result] = engine.generate([with_target(request, target)])
        info = (
            {
                "merged_adapter": str(merged.path),
                "merge_key": merged.key,
                "cache_hit": merged.cached,
                "merge": merged.spec,
            }
            if merged is not None
            else {"fallback": "the router chose no expert; the base answered"}
        )
        return Completion(
            text=result.text,
            finish_reason=result.finish_reason,
            provenance=Provenance(
                composer=self.name,
                router=decision.router,
                experts=list(weights.items()),
                outputs=[output_of(target, result, weight=1.0)],
                decision_info=decision.info,
                info=info,
            ),
        )

    def score_batch(
        self, decisions: Sequence[Decision], requests: Sequence[ScoreRequest], engine: Engine
    ) -> list[Scored]:
        """Each text scored by its decision's merged adapter: one merge and one engine call per
        distinct set of experts and weights (merged right before its call, so that no more than
        ``max_loaded`` merges need be loaded at once)."""
        out: list[Scored | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, d in enumerate(decisions):
            experts = top_experts(d, self.k)
            groups.setdefault(
                tuple(sorted(n for n, _ in experts)) if self.weighting == "uniform" else tuple(experts), []
            ).append(i)
        for rows in groups.values():
            target, weights, _ = self._merged_target(decisions[rows[0]], engine)
            results = engine.score([replace(requests[i], target=target) for i in rows])
            for i, result in zip(rows, results):
                # each in its own decision's order (a group may hold the same experts in another)
                mine = [n for n, _ in top_experts(decisions[i], self.k)]
                out[i] = Scored(result, [(n, weights[n]) for n in mine], target)
        return out  # type: ignore[return-value]  # every row was filled

    def _merged_target(self, decision: Decision, engine: Engine) -> tuple[str, dict[str, float], MergedAdapter | None]:
        """The decision's experts merged (from the cache after the first time) and loaded on
        ``engine``: (its target name, the weights merged, the merged adapter). A decision naming
        no expert is the base's, as for a single expert."""
        experts = top_experts(decision, self.k)
        if not experts:
            return base_target(engine), {}, None
        unknown = [n for n, _ in experts if n not in self.adapter_paths]
        if unknown:
            raise ComposeError(f"{self.name}: {unknown} are not LoRA adapters on this base; cannot merge them")
        if self.weighting == "uniform":
            experts = [(n, 1.0 / len(experts)) for n, _ in experts]
        if self.method in AGREEING_MEAN:  # weights that average to 1: the mean is TIES' own
            experts = [(n, w * len(experts)) for n, w in experts]
        weights = {n: self.scale * w for n, w in experts}
        merged = merge_adapters(
            self.base_path,
            {n: self.adapter_paths[n] for n, _ in experts},
            weights,
            self.method,
            self.density,
            self.combination,
            self.cache_dir,
            svd_rank=self.svd_rank,
            seed=self.seed,
            trust_remote_code=self.trust_remote_code,
            device=self.device,
            dtype=self.dtype,
        )
        target = f"merged-{merged.key[:12]}"
        if target not in engine.targets():
            engine.load_adapter(target, str(merged.path))
            self._loaded.append(target)
            while len(self._loaded) > self.max_loaded:
                old = self._loaded.pop(0)
                if old in engine.targets():
                    engine.unload_adapter(old)
        return target, weights, merged
