"""Named strategies — a router and a composer with their parameters, over an expert set — and
the runtime that executes them.

Every strategy is addressable by name (``moe/classifier``, ``moe/glider``, …) in the CLI, the
Python API and the gateway's ``model`` field. The built-ins are ``STRATEGIES``; users define more
as data (services/moe/definitions.py, services/moe/catalog.py). ``MoE`` builds a strategy's router
on first use, loading each expert's stored routing artifact or fitting and storing it
(``ExpertPool.fitted``), and executes decisions with the strategy's composer on the pool's engines.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from composer import composer_class
from composer.base import BaseComposer, Completion, ComposeError, Scored
from composer.engine_protocol import Engine, GenerateRequest, ScoreRequest
from registry.config import moerge_home
from registry.errors import NotFoundError
from routers import router_class
from routers.base import BaseRouter, Decision, ExpertExample, ExpertInfo, Level, MixtureSpec, RouteRequest
from routers.embedder import get_embedder
from routers.params import artifact_key
from routers.skill import declared_task_skills
from services.moe.expert_sets import Candidate, select_experts, split_expert_set, strategy_kinds
from services.moe.pool import ExpertPool
from services.moe.texts import fitting_prefix


@dataclass(frozen=True)
class Strategy:
    name: str
    router: str  # a name in routers.ROUTERS (or a plugin's)
    composer: str  # a name in composer.COMPOSERS (or a plugin's): single | vote | weighted-vote | …
    description: str
    router_params: dict = field(default_factory=dict)
    composer_params: dict = field(default_factory=dict)
    # expert names and filters (services/moe/definitions.py); empty: every expert the methods take
    experts: tuple[str, ...] = ()
    fallback: str | None = None  # answers when the router chooses no expert, or the chosen ones fail
    source: str = "builtin"  # builtin | file:<path> | registry

    @property
    def level(self) -> Level:
        cls = router_class(self.router)
        return cls.level if cls is not None else "query"


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("moe/oracle", "oracle", "single", "gold task → its expert (upper bound; needs the task)"),
        Strategy("moe/random", "random", "single", "a uniformly random expert (seeded)"),
        Strategy("moe/base", "base", "single", "no expert: the base model answers"),
        Strategy(
            "moe/best-single",
            "best-single",
            "single",
            "the expert with the best validation accuracy (on documents: the lowest held-out loss)",
        ),
        Strategy("moe/classifier", "classifier", "single", "MoDEM: fine-tuned MiniLM classifier → one expert"),
        Strategy("moe/semantic", "semantic", "single", "nearest experts by MiniLM example embeddings, with fallback"),
        Strategy("moe/retrieval", "retrieval", "single", "PHATGOOSE's retrieval baseline: max cosine → one expert"),
        Strategy(
            "moe/skill-k3-vote",
            "skill",
            "vote",
            "Symbolic-MoE: recruit 3 experts by skill, majority vote",
            {"k": 3},
            {"k": 3},
        ),
        Strategy(
            "moe/skill-k3-weighted",
            "skill",
            "weighted-vote",
            "Symbolic-MoE: recruit 3 experts by skill, router-weighted vote",
            {"k": 3},
            {"k": 3},
        ),
        Strategy("moe/phatgoose", "phatgoose", "mixture", "PHATGOOSE: learned per-module gates, top-2 per token"),
        Strategy(
            "moe/average-activation",
            "average-activation",
            "mixture",
            "PHATGOOSE's average-activation baseline, top-2 per token",
        ),
        Strategy("moe/arrow", "arrow", "mixture", "Arrow: SVD prototypes of the LoRA factors, top-2 per token"),
        # α = 1000, the top of the paper's range, chosen on the validation split of the small zoo
        # (0.992 vs 0.984 at α = 100; docs/benchmarks.md)
        Strategy(
            "moe/glider",
            "glider",
            "mixture",
            "GLIDER: PHATGOOSE local scores + α·global task similarity",
            {"alpha": 1000.0},
        ),
        Strategy(
            "moe/task-arithmetic",
            "all",
            "merge",
            "uniform task-arithmetic merge of every adapter (ΔW space)",
            composer_params={"method": "task_arithmetic"},
        ),
        Strategy(
            "moe/ties",
            "all",
            "merge",
            "TIES merge of every adapter (ΔW space, density 0.5)",
            composer_params={"method": "ties", "density": 0.5},
        ),
        Strategy(
            "moe/dare",
            "all",
            "merge",
            "DARE-TIES merge of every adapter (ΔW space, density 0.5)",
            composer_params={"method": "dare_ties", "density": 0.5},
        ),
        # issue 17: on documents that mix domains, the classifier's two likeliest experts merged beat
        # its single choice (docs/benchmarks.md, "The domains zoo on the leaderboard")
        Strategy(
            "moe/classifier-merge-top2",
            "classifier",
            "merge",
            "the classifier's 2 likeliest experts, TIES-merged per query (density 0.5; merges cached)",
            {"k": 2},
            {"method": "ties", "density": 0.5, "k": 2},
        ),
        Strategy(
            "moe/stitch",
            "semantic",
            "stitch",
            "split a chained request into steps, route each step (semantic), feed outputs forward",
        ),
    ]
}


def get_strategy(name: str) -> Strategy:
    """A built-in strategy by name (``MoE.strategy`` also finds the file's and the registry's)."""
    key = name if name.startswith("moe/") else f"moe/{name}"
    if key not in STRATEGIES:
        raise NotFoundError(f"unknown strategy {name!r}; `moerge strategies list` shows them")
    return STRATEGIES[key]


@dataclass
class Routed:
    decision: Decision | MixtureSpec
    router_ms: float


class MoE:
    """Strategies over one ``ExpertPool``: routers built lazily, decisions executed by composers.
    ``catalog``: where strategy names are looked up (default: the pool registry's built-ins, file
    and stored strategies, ``services.moe.catalog``)."""

    def __init__(self, pool: ExpertPool, *, seed: int = 0, catalog=None) -> None:
        self.pool = pool
        self.seed = seed
        self._catalog = catalog
        self._routers: dict[str, object] = {}
        # by the whole definition (``repr``): a strategy removed and defined again differently
        # gets its own composer and expert set
        self._composers: dict[str, BaseComposer] = {}
        self._experts: dict[str, list[str]] = {}
        self._strategy_routers: dict[str, object] = {}
        self.fit_seconds: dict[str, dict[str, float]] = {}
        # router key -> {expert: why the router left it out}; reported in each answer's provenance
        self.left_out: dict[str, dict[str, str]] = {}

    @property
    def catalog(self):  # a StrategyCatalog (imported late: it imports this module)
        if self._catalog is None:
            from services.moe.catalog import StrategyCatalog

            self._catalog = StrategyCatalog(self.pool.registry)
        return self._catalog

    def strategy(self, strategy: Strategy | str) -> Strategy:
        return self.catalog.get(strategy) if isinstance(strategy, str) else strategy

    # ------------------------------------------------------------------ experts

    def experts_of(self, strategy: Strategy) -> list[str]:
        """The pool's experts ``strategy`` may choose: its expert set, of the kinds its router and
        composer take. A composer that cannot take some of them (a merge and a DoRA adapter)
        leaves them out, and its reasons are kept for the answers' provenance."""
        key = repr(strategy)
        if key not in self._experts:
            self._experts[key] = self._select_experts(strategy)
        return self._experts[key]

    def _select_experts(self, strategy: Strategy) -> list[str]:
        kinds = strategy_kinds(strategy)
        base = self.pool.base.name
        # a merge or a mixture takes this base's adapters only; the others, the pool's extra
        # experts too (other bases', external ones)
        one_base = self._composer_class(strategy).one_base
        candidates = [
            Candidate(n, e.kind, self.pool.base_name_of(n), e.domains, e.skills)
            for n, e in self.pool.experts.items()
            if not one_base or self.pool.base_name_of(n) == base
        ]
        names, _ = split_expert_set(strategy.experts)
        missing = [n for n in names if n not in {c.name for c in candidates}]
        if missing:
            raise ComposeError(f"{strategy.name}: {', '.join(missing)} not among the ready experts on base {base}")
        chosen = [n for n in select_experts(strategy.experts, candidates) if self.pool.experts[n].kind in kinds]
        keep, left_out = self._composer_class(strategy).usable({n: self.pool.experts[n].adapter_path for n in chosen})
        self.left_out[f"composer:{strategy.name}"] = left_out
        chosen = [n for n in chosen if n in keep]
        if not chosen:
            why = self.left_out.get(f"composer:{strategy.name}") or {}
            raise ComposeError(
                f"{strategy.name}: none of the ready experts on base {base} fits its expert set"
                + (" (" + "; ".join(f"{n}: {w}" for n, w in why.items()) + ")" if why else "")
            )
        return chosen

    # ------------------------------------------------------------------ routers

    @staticmethod
    def _router_key(name: str, params: dict | None, experts: list[str] | None = None) -> str:
        key = name + "".join(f":{k}={v}" for k, v in sorted((params or {}).items()))
        return key + ("|" + ",".join(experts) if experts is not None else "")

    def _supply(self, need: str, params: dict, experts: list[str]) -> None:
        """What a router declares it needs (``needs``), from this runtime; a parameter given
        explicitly wins."""
        if need == "embedder":
            params.setdefault("embedder", get_embedder())
        elif need == "validation":
            params.setdefault("evaluate_fn", self.validation_correctness)
            params.setdefault("validation_examples", self.validation_pool(experts))
        elif need == "validation_loss":
            params.setdefault("loss_fn", self.validation_loss)
        elif need == "task_skills":
            params.setdefault("task_skills", declared_task_skills(self.pool.experts[n] for n in experts))
        elif need == "seed":
            params.setdefault("seed", self.seed)
        elif need == "placement":  # fitting runs where the pool's engines run
            params.setdefault("device", self.pool.device)
            params.setdefault("dtype", self.pool.dtype)
        elif need == "local":  # GLIDER's local part is PHATGOOSE's gates: reused, not trained again
            params.setdefault("local", self.router("phatgoose", None, experts))

    def _resolve(
        self, name: str, params: dict | None, experts: list[str] | None
    ) -> tuple[type[BaseRouter], list[str], str]:
        """(class, experts, key) of router ``name`` with ``params`` over ``experts`` (default:
        every pool expert of the kinds it takes); the key names the experts only when they are
        not that default."""
        cls = router_class(name)
        if cls is None:
            raise NotFoundError(f"unknown router {name!r}")
        default = [n for n, e in self.pool.experts.items() if e.kind in cls.kinds]
        experts = default if experts is None else list(experts)
        return cls, experts, self._router_key(name, params, None if experts == default else experts)

    def router(self, name: str, params: dict | None = None, experts: list[str] | None = None):
        """The router ``name`` with ``params`` over ``experts`` (default: every pool expert of the
        kinds it takes), built once: stored artifacts loaded, missing ones fitted and stored."""
        given = dict(params or {})
        cls, experts, key = self._resolve(name, given, experts)
        if key in self._routers:
            return self._routers[key]
        params = dict(given)
        for need in sorted(cls.needs):
            self._supply(need, params, experts)
        router = cls(**params)
        # artifacts a fitting parameter changed are kept apart from the defaults' (routers/params.py)
        stored_as = artifact_key(name, cls.PARAMS, given)
        left_out: dict[str, str] = {}
        self.fit_seconds[key] = self.pool.fitted(router, stored_as, experts, left_out=left_out)
        if experts and len(left_out) == len(experts):
            raise ComposeError(
                f"router {name!r} can use none of the experts: "
                + "; ".join(f"{n}: {why}" for n, why in left_out.items())
            )
        self.left_out[key] = left_out
        if "head" in cls.needs:  # the classifier's head over every expert: stored, or trained here
            t0 = time.perf_counter()
            if not self.pool.restore_head(router, stored_as):
                self.fit_seconds[key]["(retrain)"] = time.perf_counter() - t0
        self._routers[key] = router
        return router

    def router_for(self, strategy: Strategy):
        """The router of ``strategy``, over its expert set (looked up once per definition: this
        runs for every query)."""
        key = repr(strategy)
        if key not in self._strategy_routers:
            self._strategy_routers[key] = self.router(
                strategy.router, strategy.router_params, self.experts_of(strategy)
            )
        return self._strategy_routers[key]

    def route(self, strategy: Strategy | str, prompt: str, task: str | None = None) -> Routed:
        strategy = self.strategy(strategy)
        router = self.router_for(strategy)
        t0 = time.perf_counter()
        decision = router.route(RouteRequest(prompt, task))
        return Routed(decision, (time.perf_counter() - t0) * 1000)

    # ------------------------------------------------------------------ composers

    @staticmethod
    def _composer_class(strategy: Strategy) -> type[BaseComposer]:
        cls = composer_class(strategy.composer)
        if cls is None:
            raise ComposeError(f"strategy {strategy.name}: unknown composer {strategy.composer!r}")
        return cls

    def composer(self, strategy: Strategy) -> BaseComposer:
        """The strategy's composer, built once per definition by its own ``from_strategy`` from
        what this runtime offers (``composer.base.StrategyRuntime``)."""
        key = repr(strategy)
        if key not in self._composers:
            self._composers[key] = self._composer_class(strategy).from_strategy(self, strategy)
        return self._composers[key]

    # what composers may ask of the runtime (composer.base.StrategyRuntime)

    @property
    def base_path(self) -> Path:
        return self.pool.base_path

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.pool.base.trust_remote_code)

    @property
    def device(self) -> torch.device:
        return self.pool.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pool.dtype

    @property
    def merge_cache(self) -> Path:
        return moerge_home() / "cache" / "merged"

    @property
    def max_batch_size(self) -> int:
        return self.pool.max_batch_size

    def adapter_paths(self, names: Iterable[str]) -> dict[str, Path]:
        paths = self.pool.adapters()
        return {n: paths[n] for n in names}

    def mixture(self) -> tuple[Engine, Any]:
        """The mixture's engine and MoLoRA layer (numba is imported on first use)."""
        return self.pool.mixture_engine()

    def engine_for(self, composer: BaseComposer) -> Engine:
        """The engine a composer runs on: the one it declares (``runs_on``)."""
        if composer.runs_on == "pool":
            return self.pool.engine
        if composer.runs_on == "local":
            return self.pool.local_engine
        if composer.runs_on == "mixture":
            return self.pool.mixture_engine()[0]
        raise ComposeError(f"composer {composer.name!r} runs on {composer.runs_on!r}; expected pool, local or mixture")

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
        strategy = self.strategy(strategy)
        routed = self.route_many(strategy, prompts, tasks)
        return self.answer(strategy, prompts, routed, conversations, **sampling)

    def route_many(
        self, strategy: Strategy, prompts: Sequence[str], tasks: Sequence[str | None] | None = None
    ) -> list[Routed]:
        """``run``'s first half: the router and the composer built (a bad composer fails before
        any routing), then one decision per prompt."""
        tasks = list(tasks) if tasks is not None else [None] * len(prompts)
        self.router_for(strategy)
        self.composer(strategy)
        return [self.route(strategy, p, t) for p, t in zip(prompts, tasks)]

    def scores_text(self, strategy: Strategy) -> bool:
        """Whether the strategy's composer scores a given text (``BaseComposer.scores_text``)."""
        return self._composer_class(strategy).scores_text

    def score(
        self,
        strategy: Strategy | str,
        requests: Sequence[ScoreRequest],
        route_texts: Sequence[str],
        tasks: Sequence[str | None] | None = None,
    ) -> list[tuple[Scored, Routed]]:
        """Each request's continuation scored by what the strategy composes for it, routed on its
        ``route_texts`` entry (what a router reads of a document: its opening, say) and its gold
        task (the oracle's)."""
        strategy = self.strategy(strategy)
        if not self.scores_text(strategy):
            raise ComposeError(
                f"{strategy.name}: its composer ({strategy.composer}) composes generated answers and cannot score a text"
            )
        routed = self.route_many(strategy, route_texts, tasks)
        composer = self.composer(strategy)
        scored = composer.score_batch([r.decision for r in routed], list(requests), self.engine_for(composer))
        return list(zip(scored, routed))

    def answers_without_routers(self, strategy: Strategy) -> bool:
        """Whether ``answer`` for this strategy only calls the engine (``pool.engine``), never a
        router or an in-process model: what its composer declares (``engine_only``)."""
        return self.composer(strategy).engine_only

    def answer(
        self,
        strategy: Strategy,
        prompts: Sequence[str],
        routed: Sequence[Routed],
        conversations: Sequence[tuple[tuple[str, str], ...]] | None = None,
        **sampling,
    ) -> list[tuple[Completion, Routed]]:
        """``run``'s second half: the composer executes the decisions ``route`` made. ``sampling``:
        ``run``'s keywords (``GenerateRequest``'s fields)."""
        composer = self.composer(strategy)
        sampling["stop"] = tuple(sampling.get("stop", ()))
        if conversations is None:
            requests = [GenerateRequest(p, None, **sampling) for p in prompts]
        else:
            requests = [GenerateRequest(p, None, **{**sampling, "messages": c}) for p, c in zip(prompts, conversations)]
        completions = composer.execute_batch([r.decision for r in routed], requests, self.engine_for(composer))
        experts = self.experts_of(strategy)
        cls, _, key = self._resolve(strategy.router, strategy.router_params, experts)
        left_out = {**self.left_out.get(key, {}), **self.left_out.get(f"composer:{strategy.name}", {})}
        if "local" in cls.needs:  # GLIDER: its local part is PHATGOOSE's, over the same experts
            left_out = {**self.left_out.get(self._resolve("phatgoose", {}, experts)[2], {}), **left_out}
        if left_out:
            for completion in completions:
                completion.provenance.info.setdefault("left_out", left_out)
        return list(zip(completions, routed))

    # ------------------------------------------------------------------ validation results

    def validation_pool(self, experts: Sequence[str] | None = None) -> list[ExpertExample]:
        """The validation examples of ``experts`` (default: every pool expert): the shared pool each
        expert is profiled on."""
        seen, pool = set(), []
        for name, info in self.pool.experts.items():
            if experts is not None and name not in experts:
                continue
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
        # exact match, as the zoo and user suites score it by default
        return [r.text.strip() == e.reference.strip() for r, e in zip(results, examples)]

    def validation_loss(self, expert: ExpertInfo, examples: Sequence[ExpertExample]) -> tuple[float, int, int]:
        """Held-out loss of ``expert`` on the texts of ``examples`` (their prompts; best-single
        on a pool of documents): (nats in all, tokens scored, UTF-8 bytes scored), each text cut
        to the base's context and scored in one pass, as a text suite's documents are."""
        fit = self.pool.text_tokens
        texts = [t for e in examples if (t := fitting_prefix(self.pool.tokenizer, e.prompt, fit))]
        results = self.pool.engine.score([ScoreRequest("", t, expert.name) for t in texts])
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        return -sum(r.logprob for r in results), sum(r.num_tokens for r in results), n_bytes
