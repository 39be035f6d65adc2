"""Symbolic-MoE recruiting (dinobby/Symbolic-MoE: agent.py ``create_profile``, recruit_agents.py).

Profile (``fit_expert``): the expert answers a validation set — the shared pool passed as
``validation_examples`` (every expert answers the same questions, as in the paper), else its own
validation examples — through the injected ``evaluate_fn(expert, examples) -> [bool]``. For every
keyword of every question: profile[kw] += 1 if correct, −1 if wrong. Stored as artifact metadata
(JSON), with the MiniLM embeddings of the profile's keywords as tensors.

Route (recruit_agents.py):
- query skills: the ``query_skills`` known keywords (union of loaded profiles) nearest to the
  query by MiniLM cosine (see ``skill_match`` below);
- local_m = Σ profile_m[kw] over them (experts whose profile has none of them are not candidates);
- global strength G_m = Σ_kw profile_m[kw], turned into a distribution as ``normalize_to_probability``
  does with temperature 0.5: shift by (1 − min) if any is negative, raise to 1/T, normalise;
- candidates with local > 0 (if none: all candidates, local shifted by (1 − min)); weight
  local_m · G_m; the top ``k`` (3) are recruited, weights normalised.

Deviations, on purpose:
- Keywords. The paper has an LLM sample 2–5 keywords per question five times and keeps those seen
  more than once, for validation questions and queries alike. moerge has no annotator LLM: a
  question's keywords are the skills its task's experts declare (``task_skills``, built by
  ``declared_task_skills``; else the expert's ``skills`` for its own tasks; else the task name),
  and a query's keywords are the known keywords nearest to the query text itself (the paper maps
  each sampled query keyword to its single nearest known keyword with the same MiniLM).
- Keyword vectors (``skill_match``). A bare keyword ("capital letters") is a poor match for a
  whole question ("Name the capital city of Kenya"), so by default ("both") a keyword is
  represented by its own embedding plus the mean embedding of the validation questions that carry
  it (normalised sum): the query then takes the keywords of the questions it resembles, which is
  what the paper's annotator would write. "keywords" uses the bare keyword embeddings;
  "questions" the question centroids alone.
- Recruiting. The official code samples k recruits with replacement from the weights; by default
  we take the top k distinct ones (deterministic, cacheable). ``sample=True`` restores the
  official draw (seeded), and duplicate draws add up into the recruit's weight.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence

import torch

from registry.errors import DefinitionError
from routers.base import Artifact, Decision, ExpertExample, ExpertInfo, ExpertUnusable, RouteRequest, RouterError
from routers.common import EmbeddingRouter, EvaluateFn, dumps, expert_tasks, validation_set
from routers.embedder import Embedder
from routers.params import Param


def normalize_to_probability(values: Sequence[float], temperature: float = 0.5) -> list[float]:
    """Symbolic-MoE's global-strength normalisation (recruit_agents.py)."""
    if not values:
        return []
    lo = min(values)
    shifted = [v - lo + 1 for v in values] if lo < 0 else list(values)
    scaled = [v ** (1.0 / temperature) for v in shifted]
    total = sum(scaled)
    return [s / total for s in scaled] if total > 0 else [1.0 / len(values)] * len(values)


def declared_task_skills(experts: Iterable[ExpertInfo]) -> dict[str, list[str]]:
    """Keywords per task, from what the experts declare: a task's keywords are the registered
    ``skills`` of an expert trained on that task alone, else of the first expert (by name) whose
    tasks include it. One map for every profile, so a question carries the same keywords whichever
    expert answers it."""
    alone: dict[str, list[str]] = {}
    shared: dict[str, list[str]] = {}
    for expert in sorted(experts, key=lambda e: e.name):
        if not expert.skills:
            continue
        tasks = expert_tasks(expert)
        for task in tasks:
            (alone if len(tasks) == 1 else shared).setdefault(task, list(expert.skills))
    return {**shared, **alone}


class SkillRouter(EmbeddingRouter):
    name = "skill"
    needs = frozenset({"embedder", "validation", "task_skills"})
    PARAMS = (
        Param("k", "int", 3, "experts recruited per query", minimum=1),
        Param("query_skills", "int", 3, "skills inferred per query", minimum=1),
        Param("temperature", "float", 0.5, "softmax temperature of the recruiting weights", minimum=1e-6),
        Param("sample", "bool", False, "sample recruits by weight instead of taking the top k"),
        Param("seed", "int", 0, "seed of the sampling"),
        Param(
            "skill_match",
            "str",
            "both",
            "what a query's skills are matched on",
            choices=("both", "keywords", "questions"),
        ),
    )

    def __init__(
        self,
        evaluate_fn: EvaluateFn | None = None,
        task_skills: Mapping[str, Sequence[str]] | None = None,
        validation_examples: Sequence[ExpertExample] | None = None,
        embedder: Embedder | None = None,
        k: int = 3,
        query_skills: int = 3,
        temperature: float = 0.5,
        sample: bool = False,
        seed: int = 0,
        skill_match: str = "both",
    ) -> None:
        if skill_match not in ("both", "keywords", "questions"):
            raise DefinitionError(f"skill_match must be both | keywords | questions, not {skill_match!r}")
        super().__init__()
        self.evaluate_fn = evaluate_fn
        self.task_skills = {t: list(s) for t, s in (task_skills or {}).items()}
        self.validation_examples = list(validation_examples) if validation_examples is not None else None
        self.embedder = embedder
        self.k = k
        self.query_skills = query_skills
        self.temperature = temperature
        self.sample = sample
        self.rng = random.Random(seed)
        self.skill_match = skill_match
        self._index_cache = None

    # -- profile -------------------------------------------------------------------------------

    def keywords(self, example: ExpertExample, expert: ExpertInfo) -> list[str]:
        if example.task in self.task_skills:
            return self.task_skills[example.task]
        if expert.skills and example.task in expert_tasks(expert):
            return list(expert.skills)
        return [example.task] if example.task else []

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        if self.evaluate_fn is None:
            raise RouterError("skill router: fit_expert needs an evaluate_fn(expert, examples) -> [bool]")
        examples = validation_set(expert, self.validation_examples)
        if not examples:
            raise ExpertUnusable(f"skill router: no validation examples to profile {expert.name!r}")
        correct = [bool(c) for c in self.evaluate_fn(expert, examples)]
        if len(correct) != len(examples):
            raise RouterError("skill router: evaluate_fn returned a different number of results")
        profile: dict[str, int] = {}
        carriers: dict[str, list[str]] = {}
        for ex, ok in zip(examples, correct):
            for kw in dict.fromkeys(self.keywords(ex, expert)):
                profile[kw] = profile.get(kw, 0) + (1 if ok else -1)
                carriers.setdefault(kw, []).append(ex.prompt)
        skills = sorted(profile)
        dim = self.emb.dim
        return Artifact(
            tensors={
                "skill_embeddings": self.emb.encode(skills).contiguous() if skills else torch.empty(0, dim),
                # mean embedding of the validation questions carrying each keyword
                "skill_question_centroids": torch.stack(
                    [self.emb.encode(carriers[kw]).mean(0) for kw in skills]
                ).contiguous()
                if skills
                else torch.empty(0, dim),
            },
            metadata={
                "profile": dumps(profile),
                "skills": json.dumps(skills),
                "accuracy": repr(sum(correct) / len(correct)),
                "n": str(len(correct)),
            },
        )

    def profile(self, name: str) -> dict[str, int]:
        return json.loads(self.artifacts[name].metadata["profile"])

    # -- routing -------------------------------------------------------------------------------

    def _changed(self) -> None:
        self._index_cache = None

    def _index(self):
        if self._index_cache is None:
            F = torch.nn.functional
            keyword_vec: dict[str, torch.Tensor] = {}
            question_sum: dict[str, torch.Tensor] = {}
            for n in self.names:
                art = self.artifacts[n]
                skills = json.loads(art.metadata["skills"])
                for kw, vec, cen in zip(
                    skills, art.tensors["skill_embeddings"], art.tensors["skill_question_centroids"]
                ):
                    keyword_vec.setdefault(kw, F.normalize(vec.float(), dim=0))
                    question_sum[kw] = question_sum.get(kw, 0) + cen.float()  # experts' own sets may differ
            known = {}
            for kw, vec in keyword_vec.items():
                cen = F.normalize(question_sum[kw], dim=0)
                known[kw] = {"keywords": vec, "questions": cen, "both": F.normalize(vec + cen, dim=0)}[self.skill_match]
            profiles = {n: self.profile(n) for n in self.names}
            strength = normalize_to_probability([sum(p.values()) for p in profiles.values()], self.temperature)
            self._index_cache = (
                list(known),
                torch.stack(list(known.values())).float() if known else torch.empty(0, self.emb.dim),
                profiles,
                dict(zip(self.names, strength)),
            )
        return self._index_cache

    def route(self, request: RouteRequest) -> Decision:
        if (single := self.single_expert()) is not None:
            return single
        if not self.experts:
            return self.decision([], fallback="base", reason="no experts")
        known, matrix, profiles, strength = self._index()
        info: dict = {"global": {n: round(g, 4) for n, g in strength.items()}}
        if not known:
            best = max(self.names, key=lambda n: strength[n])
            return self.decision([(best, 1.0)], reason="no skills known; strongest expert", **info)
        sims = matrix @ self.emb.encode(request.prompt)[0]
        top = sims.topk(min(self.query_skills, len(known)))
        query_skills = [known[int(i)] for i in top.indices]
        info["query_skills"] = {kw: round(float(s), 4) for kw, s in zip(query_skills, top.values)}

        local: dict[str, float] = {}
        for n in self.names:  # registration order: ties go to the first registered
            hits = [profiles[n][kw] for kw in query_skills if kw in profiles[n]]
            if hits:
                local[n] = float(sum(hits))
        info["local"] = local
        if not local:
            best = max(self.names, key=lambda n: strength[n])
            return self.decision([(best, 1.0)], reason="no expert has these skills; strongest expert", **info)
        if any(v > 0 for v in local.values()):
            cands = {n: v for n, v in local.items() if v > 0}
        else:
            lo = min(local.values())
            cands = {n: v - lo + 1 for n, v in local.items()}
        weights = {n: v * strength[n] for n, v in cands.items()}

        if self.sample:
            names = list(weights)
            draws = self.rng.choices(names, weights=[weights[n] for n in names], k=self.k)
            picked = [(n, float(draws.count(n))) for n in dict.fromkeys(draws)]
        else:
            ranked = sorted(weights, key=lambda n: -weights[n])  # stable: ties keep registration order
            picked = [(n, weights[n]) for n in ranked[: self.k]]
        return self.decision(picked, **info)
