"""Token-level routing: the MoLoRA mixture layer and the PHATGOOSE / Average-Activation / Arrow /
GLIDER routers, on tiny real Llama + peft checkpoints."""

from __future__ import annotations

import hashlib

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM

from composer import gates
from composer.base import ComposeError
from composer.gates import GATES, UnknownGate, register_gate
from composer.molora import MoLoRA, MoLoRALinear, mixture
from routers import TOKEN_ROUTERS
from routers.arrow import ArrowRouter, top_right_singular_vector
from routers.base import Artifact, ExpertExample, ExpertInfo, MixtureSpec, RouteRequest
from routers.glider import GliderRouter
from routers.phatgoose import AverageActivationRouter, PhatgooseRouter
from routers.tokenwise import Gate, TokenwiseRouter, load_base, read_lora_factors
from tests.factories import make_tiny_base, make_tiny_lora
from tests.numerics import assert_close_float32, decoder_reductions

TASKS = {
    "upper": [("abc ->", " ABC"), ("hello ->", " HELLO"), ("moe ->", " MOE"), ("lora ->", " LORA")],
    "reverse": [("abc =>", " cba"), ("hello =>", " olleh"), ("moe =>", " eom"), ("lora =>", " arol")],
    "double": [("ab ::", " aabb"), ("xy ::", " xxyy"), ("q ::", " qq"), ("mo ::", " mmoo")],
}
PROMPTS = ["abc ->", "a longer prompt =>"]


def char_embedder(texts):
    """A deterministic stand-in for MiniLM: hashed character bigram counts, L2-normalised."""
    out = torch.zeros(len(texts), 64)
    for i, t in enumerate(texts):
        for a, b in zip(t, t[1:], strict=False):
            out[i, int(hashlib.md5((a + b).encode()).hexdigest(), 16) % 64] += 1.0
    return torch.nn.functional.normalize(out + 1e-6, dim=-1)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenwise")
    base = make_tiny_base(root / "base")
    experts = {}
    for i, (task, pairs) in enumerate(TASKS.items()):
        # different ranks on purpose: the mixture zero-pads to the largest
        adapter = make_tiny_lora(base, root / task, seed=10 + i, r=(8, 4, 8)[i], scale=0.3)
        examples = tuple(ExpertExample(p, r, task, "train") for p, r in pairs)
        experts[task] = ExpertInfo(
            name=task,
            kind="adapter",
            description=f"the {task} task",
            examples=examples,
            adapter_path=adapter,
            base_path=base,
        )
    return base, experts


@pytest.fixture()
def model(zoo):
    return LlamaForCausalLM.from_pretrained(zoo[0]).eval()


@pytest.fixture()
def batch(zoo):
    tok = AutoTokenizer.from_pretrained(zoo[0])
    assert tok.padding_side == "left"
    return tok(PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def phatgoose(zoo):
    router = PhatgooseRouter(steps=4, batch_size=4)
    for e in zoo[1].values():
        router.add_expert(e)
    return router


def install(model, zoo, router, gate=None, names=None):
    mix = MoLoRA(model)
    for name in names or list(zoo[1]):
        mix.add_expert(name, zoo[1][name].adapter_path, {gate or router.gate.name: router.gate_vectors(name)})
    return mix


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# -- the layer -------------------------------------------------------------------------------


@pytest.mark.parametrize("router_cls", [ArrowRouter, PhatgooseRouter])
def test_single_expert_equals_peft_merged(zoo, model, batch, router_cls):
    base_dir, experts = zoo
    router = router_cls(steps=2, batch_size=4) if router_cls is PhatgooseRouter else router_cls()
    router.add_expert(experts["upper"])
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), experts["upper"].adapter_path)
    merged = merged.merge_and_unload().eval()
    expected = logits(merged, batch)
    mix = install(model, zoo, router, names=["upper"])
    with mix.routing(router.route(RouteRequest("abc ->"))) as stats:
        got = logits(model, batch)
    assert_close_float32(got, expected, decoder_reductions(model.config))
    assert not torch.allclose(got, logits(model, batch))  # the adapter did something
    assert stats.per_expert() == {"upper": pytest.approx(1.0)}


def test_single_registered_expert_is_always_chosen(zoo, model, batch):
    experts = zoo[1]
    routers = [
        PhatgooseRouter(steps=1, batch_size=4),
        AverageActivationRouter(),
        ArrowRouter(),
        GliderRouter(alpha=10.0, embedder=char_embedder, steps=1, batch_size=4),
    ]
    for router in routers:
        router.add_expert(experts["reverse"])
        spec = router.route(RouteRequest("anything at all"))
        assert spec.experts == ["reverse"] and spec.top_k == 1
        mix = install(model, zoo, router, names=["reverse"])
        with mix.routing(spec) as stats:
            logits(model, batch)
        per_module = stats.per_module()
        assert per_module and all(v == {"reverse": pytest.approx(1.0)} for v in per_module.values())
        mix.uninstall()


@pytest.mark.parametrize("gate", ["phatgoose", "average-activation", "arrow", "glider"])
def test_top_k_keeps_exactly_k_and_renormalises(zoo, model, gate):
    mix = MoLoRA(model)
    gen = torch.Generator().manual_seed(0)
    names = ["upper", "reverse", "double"]
    for name in names:
        factors = read_lora_factors(zoo[1][name].adapter_path)
        kind = "phatgoose" if gate == "glider" else gate
        mix.add_expert(name, factors, {kind: {m: torch.randn(f.A.shape[1], generator=gen) for m, f in factors.items()}})
    spec = MixtureSpec(
        "t", names, gate, top_k=2, alpha=0.7, global_scores={"upper": 0.1, "reverse": 0.9, "double": 0.3}
    )
    mix.activate(spec)
    layer = mix.layers["model.layers.1.mlp.down_proj"]
    h = torch.randn(3, 5, layer.in_features, generator=gen)
    p = layer.gate_weights(h, layer.config, layer._build_stack(layer.config))
    assert p.dtype == torch.float32 and p.shape == (3, 5, 3)
    assert torch.equal((p > 0).sum(-1), torch.full((3, 5), 2))
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 5))


def test_glider_alpha_zero_is_phatgoose_bit_for_bit(zoo, model, batch, phatgoose):
    glider = GliderRouter(alpha=0.0, embedder=char_embedder, local=phatgoose)
    for e in zoo[1].values():
        glider.add_expert(e)
    for name in zoo[1]:  # the local part is PHATGOOSE's own vectors
        for m, v in phatgoose.gate_vectors(name).items():
            assert torch.equal(glider.gate_vectors(name)[m], v)
    mix = install(model, zoo, phatgoose)
    for name in zoo[1]:
        mix.set_gate_vectors(name, "glider", glider.gate_vectors(name))
    pg_spec, gl_spec = phatgoose.route(RouteRequest(PROMPTS[0])), glider.route(RouteRequest(PROMPTS[0]))
    assert gl_spec.gate == "glider" and gl_spec.alpha == 0.0 and gl_spec.global_scores
    assert gl_spec.info["instruction_writer"] == "none" and "note" in gl_spec.info
    outs = {}
    for key, spec in (("pg", pg_spec), ("gl", gl_spec)):
        with mix.routing(spec):
            outs[key] = (logits(model, batch), model.generate(**batch, max_new_tokens=6, do_sample=False))
    assert torch.equal(outs["pg"][0], outs["gl"][0])
    assert torch.equal(outs["pg"][1], outs["gl"][1])


def test_glider_large_alpha_follows_global_scores(zoo, model, batch, phatgoose):
    mix = install(model, zoo, phatgoose)
    names = list(zoo[1])
    per_row = [
        MixtureSpec(
            "glider", names, "glider", top_k=1, alpha=1e4, global_scores={"upper": 0.1, "reverse": 0.9, "double": 0.2}
        ),
        MixtureSpec(
            "glider", names, "glider", top_k=1, alpha=1e4, global_scores={"upper": 0.3, "reverse": 0.2, "double": 0.8}
        ),
    ]
    with mix.routing(per_row):
        got = logits(model, batch)
    mix.uninstall()
    for row, best in enumerate(["reverse", "double"]):  # each row is the best global expert's model, alone
        one = LlamaForCausalLM.from_pretrained(zoo[0]).eval()
        mix = install(one, zoo, phatgoose, names=[best])
        with mix.routing(MixtureSpec("x", [best], "phatgoose", top_k=1)):
            assert_close_float32(got[row], logits(one, batch)[row], decoder_reductions(one.config))

    mix = install(model, zoo, phatgoose)
    spec = MixtureSpec(
        "glider", names, "glider", top_k=2, alpha=1e3, global_scores={"upper": 0.1, "reverse": 0.9, "double": 0.2}
    )
    with mix.routing(spec) as stats:
        logits(model, batch)
    assert stats.per_expert()["reverse"] > 0.99


def test_glider_router_global_scores(zoo):
    glider = GliderRouter(alpha=100.0, embedder=char_embedder, steps=1, batch_size=4)
    for e in zoo[1].values():
        art = glider.add_expert(e)
        assert art.metadata["instruction_writer"] == "none"
    spec = glider.route(RouteRequest("hello =>"))
    assert spec.alpha == 100.0 and set(spec.global_scores) == set(zoo[1])
    assert max(spec.global_scores, key=spec.global_scores.get) == "reverse"
    glider.remove_expert("reverse")
    assert "reverse" not in glider.route(RouteRequest("hello =>")).global_scores


# -- fitting ---------------------------------------------------------------------------------


def test_phatgoose_trains_only_the_gates_and_lowers_the_loss(zoo):
    expert = zoo[1]["upper"]
    base_model, _ = load_base(str(expert.base_path))
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    factors_before = read_lora_factors(expert.adapter_path)
    art = PhatgooseRouter(steps=25, batch_size=4).fit_expert(expert)
    assert set(art.tensors) == set(factors_before)
    assert all(v.shape == (factors_before[m].A.shape[1],) and v.abs().sum() > 0 for m, v in art.tensors.items())
    assert all(torch.equal(before[k], v) for k, v in base_model.state_dict().items())
    assert not any(h for m in base_model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))
    for m, f in read_lora_factors(expert.adapter_path).items():
        assert torch.equal(f.A, factors_before[m].A) and torch.equal(f.B, factors_before[m].B)
    assert float(art.metadata["loss_after"]) < float(art.metadata["loss_before"])


def test_phatgoose_fits_on_a_bfloat16_base(zoo):
    # the runtime hands token routers its engines' device and dtype (the ``placement`` need):
    # the base runs in bfloat16, the gates train in float32, close to the float32 fit
    expert = zoo[1]["upper"]
    assert "placement" in PhatgooseRouter.needs
    f32 = PhatgooseRouter(steps=25, batch_size=4).fit_expert(expert)
    bf16 = PhatgooseRouter(steps=25, batch_size=4, dtype=torch.bfloat16).fit_expert(expert)
    model, _ = load_base(str(expert.base_path), False, "cpu", torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert set(bf16.tensors) == set(f32.tensors)
    assert all(v.dtype == torch.float32 and v.abs().sum() > 0 for v in bf16.tensors.values())
    assert float(bf16.metadata["loss_after"]) < float(bf16.metadata["loss_before"])
    cos = [torch.nn.functional.cosine_similarity(bf16.tensors[m], f32.tensors[m], dim=0) for m in f32.tensors]
    # bfloat16 rounding compounds over 25 AdamW steps: the least similar module measured 0.875
    # (avx2), 0.934 (avx512), 0.941 (default). 0.6 leaves room for other CPUs and stays far above
    # unrelated vectors (the largest |cos| of 1000 random 128-d vectors to a gate: 0.33)
    assert min(cos) > 0.6


@pytest.mark.parametrize("with_expert", [True, False])
def test_average_activation_is_mean_module_input(zoo, with_expert):
    """v = per-sequence mean of the module input, averaged over the sequences; read in the
    expert's own model (peft's base + LoRA) by default, in the bare base on request."""
    expert = zoo[1]["double"]
    art = AverageActivationRouter(with_expert=with_expert).fit_expert(expert)
    model = LlamaForCausalLM.from_pretrained(expert.base_path).eval()
    if with_expert:
        model = PeftModel.from_pretrained(model, expert.adapter_path).eval()
    tok = AutoTokenizer.from_pretrained(expert.base_path)
    name = "model.layers.1.self_attn.q_proj"
    seen = []
    module = next(m for n, m in model.named_modules() if n.endswith(name) and hasattr(m, "weight"))
    handle = module.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0][0].mean(0)))
    with torch.no_grad():
        for p, r in TASKS["double"]:
            model(**tok([p + r + tok.eos_token], return_tensors="pt"))
    handle.remove()
    torch.testing.assert_close(art.tensors[name], torch.stack(seen).mean(0), atol=1e-5, rtol=1e-5)


def test_phatgoose_gate_loss_is_on_the_answer_only(zoo):
    """The gates train on the expert's target tokens: prompt tokens carry no label (a plain text
    has no prompt: all of it is the target)."""
    from routers.phatgoose import encode_pairs

    _, tok = load_base(str(zoo[0]))
    pairs = [("abc ->", " ABC" + tok.eos_token), ("a longer prompt ->", " X" + tok.eos_token)]
    ids, mask, labels, answer = encode_pairs(tok, pairs, "cpu", 512, "answer")
    for i, (p, a) in enumerate(pairs):
        n_prompt, n = len(tok(p)["input_ids"]), len(tok(p + a)["input_ids"])
        assert mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)  # right padding
        assert (labels[i, :n_prompt] == -100).all() and (labels[i, n:] == -100).all()
        assert torch.equal(labels[i, n_prompt:n], ids[i, n_prompt:n])
        assert answer[i].sum() == n - n_prompt
    _, _, all_labels, _ = encode_pairs(tok, pairs, "cpu", 512, "sequence")
    assert torch.equal(all_labels[mask == 1], ids[mask == 1])
    # the router's default, auto: an answer where there is one, every token of a plain text (an
    # example with an empty reference, as a domain expert's documents are)
    text = ("def f(x):\n    return x\n", tok.eos_token)
    ids, mask, auto_labels, _ = encode_pairs(tok, [pairs[0], text], "cpu", 512, "auto")
    n_prompt, n = len(tok(pairs[0][0])["input_ids"]), len(tok(pairs[0][0] + pairs[0][1])["input_ids"])
    assert (auto_labels[0, :n_prompt] == -100).all() and torch.equal(auto_labels[0, n_prompt:n], ids[0, n_prompt:n])
    assert torch.equal(auto_labels[1][mask[1] == 1], ids[1][mask[1] == 1])


def test_arrow_prototype_is_top_right_singular_vector(zoo):
    factors = read_lora_factors(zoo[1]["reverse"].adapter_path)
    f = factors["model.layers.0.mlp.down_proj"]
    v = top_right_singular_vector(f.A, f.B)
    dense = f.B.double() @ f.A.double()
    expected = torch.linalg.svd(dense).Vh[0].float()
    assert abs(float(v @ expected)) == pytest.approx(1.0, abs=1e-5)
    art = ArrowRouter().fit_expert(zoo[1]["reverse"])
    assert torch.equal(art.tensors["model.layers.0.mlp.down_proj"], v)


# -- installing, removing, generating --------------------------------------------------------


def test_uninstall_restores_the_base_exactly(zoo, model, batch):
    base_logits = logits(model, batch)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    router = ArrowRouter()
    for e in zoo[1].values():
        router.add_expert(e)
    mix = install(model, zoo, router)
    assert sum(isinstance(m, MoLoRALinear) for m in model.modules()) == 14
    assert torch.equal(logits(model, batch), base_logits)  # installed but inactive: the base
    with mix.routing(router.route(RouteRequest("x"))):
        assert not torch.allclose(logits(model, batch), base_logits)
    mix.remove_expert("double")
    mix.uninstall()
    assert not any(isinstance(m, MoLoRALinear) for m in model.modules())
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert torch.equal(logits(model, batch), base_logits)
    with mixture(
        model,
        {"upper": zoo[1]["upper"].adapter_path},
        MixtureSpec("a", ["upper"], "arrow", top_k=1),
        gates={"upper": {"arrow": router.gate_vectors("upper")}},
    ):
        assert not torch.equal(logits(model, batch), base_logits)
    assert torch.equal(logits(model, batch), base_logits)


def test_generation_with_kv_cache_and_left_padding(zoo, model, batch, phatgoose):
    assert batch["attention_mask"][0, 0] == 0  # the shorter row is left padded
    mix = install(model, zoo, phatgoose)
    spec = phatgoose.route(RouteRequest("x"))
    assert spec.top_k == 2 and len(spec.experts) == 3
    with mix.routing(spec) as stats:
        cached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=True)
        calls = {}
        layer = mix.layers["model.layers.0.self_attn.q_proj"]
        handle = layer.register_forward_pre_hook(lambda _m, inp: calls.setdefault("seq", []).append(inp[0].shape[1]))
        uncached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
        handle.remove()
    assert cached.shape == (2, batch["input_ids"].shape[1] + 8)
    assert torch.equal(cached, uncached)
    assert len(calls["seq"]) == 8  # one routed forward per generated token
    assert sum(stats.per_expert().values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("gate", "top_k", "extra"),
    [
        ("phatgoose", 2, {}),
        ("arrow", 1, {}),
        ("phatgoose", 3, {"temperature": 0.5}),  # k = N: a plain softmax
        ("glider", 2, {"alpha": 0.7}),  # a per-row global term
    ],
)
def test_cpu_kernels_equal_the_pytorch_path(zoo, model, batch, gate, top_k, extra, monkeypatch):
    """CPU inference routes and multiplies in numba kernels, everything else (autograd, GPUs) with
    PyTorch ops: the same mixture weights and the same outputs, prefill and decode steps, here with
    an expert that adapts only the MLPs (never picked where it is absent)."""
    import composer.molora as molora
    import composer.molora_kernels as kernels

    mix = MoLoRA(model)
    gen = torch.Generator().manual_seed(0)
    for name in zoo[1]:
        factors = read_lora_factors(zoo[1][name].adapter_path)
        if name == "double":
            factors = {m: f for m, f in factors.items() if ".mlp." in m}
        kind = "phatgoose" if gate == "glider" else gate
        mix.add_expert(name, factors, {kind: {m: torch.randn(f.A.shape[1], generator=gen) for m, f in factors.items()}})
    names = list(zoo[1])
    spec = MixtureSpec("t", names, gate, top_k=top_k, **extra)
    if gate == "glider":
        spec = [
            MixtureSpec("t", names, gate, top_k=top_k, global_scores=dict(zip(names, g)), **extra)
            for g in ((0.1, 0.9, 0.3), (0.8, 0.1, 0.5))
        ]
    calls = []
    route = kernels.route
    monkeypatch.setattr(kernels, "route", lambda *a: calls.append(1) or route(*a))

    def run():
        with mix.routing(spec) as stats:
            out = logits(model, batch), model.generate(**batch, max_new_tokens=6, do_sample=False)
        return out, stats.per_module()

    (kernel_logits, kernel_tokens), kernel_stats = run()
    assert calls  # the kernels ran
    monkeypatch.setattr(molora, "_USE_KERNELS", False)
    calls.clear()
    (torch_logits, torch_tokens), torch_stats = run()
    assert not calls
    assert_close_float32(kernel_logits, torch_logits, decoder_reductions(model.config))
    assert torch.equal(kernel_tokens, torch_tokens)
    for module, per_expert in torch_stats.items():
        assert kernel_stats[module] == pytest.approx(per_expert, abs=1e-5)
        if ".mlp." not in module:
            assert per_expert["double"] == 0.0 == kernel_stats[module]["double"]
    mix.uninstall()
    assert not torch.equal(kernel_logits, logits(model, batch))  # the mixture was active: it changed the output


@pytest.mark.parametrize("rank", [1, 5, 8])
def test_add_products_kernel_is_the_sparse_lora_sum(rank):
    """The kernel adds Σ_j w_j B_e (A_e x) over each token's picked experts only, for any rank
    and any number of tokens per expert (it works two tokens and four rows per pass: odd counts
    and ranks that are no multiple of four take its tail paths)."""
    import numpy as np

    from composer.molora_kernels import add_products

    rng = np.random.default_rng(rank)
    T, G, N, k, d_in, d_out = 7, 2, 5, 2, 12, 9
    x = rng.standard_normal((T, d_in)).astype(np.float32)
    A = rng.standard_normal((N, rank, d_in)).astype(np.float32)
    B = rng.standard_normal((N, rank, d_out)).astype(np.float32)
    idx = np.stack([rng.choice(N, size=(G, k), replace=False) for _ in range(T)]).astype(np.int64)
    w = rng.random((T, G, k)).astype(np.float32)
    w[0, 1, 1] = 0.0  # a zero weight adds nothing
    y0 = rng.standard_normal((T, d_out)).astype(np.float32)
    y = y0.copy()
    add_products(y, x, A, B, idx, w, 1)
    want = y0.astype(np.float64)
    for t in range(T):
        for j in range(k):
            e = idx[t, 1, j]
            want[t] += w[t, 1, j] * (B[e].T.astype(np.float64) @ (A[e].astype(np.float64) @ x[t]))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    """A read-only install where numba can write no cache still gets the kernels (compiled in
    each process instead of loaded from the cache)."""
    import importlib

    import numba
    import numpy as np

    import composer.molora_kernels as kernels

    njit = numba.njit

    def no_cache_location(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")  # what numba raises
        return njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_cache_location)
    try:
        fresh = importlib.reload(kernels)
        y = np.zeros((1, 2), np.float32)
        fresh.add_products(
            y,
            np.ones((1, 2), np.float32),
            np.ones((1, 1, 2), np.float32),
            np.ones((1, 1, 2), np.float32),
            np.zeros((1, 1, 1), np.int64),
            np.ones((1, 1, 1), np.float32),
            0,
        )
        assert y.tolist() == [[2.0, 2.0]]
    finally:
        monkeypatch.undo()
        importlib.reload(kernels)


def test_cpu_kernels_serve_a_bfloat16_model(zoo, batch, phatgoose, monkeypatch):
    """A base loaded in bfloat16: the kernels route and multiply in float32 and add into the
    bfloat16 outputs, as the PyTorch path does."""
    import composer.molora as molora

    model = LlamaForCausalLM.from_pretrained(zoo[0], dtype=torch.bfloat16).eval()
    mix = install(model, zoo, phatgoose)
    spec = MixtureSpec("phatgoose", list(zoo[1]), "phatgoose", top_k=2)
    with mix.routing(spec):
        kernel = logits(model, batch)
        monkeypatch.setattr(molora, "_USE_KERNELS", False)
        reference = logits(model, batch)
    assert kernel.dtype == torch.bfloat16
    torch.testing.assert_close(kernel.float(), reference.float(), rtol=2e-2, atol=2e-2)


# -- gates -----------------------------------------------------------------------------------


def test_every_token_level_router_declares_a_registered_gate():
    for router_cls in TOKEN_ROUTERS.values():
        assert GATES[router_cls.gate.name] is router_cls.gate
    routers = (PhatgooseRouter, AverageActivationRouter, ArrowRouter, GliderRouter)
    assert [r.gate.name for r in routers] == [r.name for r in routers]
    assert [r.gate.standardise for r in routers] == [True, True, False, True]
    assert [r.gate.absolute for r in routers] == [False, False, True, False]
    assert [r.gate.global_term for r in routers] == [False, False, False, True]
    assert GliderRouter.gate.vectors == ("glider", "phatgoose")  # its own, else PHATGOOSE's
    assert ArrowRouter.gate.vectors == ("arrow",)


def test_an_unknown_gate_is_refused_with_the_registered_names(zoo, model):
    mix = MoLoRA(model)
    factors = read_lora_factors(zoo[1]["upper"].adapter_path)
    mix.add_expert("upper", factors)
    with pytest.raises(UnknownGate) as err:
        mix.activate(MixtureSpec("t", ["upper"], "no-such-gate", top_k=1))
    assert isinstance(err.value, ComposeError)
    assert "'no-such-gate'" in str(err.value)
    assert all(name in str(err.value) for name in ("phatgoose", "average-activation", "arrow", "glider"))
    with pytest.raises(UnknownGate, match="no-such-kind.*arrow.*glider.*phatgoose"):
        mix.set_gate_vectors("upper", "no-such-kind", {m: torch.zeros(f.A.shape[1]) for m, f in factors.items()})
    with pytest.raises(ComposeError, match="registered already"):  # a name cannot change its formula
        register_gate(Gate("arrow"))
    assert register_gate(ArrowRouter.gate) is GATES["arrow"]  # the same gate again: a no-op
    mix.uninstall()


class SignedDotRouter(TokenwiseRouter):
    """A token-level router of a formula no built-in has: s_e = h · v_e / T (neither standardised
    nor absolute), declared in its gate alone."""

    name = "signed-dot"
    gate = Gate("signed-dot")

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        gen = torch.Generator().manual_seed(len(expert.name))
        factors = read_lora_factors(expert.adapter_path)
        return Artifact(tensors={m: torch.randn(f.A.shape[1], generator=gen) for m, f in factors.items()})


def test_a_new_gate_runs_in_the_mixture_and_the_kernel(zoo, model, batch, monkeypatch):
    """A router of a new gate, found as a plugin is (``composer.gates`` reads the gate its class
    declares), is routed by the MoLoRA layer as its gate declares, in the PyTorch path and the
    CPU kernel alike; composer/molora.py knows nothing of it."""
    import composer.molora as molora
    import composer.molora_kernels as kernels

    monkeypatch.setattr(gates, "GATES", dict(gates.GATES))  # undone after the test
    monkeypatch.setattr(gates, "_plugins_read", False)
    monkeypatch.setattr(gates, "plugin_routers", lambda: {"signed-dot": SignedDotRouter})
    router = SignedDotRouter(temperature=0.5)
    mix = MoLoRA(model)
    for name, expert in zoo[1].items():
        router.add_expert(expert)
        factors = read_lora_factors(expert.adapter_path)
        if name == "double":
            factors = {m: f for m, f in factors.items() if ".mlp." in m}
        mix.add_expert(name, factors, {router.gate.name: router.gate_vectors(name)})
    assert gates.GATES["signed-dot"] is router.gate and router.gate.vectors == ("signed-dot",)
    names = list(zoo[1])
    spec = router.route(RouteRequest("abc ->"))
    assert spec.gate == "signed-dot" and spec.top_k == 2 == router.gate.top_k and spec.temperature == 0.5

    module = "model.layers.1.mlp.down_proj"
    mix.activate(spec)
    layer = mix.layers[module]
    h = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    p = layer.gate_weights(h, layer.config, layer._build_stack(layer.config))
    z = h.reshape(-1, h.shape[-1]) @ torch.stack([router.gate_vectors(n)[module] for n in names]).T / 0.5
    top, idx = z.topk(2, dim=-1)
    expected = torch.zeros_like(z).scatter_(-1, idx, torch.softmax(top, dim=-1))
    torch.testing.assert_close(p.reshape(-1, len(names)), expected)
    mix.deactivate()

    calls = []
    route = kernels.route
    monkeypatch.setattr(kernels, "route", lambda *a: calls.append(a[2:5]) or route(*a))

    def run():
        with mix.routing(spec) as stats:
            out = logits(model, batch), model.generate(**batch, max_new_tokens=6, do_sample=False)
        return out, stats.per_module()

    (kernel_logits, kernel_tokens), kernel_stats = run()
    assert calls and set(calls) == {(False, False, router.gate.eps)}  # the kernel got the gate's fields
    monkeypatch.setattr(molora, "_USE_KERNELS", False)
    calls.clear()
    (torch_logits, torch_tokens), torch_stats = run()
    assert not calls
    assert_close_float32(kernel_logits, torch_logits, decoder_reductions(model.config))
    assert torch.equal(kernel_tokens, torch_tokens)
    for name, per_expert in torch_stats.items():
        assert kernel_stats[name] == pytest.approx(per_expert, abs=1e-5)
        if ".mlp." not in name:
            assert per_expert["double"] == 0.0 == kernel_stats[name]["double"]
    mix.uninstall()
    assert not torch.equal(kernel_logits, logits(model, batch))  # the mixture was active: it changed the output
