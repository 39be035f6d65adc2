"""The routing query path through ONNX Runtime: same numbers as PyTorch, same decisions, cached export."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

from routers import onnx_bert
from routers.base import ExpertExample, ExpertInfo, RouteRequest, RouterError
from routers.classifier import ClassifierRouter
from routers.embedder import Embedder
from routers.semantic import SemanticRouter

PROMPTS = [
    "What is 3 plus 4?",
    "Reverse the string 'hello world'.",
    "Shift every letter of 'abc' by three places",
    "Tell me about the history of jazz music in New Orleans and Chicago.",
    "hi",
]

TASKS = {
    "math": ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}."],
    "reverse": ["Reverse the string '{w}'.", "Write '{w}' backwards.", "Spell '{w}' in reverse order."],
    "upper": ["Uppercase '{w}'.", "Write '{w}' in capital letters.", "Make '{w}' all caps."],
}
WORDS = ["apple", "river", "stone", "cloud", "piano", "tiger", "lemon", "chair"]


def expert(task: str) -> ExpertInfo:
    prompts = [t.format(a=i, b=i + 3, w=w) for i, w in enumerate(WORDS) for t in TASKS[task]]
    examples = tuple(ExpertExample(prompt=p, reference="", task=task, split="train") for p in prompts)
    return ExpertInfo(name=f"expert-{task}", kind="adapter", domains=(task,), skills=(task,), examples=examples)


@pytest.fixture(scope="module")
def pair() -> tuple[Embedder, Embedder]:
    onnx, torch_path = Embedder(query_backend="onnx"), Embedder(query_backend="torch")
    torch_path._st = onnx._load()  # the same weights
    return onnx, torch_path


def test_onnx_query_path_equals_the_pytorch_path(pair):
    onnx, torch_path = pair
    for text in PROMPTS:
        for layer in (None, 5):
            h_onnx, m_onnx = onnx.query_hidden(text, layer)
            h_torch, m_torch = torch_path.query_hidden(text, layer)
            assert h_onnx.shape == h_torch.shape and torch.equal(m_onnx, m_torch)
            assert torch.allclose(h_onnx, h_torch, atol=1e-4), (text, layer, (h_onnx - h_torch).abs().max())
        onnx.clear_cache()
        torch_path.clear_cache()
        a, b = onnx.encode(text), torch_path.encode(text)  # one uncached query: the query path
        assert torch.allclose(a, b, atol=1e-5)
    # and both agree with sentence-transformers' own encode
    ref = onnx.sentence_transformer.encode(PROMPTS[:1], convert_to_tensor=True).float().cpu()
    onnx.clear_cache()
    assert torch.allclose(onnx.encode(PROMPTS[0]), ref, atol=1e-5)


def fitted_routers(kind: str, embedders) -> list:
    """One router of ``kind`` per embedder, each fitted on the same experts; classifiers share the
    first one's head, so that only the query path differs."""
    routers = []
    for emb in embedders:
        router = SemanticRouter(embedder=emb) if kind == "semantic" else ClassifierRouter(embedder=emb, epochs=1)
        for t in TASKS:
            router.add_expert(expert(t))
        routers.append(router)
    if kind == "classifier":
        routers[0].retrain()
        for other in routers[1:]:
            other.head, other.labels, other._stale = routers[0].head, routers[0].labels, False
    return routers


@pytest.mark.parametrize("kind", ["semantic", "classifier"])
def test_routers_decide_the_same_on_both_paths(pair, kind):
    routers = fitted_routers(kind, pair)
    queries = ["What is 10 plus 12?", "Write 'garden' backwards.", "Make 'ocean' all caps.", PROMPTS[3]]
    for q in queries:
        for emb in pair:
            emb.clear_cache()
        da, db = (r.route(RouteRequest(q)) for r in routers)
        assert [n for n, _ in da.experts] == [n for n, _ in db.experts], q
        for (_, wa), (_, wb) in zip(da.experts, db.experts):
            assert wa == pytest.approx(wb, abs=1e-4)


def test_export_is_cached_on_disk_and_keyed_by_the_weights(tmp_path, monkeypatch, pair):
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path))
    monkeypatch.setattr(onnx_bert, "_SESSIONS", {})
    bert = pair[0].model
    first = onnx_bert.OnnxBert.for_model(bert, 2)
    files = sorted(p.name for p in (tmp_path / "onnx").iterdir())
    assert len(files) == 1 and files[0].endswith("-L2.onnx")
    assert onnx_bert.OnnxBert.for_model(bert, 2) is first  # this process's session

    monkeypatch.setattr(onnx_bert, "_SESSIONS", {})  # a new process: the file is reused, not re-exported
    monkeypatch.setattr(onnx_bert, "export", lambda *a, **k: pytest.fail("exported again"))
    again = onnx_bert.OnnxBert.for_model(bert, 2)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    assert torch.equal(again.hidden_states(ids, None), first.hidden_states(ids, None))

    other = Embedder(query_backend="torch").model  # a separate copy of the weights, one changed
    with torch.no_grad():
        other.encoder.layer[0].output.dense.bias.add_(1.0)
    assert onnx_bert.weights_hash(other) != onnx_bert.weights_hash(bert)


def test_unknown_query_backend_is_refused():
    with pytest.raises(RouterError, match="query_backend"):
        Embedder(query_backend="tensorrt")


def test_an_unwritable_cache_exports_to_a_temporary_folder(tmp_path, monkeypatch, pair):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")  # the cache folder cannot be created below a file
    monkeypatch.setenv("MOERGE_CACHE", str(blocked))
    monkeypatch.setattr(onnx_bert, "_SESSIONS", {})
    session = onnx_bert.OnnxBert.for_model(pair[0].model, 1)
    assert session.path.is_file() and not str(session.path).startswith(str(blocked))


def test_a_failing_export_falls_back_to_pytorch_with_the_same_answer(monkeypatch, pair):
    monkeypatch.setattr(onnx_bert, "_SESSIONS", {})

    def broken(*args, **kwargs):
        raise RuntimeError("exporter lacks an op")

    monkeypatch.setattr(onnx_bert, "export", broken)
    monkeypatch.setenv("MOERGE_CACHE", "/nonexistent-moerge-cache")
    emb = Embedder(query_backend="onnx")
    emb._st = pair[0]._load()
    got = emb.encode("Reverse the string 'falls back'.")
    assert emb.query_backend == "torch"
    assert torch.allclose(got, pair[1].encode("Reverse the string 'falls back'."), atol=1e-6)


def test_the_int8_query_path_is_quantised_and_close_to_fp32(tmp_path, monkeypatch, pair):
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path))
    monkeypatch.setattr(onnx_bert, "_SESSIONS", {})
    monkeypatch.delenv("MOERGE_ROUTER_QUERY_BACKEND", raising=False)
    assert Embedder().query_backend == "onnx"  # fp32 unless asked
    int8 = Embedder(query_backend="onnx-int8")
    int8._st = pair[0]._load()
    for text in PROMPTS:
        pair[0].clear_cache()
        a, b = int8.encode(text), pair[0].encode(text)
        # quantised, so not fp32's numbers, but the same direction to within int8's resolution
        assert not torch.allclose(a, b, atol=1e-4)
        assert float(a[0] @ b[0]) > 0.98, text
    files = sorted(p.name for p in (tmp_path / "onnx").iterdir())  # the fp32 graph it was made from, and it
    quantised = [f for f in files if f.endswith("-L6-int8-matmul-perchannel-w7.onnx")]
    assert len(files) == 2 and len(quantised) == 1, files
    ops = {n.op_type for n in onnx.load(str(tmp_path / "onnx" / quantised[0])).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops


def test_the_query_backend_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOERGE_ROUTER_QUERY_BACKEND", "onnx-int8")
    assert Embedder().query_backend == "onnx-int8"
    assert Embedder(query_backend="torch").query_backend == "torch"  # an argument still wins
    monkeypatch.setenv("MOERGE_ROUTER_QUERY_BACKEND", "int4")
    with pytest.raises(RouterError, match="MOERGE_ROUTER_QUERY_BACKEND"):
        Embedder()


@pytest.mark.parametrize("kind", ["semantic", "classifier"])
def test_routers_on_the_int8_path_decide_clear_queries_as_on_fp32(pair, kind):
    int8 = Embedder(query_backend="onnx-int8")
    int8._st = pair[0]._load()
    routers = fitted_routers(kind, (int8, pair[0]))
    clear = {"What is 10 plus 12?": "math", "Write 'garden' backwards.": "reverse", "Make 'ocean' all caps.": "upper"}
    for q, task in clear.items():
        int8.clear_cache()
        pair[0].clear_cache()
        da, db = (r.route(RouteRequest(q)) for r in routers)
        assert [n for n, _ in da.experts] == [n for n, _ in db.experts] == [f"expert-{task}"], q


def test_the_classifier_runs_its_trained_layer_as_a_graph_of_its_own(tmp_path, monkeypatch, pair):
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path))
    monkeypatch.setattr(onnx_bert, "_SESSIONS", {})
    onnx_router, torch_router = fitted_routers("classifier", pair)
    head = onnx_router.head
    query = "Spell 'window' in reverse order."
    for emb in pair:
        emb.clear_cache()
    a, b = onnx_router.probabilities(query), torch_router.probabilities(query)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)
    # the fine-tuned layer went through ONNX Runtime: a graph of that one layer, hidden states in and out
    session = pair[0]._onnx_layers[head.layers]
    assert isinstance(session, onnx_bert.OnnxLayers) and session.path.name.endswith("-N1.onnx")
    hidden, _ = pair[1].query_hidden(query, onnx_router._split)
    with torch.inference_mode():
        want = torch_router.emb.query_layers(head.layers, hidden)  # the PyTorch path
    assert torch.allclose(session(hidden), want, atol=1e-4)

    # another process with the same trained head reuses the file; a changed head gets its own
    monkeypatch.setattr(onnx_bert, "_SESSIONS", {})
    monkeypatch.setattr(onnx_bert, "export_layers", lambda *a, **k: pytest.fail("exported again"))
    assert onnx_bert.OnnxLayers.for_layers(list(head.layers)).path == session.path
    monkeypatch.undo()
    changed = copy.deepcopy(head.layers)
    with torch.no_grad():
        changed[0].output.dense.bias.add_(0.5)
    assert onnx_bert.weights_hash(changed) != onnx_bert.weights_hash(head.layers)


def test_the_int8_classifier_quantises_its_trained_layer_too(tmp_path, monkeypatch, pair):
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path))
    monkeypatch.setattr(onnx_bert, "_SESSIONS", {})
    int8 = Embedder(query_backend="onnx-int8")
    int8._st = pair[0]._load()
    (router,) = fitted_routers("classifier", (int8,))
    assert router.route(RouteRequest("Make 'ocean' all caps.")).top == "expert-upper"
    files = sorted(p.name for p in (tmp_path / "onnx").iterdir())
    layer_graphs = [f for f in files if f.startswith("layers-")]
    assert len(layer_graphs) == 2 and any(f.endswith("-N1-int8-matmul-perchannel-w7.onnx") for f in layer_graphs)
