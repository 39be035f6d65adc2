"""Named strategies — (router, composer, params) triples — and the runtime that executes them.

Every strategy is addressable by name (``moe/classifier``, ``moe/glider``, …) in the CLI, the
Python API and (later) the gateway's ``model`` field. ``MoE`` builds a strategy's router on first
use, loading each expert's stored routing artifact or fitting and storing it (``ExpertPool.fitted``),
and executes decisions with the strategy's composer on the pool's engines.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from composer.base import Completion, ComposeError
from composer.engine_protocol import GenerateRequest
from composer.ensemble import Ensemble
from composer.merge import Merged
from composer.mixture import TokenwiseMixture
from composer.single import Single
from composer.stitch import Stitch
from registry.config import moerge_home
from registry.errors import NotFoundError
from routers import QUERY_ROUTERS, TOKEN_ROUTERS
from routers.base import Decision, ExpertExample, ExpertInfo, MixtureSpec, RouteRequest
from routers.embedder import get_embedder
from services.moe.pool import ExpertPool
from services.zoo.skills import SKILLS, exact_match, format_prompt


@dataclass(frozen=True)
class Strategy:
    name: str
    router: str
    composer: str  # single | vote | weighted-vote | mixture | merge | stitch
    description: str
    router_params: dict = field(default_factory=dict)
    composer_params: dict = field(default_factory=dict)

    @property
    def level(self) -> str:
        return "token" if self.router in TOKEN_ROUTERS else "query"


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("moe/oracle", "oracle", "single", "gold task → its expert (upper bound; needs the task)"),
        Strategy("moe/random", "random", "single", "a uniformly random expert (seeded)"),
        Strategy("moe/base", "base", "single", "no expert: the base model answers"),
        Strategy("moe/best-single", "best-single", "single", "the expert with the best validation accuracy"),
        Strategy("moe/classifier", "classifier", "single", "MoDEM: fine-tuned MiniLM classifier → one expert"),
        Strategy("moe/semantic", "semantic", "single", "nearest experts by MiniLM example embeddings, with fallback"),
        Strategy("moe/retrieval", "retrieval", "single", "PHATGOOSE's retrieval baseline: max cosine → one expert"),
        Strategy("moe/skill-k3-vote", "skill", "vote", "Symbolic-MoE: recruit 3 experts by skill, majority vote",
                 {"k": 3}, {"k": 3}),
        Strategy("moe/skill-k3-weighted", "skill", "weighted-vote",
                 "Symbolic-MoE: recruit 3 experts by skill, router-weighted vote", {"k": 3}, {"k": 3}),
        Strategy("moe/phatgoose", "phatgoose", "mixture", "PHATGOOSE: learned per-module gates, top-2 per token"),
        Strategy("moe/average-activation", "average-activation", "mixture",
                 "PHATGOOSE's average-activation baseline, top-2 per token"),
        Strategy("moe/arrow", "arrow", "mixture", "Arrow: SVD prototypes of the LoRA factors, top-2 per token"),
        # α = 1000, the top of the paper's range, chosen on the validation split of the small zoo
        # (0.992 vs 0.984 at α = 100; docs/benchmarks.md)
        Strategy("moe/glider", "glider", "mixture", "GLIDER: PHATGOOSE local scores + α·global task similarity",
                 {"alpha": 1000.0}),
        Strategy("moe/task-arithmetic", "all", "merge", "uniform task-arithmetic merge of every adapter (ΔW space)",
                 composer_params={"method": "task_arithmetic"}),
        Strategy("moe/ties", "all", "merge", "TIES merge of every adapter (ΔW space, density 0.5)",
                 composer_params={"method": "ties", "density": 0.5}),
        Strategy("moe/dare", "all", "merge", "DARE-TIES merge of every adapter (ΔW space, density 0.5)",
                 composer_params={"method": "dare_ties", "density": 0.5}),
        Strategy("moe/stitch", "semantic", "stitch",
                 "split a chained request into steps, route each step (semantic), feed outputs forward"),
    ]
}


def get_strategy(name: str) -> Strategy:
    key = name if name.startswith("moe/") else f"moe/{name}"
    if key not in STRATEGIES:
        raise NotFoundError(f"unknown strategy {name!r}; `moerge strategies list` shows them")
    return STRATEGIES[key]


def zoo_step_prompt(instruction: str, text: str) -> str:
    """A stitched step in the zoo's own prompt format."""
    return format_prompt(instruction, text)


@dataclass
class Routed:
    decision: Decision | MixtureSpec
    router_ms: float


class MoE:
    """Strategies over one ``ExpertPool``: routers built lazily, decisions executed by composers."""

    def __init__(self, pool: ExpertPool, *, seed: int = 0) -> None:
        self.pool = pool
        self.seed = seed
        self._routers: dict[str, object] = {}
        self._composers: dict[str, object] = {}
        self.fit_seconds: dict[str, dict[str, float]] = {}
        self._mixture_experts: set[str] = set()
        # router name -> {expert: why the router left it out}; reported in each answer's provenance
        self.left_out: dict[str, dict[str, str]] = {}

    # ------------------------------------------------------------------ routers

    @staticmethod
    def _router_key(name: str, params: dict | None) -> str:
        return name + "".join(f":{k}={v}" for k, v in sorted((params or {}).items()))

    def router(self, name: str, params: dict | None = None):
        params = dict(params or {})
        key = self._router_key(name, params)
        if key in self._routers:
            return self._routers[key]
        experts = self.pool.names("adapter") if name in TOKEN_ROUTERS else self.pool.names()
        if name == "all":  # the merge strategies' router: every adapter a ΔW merge can take
            experts = list(mergeable(self.pool.adapters())[0])
        if name == "glider":
            # GLIDER's local part is PHATGOOSE's gates: reuse them rather than training again
            params.setdefault("local", self.router("phatgoose"))  # its embedder defaults to MiniLM
        elif name in ("classifier", "semantic", "retrieval"):
            params.setdefault("embedder", get_embedder())
        elif name == "skill":
            params.setdefault("embedder", get_embedder())
            params.setdefault("evaluate_fn", self.validation_correctness)
            params.setdefault("validation_examples", self.validation_pool())
            params.setdefault("task_skills", suite_task_skills())
        elif name == "best-single":
            params.setdefault("evaluate_fn", self.validation_correctness)
            params.setdefault("validation_examples", self.validation_pool())
        elif name == "random":
            params.setdefault("seed", self.seed)
        cls = TOKEN_ROUTERS.get(name) or QUERY_ROUTERS.get(name)
        if cls is None:
            raise NotFoundError(f"unknown router {name!r}")
        router = cls(**params)
        left_out: dict[str, str] = {}
        self.fit_seconds[key] = self.pool.fitted(router, name, experts, left_out=left_out)
        if experts and len(left_out) == len(experts):
            raise ComposeError(f"router {name!r} can use none of the experts: "
                               + "; ".join(f"{n}: {why}" for n, why in left_out.items()))
        self.left_out[key] = left_out
        if hasattr(router, "retrain"):  # the classifier's head over every expert: stored, or trained here
            t0 = time.perf_counter()
            if not self.pool.restore_head(router, name):
                self.fit_seconds[key]["(retrain)"] = time.perf_counter() - t0
        self._routers[key] = router
        return router

    def route(self, strategy: Strategy | str, prompt: str, task: str | None = None) -> Routed:
        strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        router = self.router(strategy.router, strategy.router_params)
        t0 = time.perf_counter()
        decision = router.route(RouteRequest(prompt, task))
        return Routed(decision, (time.perf_counter() - t0) * 1000)

    # ------------------------------------------------------------------ composers

    def composer(self, strategy: Strategy):
        if strategy.name in self._composers:
            return self._composers[strategy.name]
        kind, params = strategy.composer, dict(strategy.composer_params)
        if kind == "single":
            composer = Single()
        elif kind in ("vote", "weighted-vote"):
            composer = Ensemble(vote="majority" if kind == "vote" else "weighted", **params)
        elif kind == "merge":
            adapters, left_out = mergeable(self.pool.adapters())
            if not adapters:
                raise ComposeError(f"strategy {strategy.name}: no adapter can be merged ("
                                   + "; ".join(f"{n}: {why}" for n, why in left_out.items()) + ")")
            self.left_out[f"composer:{strategy.name}"] = left_out
            composer = Merged(self.pool.base_path, adapters, moerge_home() / "cache" / "merged",
                              weighting="uniform", trust_remote_code=bool(self.pool.base.trust_remote_code),
                              **params)
        elif kind == "stitch":
            composer = Stitch(self.router(strategy.router, strategy.router_params), make_step_prompt=zoo_step_prompt)
        elif kind == "mixture":
            _, mix = self.pool.mixture_engine()
            composer = TokenwiseMixture(mix, max_batch_size=self.pool.max_batch_size)
        else:
            raise ComposeError(f"strategy {strategy.name}: unknown composer {kind!r}")
        self._composers[strategy.name] = composer
        return composer

    def _prepare_mixture(self, router, spec: MixtureSpec) -> None:
        """Put the spec's experts (factors + this router's gate vectors) into the MoLoRA layer."""
        _, mix = self.pool.mixture_engine()
        adapters = self.pool.adapters()
        for name in spec.experts:
            key = (name, spec.gate)
            if key not in self._mixture_experts:
                gates = {spec.gate: router.gate_vectors(name)}
                if name in mix.experts:
                    mix.set_gate_vectors(name, spec.gate, gates[spec.gate])
                else:
                    mix.add_expert(name, adapters[name], gates=gates)
                self._mixture_experts.add(key)

    def run(
        self,
        strategy: Strategy | str,
        prompts: Sequence[str],
        tasks: Sequence[str | None] | None = None,
        conversations: Sequence[tuple[tuple[str, str], ...]] | None = None,
        **sampling,
    ) -> list[tuple[Completion, Routed]]:
        """Route and answer every prompt; batched where the composer allows (single, mixture).
        ``sampling``: ``GenerateRequest``'s fields (max_new_tokens, temperature, seed, top_p, stop,
        messages, …); they hold for every generation the strategy makes (each recruit, each
        stitched step, the aggregator). ``conversations``: each prompt's own chat messages, where
        prompts of different chats share one call."""
        strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        routed = self.route_many(strategy, prompts, tasks)
        return self.answer(strategy, prompts, routed, conversations, **sampling)

    def route_many(self, strategy: Strategy, prompts: Sequence[str],
                   tasks: Sequence[str | None] | None = None) -> list[Routed]:
        """``run``'s first half: the router and the composer built (a bad composer fails before
        any routing), then one decision per prompt."""
        tasks = list(tasks) if tasks is not None else [None] * len(prompts)
        self.router(strategy.router, strategy.router_params)
        self.composer(strategy)
        return [self.route(strategy, p, t) for p, t in zip(prompts, tasks)]

    def answers_without_routers(self, strategy: Strategy) -> bool:
        """Whether ``answer`` for this strategy only calls the engine (``pool.engine``), never a
        router or an in-process model: true for the single and ensemble composers."""
        return isinstance(self.composer(strategy), (Single, Ensemble))

    def answer(self, strategy: Strategy, prompts: Sequence[str], routed: Sequence[Routed],
               conversations: Sequence[tuple[tuple[str, str], ...]] | None = None,
               **sampling) -> list[tuple[Completion, Routed]]:
        """``run``'s second half: the composer executes the decisions ``route`` made. ``sampling``:
        ``run``'s keywords (``GenerateRequest``'s fields)."""
        composer = self.composer(strategy)
        sampling["stop"] = tuple(sampling.get("stop", ()))
        if conversations is None:
            requests = [GenerateRequest(p, None, **sampling) for p in prompts]
        else:
            requests = [GenerateRequest(p, None, **{**sampling, "messages": c}) for p, c in zip(prompts, conversations)]
        if isinstance(composer, TokenwiseMixture):
            engine, _ = self.pool.mixture_engine()
            router = self.router(strategy.router, strategy.router_params)
            for r in routed:
                self._prepare_mixture(router, r.decision)
            completions = composer.execute_batch([r.decision for r in routed], requests, engine)
        elif isinstance(composer, (Single, Ensemble)):
            completions = composer.execute_batch([r.decision for r in routed], requests, self.pool.engine)
        else:
            engine = self.pool.local_engine if isinstance(composer, Merged) else self.pool.engine
            completions = [composer.execute(r.decision, q, engine) for r, q in zip(routed, requests)]
        left_out = {**self.left_out.get(self._router_key(strategy.router, strategy.router_params), {}),
                    **self.left_out.get(f"composer:{strategy.name}", {})}
        if strategy.router == "glider":  # its local part is PHATGOOSE's
            left_out = {**self.left_out.get("phatgoose", {}), **left_out}
        if left_out:
            for completion in completions:
                completion.provenance.info.setdefault("left_out", left_out)
        return list(zip(completions, routed))

    # ------------------------------------------------------------------ validation results

    def validation_pool(self) -> list[ExpertExample]:
        """Every expert's validation examples: the shared pool each expert is profiled on."""
        seen, pool = set(), []
        for info in self.pool.experts.values():
            for ex in info.examples:
                if ex.split == "validation" and ex.prompt not in seen:
                    seen.add(ex.prompt)
                    pool.append(ex)
        return pool

    def validation_correctness(self, expert: ExpertInfo, examples: Sequence[ExpertExample]) -> list[bool]:
        """Exact match of ``expert`` on ``examples`` (Symbolic-MoE profiles, best-single)."""
        budget = self.pool.token_budget(e.reference for e in examples)
        requests = [GenerateRequest(e.prompt, expert.name, budget) for e in examples]
        results = self.pool.engine.generate(requests)
        return [exact_match(r.text, e.reference) for r, e in zip(results, examples)]


def mergeable(adapters: dict) -> tuple[dict, dict[str, str]]:
    """The adapters a ΔW merge can combine, and why the others are left out: peft's weighted merge
    takes each layer's LoRA delta only, so a DoRA adapter would lose its magnitudes and one with
    modules_to_save its own modules."""
    import json

    keep, left_out = {}, {}
    for name, path in adapters.items():
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


def suite_task_skills() -> dict[str, list[str]]:
    """Skill keywords per task of the built-in skills suite (Symbolic-MoE's per-question skills;
    here the suite's own tags stand in for the paper's LLM-written keywords)."""
    return {name: [name, *skill.tags] for name, skill in SKILLS.items()}


def expert_for_task(pool: ExpertPool) -> dict[str, str]:
    """Gold task → the adapter expert trained on it (the oracle's mapping; for routing accuracy)."""
    out: dict[str, str] = {}
    for name, info in pool.experts.items():
        if info.kind != "adapter":
            continue
        for ex in info.examples:
            if ex.split == "train" and ex.task:
                out.setdefault(ex.task, name)
    return out
