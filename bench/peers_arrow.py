"""moerge's ``moe/arrow`` and ``moe/phatgoose`` against peft's Arrow (``create_arrow_model``).

The same random Llama base and the same 8 LoRA adapters (rank 8 on all seven linear projections,
``tests/factories.py``), built here in seconds, so that a fresh clone runs it:

- **tokens/s at batch 16**: greedy, a fixed 16 new tokens per row (``min_new_tokens``), the three
  mixtures in turns over ``--arrow-repeats`` rounds, median. moerge's side is the MoLoRA layer its
  tokenwise strategies install (``composer.molora``), peft's is ``create_arrow_model`` with
  ``ArrowConfig(top_k=2, router_temperature=1.0)``, the settings moe/arrow has by default.
- **agreement of the top-k choices**: one teacher-forced pass over the same batch through each
  Arrow; at every routed module and token, the set of top-k experts each side's own gate takes
  from its own module input and prototypes. With peft's default prototypes (15 power iterations
  from a random start) and with peft's iteration run to convergence ("exact"), where moerge's
  prototypes (a QR + r×r SVD) must give the same choices and the same logits.
- PHATGOOSE (gates trained briefly on random prompts) is timed beside them, and its overlap with
  Arrow's choices is shown for what it is: another router, not a check.
"""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
N_ADAPTERS, RANK, TOP_K, BATCH, NEW_TOKENS = 8, 8, 2, 16, 16


def build(work: Path) -> tuple[Path, list[Path]]:
    sys.path.insert(0, str(ROOT))
    from tests.factories import make_tiny_base, make_tiny_lora

    base = make_tiny_base(work / "base", hidden_size=256, layers=4)
    # scale 0.05: adapters that change the answer but leave a model that still ranks tokens sanely
    adapters = [make_tiny_lora(base, work / f"a{i}", seed=100 + i, r=RANK, scale=0.05) for i in range(N_ADAPTERS)]
    return base, adapters


def prompts() -> list[str]:
    words = ["reverse", "hello", "count the letters", "moe", "lora", "42 + 17", "{'a': 1}", "def f(x):"]
    return [f"{words[i % 8]} {words[(3 * i + 1) % 8]} ->" for i in range(BATCH)]


def expert_infos(base: Path, adapters: list[Path]):
    from routers.base import ExpertExample, ExpertInfo

    return [
        ExpertInfo(
            name=f"a{i}",
            kind="adapter",
            description=f"adapter {i}",
            examples=tuple(ExpertExample(p, " x", f"t{i}", "train") for p in prompts()[i::N_ADAPTERS] or prompts()[:2]),
            adapter_path=path,
            base_path=base,
        )
        for i, path in enumerate(adapters)
    ]


class MoergeMixture:
    """The MoLoRA layer with one router's gates, as ``moe/arrow`` / ``moe/phatgoose`` install it."""

    def __init__(self, base: Path, adapters: list[Path], router) -> None:
        from transformers import LlamaForCausalLM

        from composer.molora import MoLoRA
        from routers.base import RouteRequest

        self.model = LlamaForCausalLM.from_pretrained(str(base)).eval()
        self.mix = MoLoRA(self.model)
        for info in expert_infos(base, adapters):
            self.mix.add_expert(info.name, info.adapter_path, {router.gate.name: router.gate_vectors(info.name)})
        self.spec = router.route(RouteRequest("any"))
        self.gate = router.gate.name

    def __call__(self, fn):
        with torch.no_grad(), self.mix.routing(self.spec):
            return fn(self.model)

    def choices(self, batch) -> dict[str, torch.Tensor]:
        from composer.molora import MoLoRALinear

        routed = [
            (m.name, m, torch.stack([m.vectors[self.gate][f"a{i}"] for i in range(N_ADAPTERS)]))
            for m in self.model.modules()
            if isinstance(m, MoLoRALinear)
        ]
        return choices_through(self, routed, batch)


class PeftArrow:
    def __init__(self, base: Path, adapters: list[Path], power_iterations: int | None = None) -> None:
        from peft import ArrowConfig, create_arrow_model
        from peft.tuners.lora import arrow as peft_arrow
        from transformers import LlamaForCausalLM

        original = peft_arrow.ArrowLoraLinearLayer.top_right_singular_vec_from_BA
        if power_iterations:  # run peft's own power iteration to convergence: its prototypes made exact
            peft_arrow.ArrowLoraLinearLayer.top_right_singular_vec_from_BA = functools.partialmethod(
                original, iters=power_iterations
            )
        try:
            model = LlamaForCausalLM.from_pretrained(str(base)).eval()
            config = ArrowConfig(top_k=TOP_K, router_temperature=1.0, rng_seed=0)
            self.model = create_arrow_model(model, [str(p) for p in adapters], config).eval()
            with torch.no_grad():  # prototypes are built on the first forward pass
                self.model(input_ids=torch.tensor([[1, 2, 3]]))
        finally:
            peft_arrow.ArrowLoraLinearLayer.top_right_singular_vec_from_BA = original

    def __call__(self, fn):
        with torch.no_grad():
            return fn(self.model)

    def choices(self, batch) -> dict[str, torch.Tensor]:
        from peft.tuners.lora import arrow as peft_arrow
        from peft.tuners.lora.layer import LoraLayer

        routed = []
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and "arrow_router" in getattr(module, "lora_arrow", {}):
                router = module.lora_arrow["arrow_router"]
                assert isinstance(router, peft_arrow.ArrowLoraLinearLayer)
                order = [router.task_adapter_names.index(f"task_{i}") for i in range(N_ADAPTERS)]
                routed.append((name.removeprefix("base_model.model."), module, router.prototypes[order]))
        return choices_through(self, routed, batch)


def choices_through(run, routed: list[tuple[str, torch.nn.Module, torch.Tensor]], batch) -> dict[str, torch.Tensor]:
    """One teacher-forced pass (``run(fn)`` calls fn on the model, in its routing context): per
    routed module, the top-k sets its input takes under the given prototypes [E, d_in]; and the
    logits under ``"logits"``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for key, module, protos in routed:

        def grab(mod, inputs, key=key, protos=protos):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            seen[key] = top_k_sets(x @ protos.T.to(x.dtype))

        hooks.append(module.register_forward_pre_hook(grab))
    try:
        seen["logits"] = run(lambda m: m(**batch).logits)
    finally:
        for h in hooks:
            h.remove()
    return seen


def top_k_sets(scores: torch.Tensor) -> torch.Tensor:
    """[tokens, E] scores -> [tokens, E] 0/1 of the top-k by |score| (a set: order does not matter)."""
    idx = scores.abs().topk(TOP_K, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def agreement(a: dict, b: dict, mask: torch.Tensor) -> tuple[float, int]:
    """Fraction of (module, real token) positions whose top-k sets are the same; modules compared."""
    modules = sorted(set(a) & set(b) - {"logits"})
    same = [(a[m] == b[m]).all(-1)[mask].float().mean().item() for m in modules]
    return statistics.fmean(same), len(modules)


def arrow(args, peers_python: Path) -> None:  # noqa: ARG001 - peft is in moerge's own venv
    import peft
    from transformers import AutoTokenizer

    from routers.arrow import ArrowRouter
    from routers.phatgoose import PhatgooseRouter

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="moerge-peers-arrow-") as tmp:
        base, adapters = build(Path(tmp))
        infos = expert_infos(base, adapters)
        arrow_router = ArrowRouter(top_k=TOP_K, temperature=1.0)
        phatgoose_router = PhatgooseRouter(steps=4, batch_size=4, top_k=TOP_K)
        for info in infos:
            arrow_router.add_expert(info)
            phatgoose_router.add_expert(info)
        ours = MoergeMixture(base, adapters, arrow_router)
        phatgoose = MoergeMixture(base, adapters, phatgoose_router)
        peft_default = PeftArrow(base, adapters)
        peft_exact = PeftArrow(base, adapters, power_iterations=2000)

        tok = AutoTokenizer.from_pretrained(str(base))
        batch = tok(prompts(), return_tensors="pt", padding=True)
        mask = batch["attention_mask"].reshape(-1).bool()
        seen = {
            "moe/arrow": ours.choices(batch),
            "peft Arrow (default prototypes)": peft_default.choices(batch),
            "peft Arrow (exact prototypes)": peft_exact.choices(batch),
            "moe/phatgoose": phatgoose.choices(batch),
        }

        def generate(model):
            return model.generate(
                **batch,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

        timed = {"moe/arrow": ours, "moe/phatgoose": phatgoose, "peft Arrow": peft_default}
        repeats = 1 if args.short else args.arrow_repeats
        tps: dict[str, list[float]] = {name: [] for name in timed}
        outputs = {}
        for name, runner in timed.items():
            outputs[name] = runner(generate)  # warm-up, and the answers compared below
        outputs["peft Arrow (exact prototypes)"] = peft_exact(generate)
        for _ in range(repeats):
            for name, runner in timed.items():
                t0 = time.perf_counter()
                runner(generate)
                tps[name].append(BATCH * NEW_TOKENS / (time.perf_counter() - t0))

    print(
        f"\n## Arrow: {N_ADAPTERS} rank-{RANK} LoRA adapters on a random Llama (hidden 256, 4 layers), peft {peft.__version__}\n"
    )
    print(
        f"Generation: batch {BATCH}, {NEW_TOKENS} new tokens forced, greedy; median of {repeats} round(s), in turns.\n"
    )
    print("| mixture | tokens/s | ÷ peft Arrow |")
    print("|---|---:|---:|")
    peft_tps = statistics.median(tps["peft Arrow"])
    for name, values in tps.items():
        print(f"| {name} | {statistics.median(values):.0f} | {statistics.median(values) / peft_tps:.2f} |")
    ref = seen["moe/arrow"]
    print(f"\nTop-{TOP_K} choices against moe/arrow's, one teacher-forced pass, every routed module and real token:\n")
    print("| | same top-k set | modules | max abs logit difference |")
    print("|---|---:|---:|---:|")
    for name in list(seen)[1:]:
        frac, n = agreement(ref, seen[name], mask)
        diff = (seen[name]["logits"] - ref["logits"]).abs().max().item()
        print(f"| {name} | {frac:.4f} | {n} | {diff:.2e} |")
    print()
    for name in ("peft Arrow", "peft Arrow (exact prototypes)"):
        same = (outputs[name] == outputs["moe/arrow"]).all(-1).float().mean().item()
        print(f"- rows whose {NEW_TOKENS} generated tokens equal moe/arrow's, {name}: {same:.3f}")
