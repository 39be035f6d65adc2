"""Everything a registration is checked against before anything is written.

Each check raises ``RegistrationError`` with one line naming what is wrong. Weights are read only
through safetensors headers (shapes and dtypes): no model is instantiated, nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from safetensors import safe_open

from registry.errors import RegistrationError
from registry.models import EXAMPLE_SPLITS

GiB = 1 << 30
MiB = 1 << 20

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# base models may be named as hub ids are: "Qwen/Qwen2.5-7B-Instruct"
BASE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
# litellm model strings: provider/model, e.g. openai/gpt-4o-mini, bedrock/anthropic.claude-v2:1
EXTERNAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[^\s]{1,250}$")

# Formats that unpickle on load (arbitrary code execution). Refused by name, never opened.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib", ".dill"}
# What the transformers Trainer leaves beside a checkpoint: its state, not the model's. Skipped
# (never copied, never opened), so a Trainer output folder registers as it is.
TRAINER_LEFTOVERS = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$")
# Files of a tokenizer, one of which a base must have (tokenizer.json, SentencePiece, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")
# What an expert folder may hold besides extension-less text files (LICENSE, NOTICE).
ALLOWED_SUFFIXES = {".safetensors", ".json", ".txt", ".md", ".model", ".jinja", ".tiktoken"}


@dataclass(frozen=True)
class Limits:
    max_expert_bytes: int = 2 * GiB
    max_files: int = 256
    max_examples_bytes: int = 64 * MiB
    max_examples: int = 100_000

    @classmethod
    def from_env(cls) -> Limits:
        """Overrides: MOERGE_MAX_EXPERT_BYTES, MOERGE_MAX_EXPERT_FILES, MOERGE_MAX_EXAMPLES."""
        d = cls()
        return cls(
            max_expert_bytes=int(os.environ.get("MOERGE_MAX_EXPERT_BYTES", d.max_expert_bytes)),
            max_files=int(os.environ.get("MOERGE_MAX_EXPERT_FILES", d.max_files)),
            max_examples_bytes=d.max_examples_bytes,
            max_examples=int(os.environ.get("MOERGE_MAX_EXAMPLES", d.max_examples)),
        )


@dataclass(frozen=True)
class SourceFile:
    rel: PurePosixPath  # path inside the expert folder
    path: Path  # resolved path to read from
    size: int


@dataclass(frozen=True)
class BaseInfo:
    architecture: str
    fingerprint: str
    remote_code: bool = False  # config.json's auto_map, or .py files: the model runs code of its own


@dataclass(frozen=True)
class ExampleRow:
    prompt: str
    reference: str = ""
    task: str = ""
    split: str = "train"


@dataclass
class AdapterInfo:
    rank: int
    target_modules: list[str] | str
    modules: set[str] = field(default_factory=set)


# --- names ---------------------------------------------------------------------------------------


def check_name(name: str, what: str = "expert name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistrationError(f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' (at most 128, no '/')")
    return name


def check_base_name(name: str) -> str:
    if not isinstance(name, str) or not BASE_NAME_RE.match(name):
        raise RegistrationError(
            f"invalid base model name {name!r}: use letters, digits, '.', '_' or '-', with at most one '/' "
            'as hub ids have ("Qwen/Qwen2.5-7B-Instruct")'
        )
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise RegistrationError(f"invalid version {version!r}: use letters, digits, '.', '_', '+' or '-'")
    return version


def check_external(source: str) -> str:
    if not isinstance(source, str) or not EXTERNAL_RE.match(source) or ".." in source.split("/"):
        raise RegistrationError(
            f"external expert source {source!r} is not a litellm model string like 'openai/gpt-4o-mini'"
        )
    return source


ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# what a key looks like, so that one pasted where its variable's name belongs is refused
SECRET_RE = re.compile(r"^(sk-|sk_|mk-|ghp_|xox|AIza)|^[A-Za-z0-9+/=_-]{32,}$")


def check_connection(api_base: str | None, api_key_env: str | None) -> None:
    """An external expert's ``api_base`` (an http(s) URL) and ``api_key_env`` (the NAME of an
    environment variable; the registry never stores a secret)."""
    if api_base is not None and not re.match(r"^https?://[^\s/]+(/\S*)?$", str(api_base)):
        raise RegistrationError(f"api_base {api_base!r} is not an http(s) URL such as http://10.0.0.5:8000/v1")
    if api_key_env is not None:
        if SECRET_RE.match(str(api_key_env)) and not str(api_key_env).isupper():
            raise RegistrationError(
                "api_key_env takes the name of the environment variable that holds the key "
                "(such as OPENAI_API_KEY), never the key itself"
            )
        if not ENV_NAME_RE.match(str(api_key_env)):
            raise RegistrationError(f"api_key_env {api_key_env!r} is not an environment variable name")


def check_labels(values, what: str) -> list[str]:  # noqa: ANN001
    out = []
    for v in values or ():
        if not isinstance(v, str) or not v.strip() or len(v) > 128:
            raise RegistrationError(f"invalid {what} {v!r}: a non-empty string of at most 128 characters")
        if v.strip() not in out:
            out.append(v.strip())
    return out


# --- folders -------------------------------------------------------------------------------------


def scan_source(source: str | os.PathLike, limits: Limits) -> tuple[Path, list[SourceFile]]:
    """List the files of an expert folder, refusing anything unsafe or unexpected.

    Hidden entries (.git, .gitattributes, .cache) and a Trainer's leftovers (``training_args.bin``,
    ``optimizer.pt``, …) are skipped. A symlink is followed only when its target stays inside the
    folder, or, for a Hugging Face cache snapshot (``models--org--name/snapshots/<revision>``),
    inside that model's cache folder, where the snapshot's files point into ``blobs/``. Pickled
    weights and unknown file types are refused.
    """
    given = Path(source).expanduser()
    if not given.exists():
        raise RegistrationError(f"source {str(source)!r} does not exist")
    if not given.is_dir():
        raise RegistrationError(f"source {str(source)!r} is not a directory (expected an expert folder)")
    root = given.resolve()
    links_may_reach = hf_cache_repo(root) or root

    files: list[SourceFile] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # os.walk lists symlinked folders among dirnames but never enters them: check them here.
        for d in list(dirnames):
            if (here / d).is_symlink():
                _inside(links_may_reach, here / d, root)
                raise RegistrationError(f"{(here / d).relative_to(root)} is a symlinked folder: copy it in instead")
        for fname in sorted(filenames):
            if fname.startswith(".") or (here == root and TRAINER_LEFTOVERS.match(fname)):
                continue
            entry = here / fname
            rel = PurePosixPath(entry.relative_to(root).as_posix())
            target = _inside(links_may_reach, entry, root) if entry.is_symlink() else entry
            suffix = entry.suffix.lower()
            if suffix in PICKLE_SUFFIXES or target.suffix.lower() in PICKLE_SUFFIXES:
                raise RegistrationError(
                    f"{rel}: pickled weights are refused (they run code when loaded); weights must be .safetensors"
                )
            if suffix and suffix not in ALLOWED_SUFFIXES:
                raise RegistrationError(
                    f"{rel}: unsupported file type {suffix!r} (allowed: {', '.join(sorted(ALLOWED_SUFFIXES))})"
                )
            st = target.stat()
            if not stat.S_ISREG(st.st_mode):
                raise RegistrationError(f"{rel} is not a regular file")
            total += st.st_size
            files.append(SourceFile(rel=rel, path=target, size=st.st_size))
            if len(files) > limits.max_files:
                raise RegistrationError(f"source holds more than {limits.max_files} files (the limit)")
            if total > limits.max_expert_bytes:
                raise RegistrationError(
                    f"source is larger than the limit of {_human(limits.max_expert_bytes)} per expert"
                )
    if not files:
        raise RegistrationError(f"source {str(source)!r} holds no files")
    return root, files


def _inside(allowed: Path, link: Path, root: Path) -> Path:
    target = link.resolve()
    if not target.is_relative_to(allowed):
        where = "the model's cache folder" if allowed != root else "the source folder"
        raise RegistrationError(f"{link.relative_to(root)} is a symlink that escapes {where}")
    return target


def hf_cache_repo(folder: Path) -> Path | None:
    """The model's cache folder (``…/models--org--name``) when ``folder`` is one of its snapshots
    (``…/models--org--name/snapshots/<revision>``), else None."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return None


def _human(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"


def _by_rel(files: list[SourceFile]) -> dict[str, SourceFile]:
    return {str(f.rel): f for f in files}


def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistrationError(f"{label} does not parse as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RegistrationError(f"{label} must hold a JSON object")
    return data


def safetensors_shapes(path: Path, label: str) -> dict[str, list[int]]:
    """Tensor name -> shape, from the header only (the library validates offsets and dtypes)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # SafetensorError, OSError: the file is not what it claims
        raise RegistrationError(f"{label} is not a valid safetensors file: {exc}") from None


def _weight_files(folder: Path, present: set[str], label: str) -> list[str]:
    """The safetensors files holding a checkpoint, from its index when sharded."""
    index = "model.safetensors.index.json"
    if index in present:
        weight_map = _read_json(folder / index, f"{label}: {index}").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise RegistrationError(f"{label}: {index} has no weight_map")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not isinstance(shard, str) or "/" in shard or shard not in present:
                raise RegistrationError(f"{label}: {index} names shard {shard!r}, which is missing")
        return shards
    shards = sorted(p for p in present if p.endswith(".safetensors") and "/" not in p)
    if not shards:
        pickled = sorted(p for p in present if Path(p).suffix in PICKLE_SUFFIXES)
        hint = f" ({', '.join(pickled)} is pickled and refused)" if pickled else ""
        raise RegistrationError(f"{label}: no .safetensors weights found{hint}")
    return shards


# --- base models ---------------------------------------------------------------------------------


def inspect_base(path: str | os.PathLike, trust_remote_code: bool = False) -> BaseInfo:
    """A base model folder: config.json, safetensors weights and a tokenizer. Only headers are read.

    A model that brings its own code (``auto_map`` in config.json, ``.py`` files) is refused unless
    ``trust_remote_code`` says its code may run: transformers would otherwise stop at an interactive
    prompt, or refuse, on every machine that loads it.

    The fingerprint is a sha256 of config.json and the safetensors headers: cheap for multi-GB
    bases, and it changes whenever the architecture or a tensor's shape or dtype does.
    """
    folder = Path(path).expanduser()
    label = f"base model {str(path)!r}"
    if not folder.is_dir():
        raise RegistrationError(f"{label} is not a directory")
    present = {p.name for p in folder.iterdir() if p.is_file()}
    if "config.json" not in present:
        raise RegistrationError(f"{label} has no config.json")
    config = _read_json(folder / "config.json", f"{label}: config.json")
    if not any(name in present for name in TOKENIZER_FILES) and not any(p.endswith(".tiktoken") for p in present):
        raise RegistrationError(
            f"{label} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy in the tokenizer files of the "
            "model it came from (tokenizer.save_pretrained(folder))"
        )
    code = sorted(p for p in present if p.endswith(".py"))
    remote_code = bool(config.get("auto_map")) or bool(code)
    if remote_code and not trust_remote_code:
        what = (
            "config.json has an auto_map" + (f" and the folder holds {', '.join(code)}" if code else "")
            if config.get("auto_map")
            else f"the folder holds {', '.join(code)}"
        )
        raise RegistrationError(
            f"{label} runs code of its own ({what}); register it with --trust-remote-code if you trust "
            "that code, since every engine that loads this base will run it"
        )
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for shard in _weight_files(folder, present, label):
        safetensors_shapes(folder / shard, f"{label}: {shard}")
        with open(folder / shard, "rb") as f:
            head = f.read(8)
            digest.update(head + f.read(int.from_bytes(head, "little")))
    arch = config.get("architectures") or [config.get("model_type", "")]
    return BaseInfo(architecture=str(arch[0] if arch else ""), fingerprint=digest.hexdigest(), remote_code=remote_code)


def base_weight_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    folder = Path(path)
    present = {p.name for p in folder.iterdir() if p.is_file()}
    shapes: dict[str, list[int]] = {}
    for shard in _weight_files(folder, present, f"base model {str(path)!r}"):
        shapes.update(safetensors_shapes(folder / shard, f"base model {str(path)!r}: {shard}"))
    # tied embeddings (Qwen2 0.5B, Gemma, …): the checkpoint stores the embedding only, and the
    # output layer an adapter may target is that same matrix
    config = _read_json(folder / "config.json", "config.json") if "config.json" in present else {}
    embedding = next((k for k in shapes if k.endswith(("embed_tokens.weight", "wte.weight"))), None)
    if config.get("tie_word_embeddings", True) and embedding and not any(k.endswith("lm_head.weight") for k in shapes):
        shapes["lm_head.weight"] = shapes[embedding]
    return shapes


# --- adapters ------------------------------------------------------------------------------------

LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<param>weight|bias))?$"
)
PEFT_PREFIX = "base_model.model."


def validate_adapter(root: Path, files: list[SourceFile], base_name: str, base_path: str) -> AdapterInfo:
    """A peft LoRA folder that fits the base: every target exists and every A/B shape fits."""
    by_rel = _by_rel(files)
    if "adapter_config.json" not in by_rel:
        raise RegistrationError("adapter folder has no adapter_config.json (expected a peft LoRA folder)")
    config = _read_json(by_rel["adapter_config.json"].path, "adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise RegistrationError(
            f"adapter_config.json: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise RegistrationError(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    targets = config.get("target_modules")
    if (
        not targets
        or not isinstance(targets, (list, str))
        or (isinstance(targets, list) and not all(isinstance(t, str) for t in targets))
    ):
        raise RegistrationError("adapter_config.json: target_modules must be a list of module names or a regex")
    if "adapter_model.safetensors" not in by_rel:
        raise RegistrationError("adapter folder has no adapter_model.safetensors")

    base_shapes = base_weight_shapes(base_path)
    base_modules = {k[: -len(".weight")] for k in base_shapes if k.endswith(".weight")}
    _check_targets(targets, base_modules, base_name)
    # before the shapes: an adapter trained with added tokens has a larger embedding too, and
    # its tokenizer says why
    _check_own_tokenizer(root, by_rel, base_name, base_path)

    rank_pattern = config.get("rank_pattern") or {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    tensors = safetensors_shapes(by_rel["adapter_model.safetensors"].path, "adapter_model.safetensors")
    has_a: set[str] = set()
    has_b: set[str] = set()
    for key, shape in sorted(tensors.items()):
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        m = LORA_KEY.match(name)
        if m is None:  # modules_to_save / trainable tokens: a full tensor replacing the base's
            base_key = _find(name, base_shapes)
            if base_key is None:
                raise RegistrationError(f"adapter tensor {key} has no counterpart in base {base_name!r}")
            if base_shapes[base_key] != shape:
                raise RegistrationError(
                    f"adapter tensor {key} has shape {shape}, base {base_name!r} has {base_shapes[base_key]}"
                )
            continue
        module, part, param = m["module"], m["part"], m["param"] or "weight"
        base_key = _find(f"{module}.weight", base_shapes)
        if base_key is None:
            raise RegistrationError(
                f"adapter tensor {key} targets module {module!r}, which base {base_name!r} does not have"
            )
        base_shape = base_shapes[base_key]
        if len(base_shape) != 2:
            raise RegistrationError(f"adapter tensor {key}: base layer {module} is not a linear or embedding layer")
        r = _rank_for(module, rank, rank_pattern)
        if part.startswith("lora_embedding"):
            fan_in, fan_out = base_shape  # nn.Embedding weight: [num_embeddings, dim]
        elif fan_in_fan_out:
            fan_in, fan_out = base_shape  # GPT-2 Conv1D weight: [in, out]
        else:
            fan_out, fan_in = base_shape  # nn.Linear weight: [out, in]
        expected = {
            ("lora_A", "weight"): [r, fan_in],
            ("lora_B", "weight"): [fan_out, r],
            ("lora_B", "bias"): [fan_out],
            ("lora_embedding_A", "weight"): [r, fan_in],
            ("lora_embedding_B", "weight"): [fan_out, r],
            ("lora_magnitude_vector", "weight"): [fan_out],
        }.get((part, param))
        if expected is None:
            raise RegistrationError(f"adapter tensor {key}: unexpected LoRA parameter")
        if shape != expected:
            raise RegistrationError(
                f"adapter tensor {key} has shape {shape}, but base layer {module} "
                f"(in {fan_in}, out {fan_out}) with rank {r} needs {expected}"
            )
        if part in ("lora_A", "lora_embedding_A"):
            has_a.add(module)
        elif part in ("lora_B", "lora_embedding_B") and param == "weight":
            has_b.add(module)
    if not has_a:
        raise RegistrationError("adapter_model.safetensors holds no LoRA tensors")
    if has_a != has_b:
        odd = sorted(has_a ^ has_b)[0]
        raise RegistrationError(f"adapter module {odd} has only one of its LoRA factors (A and B go together)")
    _warn_other_base(config.get("base_model_name_or_path"), base_name, base_path)  # only once accepted
    return AdapterInfo(rank=rank, target_modules=targets, modules=has_a)


def _check_own_tokenizer(root: Path, by_rel: dict[str, SourceFile], base_name: str, base_path: str) -> None:
    """An adapter folder may ship a tokenizer (a Trainer saves one beside every checkpoint), often
    with a chat template of its own, which the engines then render its chats with. It must be the
    base's vocabulary: every engine runs an adapter on its base's embedding matrix (vLLM's LoRA has
    no extra vocabulary), so an adapter cannot bring tokens of its own."""
    if not any(name in by_rel for name in (*TOKENIZER_FILES, "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer

    def load(folder: str | Path, what: str):
        try:  # never a tokenizer's own code, and never the prompt that asks whether to run it
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, …
            raise RegistrationError(f"{what} does not load: {exc}") from exc

    own = load(root, "the adapter folder's tokenizer").get_vocab()
    base = load(base_path, f"the tokenizer of base {base_name!r}").get_vocab()
    if own == base:
        return
    added = sorted(set(own) - set(base), key=own.__getitem__)
    missing = set(base) - set(own)
    moved = sorted(t for t in own.keys() & base.keys() if own[t] != base[t])
    if added and not moved and not missing:
        shown = ", ".join(repr(t) for t in added[:5]) + (", …" if len(added) > 5 else "")
        raise RegistrationError(
            f"the adapter's tokenizer adds {len(added)} token(s) to the vocabulary of base {base_name!r} ({shown}). "
            "An adapter runs on its base's embedding matrix on every engine (vLLM's LoRA has no extra "
            "vocabulary), so it cannot bring tokens of its own. Merge it into a copy of its base "
            "(resize_token_embeddings(len(tokenizer)), PeftModel.from_pretrained(...).merge_and_unload(), "
            "save_pretrained with the tokenizer) and register that folder as a model expert (kind 'model')."
        )
    raise RegistrationError(
        f"the adapter's tokenizer is not the one of base {base_name!r}: of its {len(own)} tokens {len(moved)} have "
        f"other ids and {len(added)} are new, and {len(missing)} of the base's are missing. Register the adapter "
        "on the base it was trained on, or remove the tokenizer files from its folder if they do not belong to it."
    )


class RegistrationWarning(UserWarning):
    """Registered, but something looks off: ``moerge register`` prints these, and the admin API
    returns them in the card's ``warnings``."""


def _warn_other_base(named: Any, base_name: str, base_path: str) -> None:
    """The adapter says it was trained on another model than the base it is registered on. The
    shapes fit (checked above), so it loads; it may still answer badly on a different base."""
    if not isinstance(named, str) or not named:
        return

    def tail(x: str) -> str:
        return x.rstrip("/").rsplit("/", 1)[-1].lower()

    base_folder = Path(base_path)
    known = {base_name.lower(), tail(base_name), tail(str(base_folder)), str(base_folder).lower()}
    cache = hf_cache_repo(base_folder)  # …/models--Qwen--Qwen2.5-7B/snapshots/<rev>: Qwen/Qwen2.5-7B
    if cache is not None:
        hub_id = cache.name.removeprefix("models--").replace("--", "/")
        known |= {hub_id.lower(), tail(hub_id)}
    if named.lower() not in known and tail(named) not in known:
        warnings.warn(
            RegistrationWarning(
                f"adapter_config.json says the adapter was trained on {named!r}, not on base {base_name!r} "
                f"({base_path}); the shapes fit, but its answers may not"
            ),
            stacklevel=4,
        )


def _find(key: str, shapes: dict[str, list[int]]) -> str | None:
    """The base tensor a peft key refers to (checkpoints differ on a leading ``model.``)."""
    key = key.replace(".base_layer.", ".")  # peft's save_embedding_layers copies of a wrapped layer
    for candidate in (key, f"model.{key}", key.removeprefix("model.")):
        if candidate in shapes:
            return candidate
    return None


def _check_targets(targets: list[str] | str, base_modules: set[str], base_name: str) -> None:
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, m) for m in base_modules):
            return
        raise RegistrationError(f"target_modules pattern {targets!r} matches no module of base {base_name!r}")
    for t in targets:
        if not any(m == t or m.endswith(f".{t}") for m in base_modules):
            raise RegistrationError(f"target module {t!r} does not exist in base {base_name!r}")


def _rank_for(module: str, rank: int, rank_pattern: dict[str, int]) -> int:
    # peft matches rank_pattern keys as regexes against the end of the module name
    for pattern, r in rank_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return int(r)
    return rank


# --- full models ---------------------------------------------------------------------------------


def validate_model(root: Path, files: list[SourceFile]) -> str:
    """A full model folder: config.json + safetensors weights (+ tokenizer). Returns its architecture."""
    by_rel = _by_rel(files)
    if "config.json" not in by_rel:
        raise RegistrationError("model folder has no config.json (expected a Hugging Face model folder)")
    config = _read_json(by_rel["config.json"].path, "config.json")
    if not config.get("model_type") and not config.get("architectures"):
        raise RegistrationError("config.json names neither model_type nor architectures")
    code = sorted(rel for rel in by_rel if rel.endswith(".py"))
    if config.get("auto_map") or code:
        raise RegistrationError(
            "the model runs code of its own ("
            + ("config.json has an auto_map" if config.get("auto_map") else ", ".join(code))
            + "); full-model experts must be "
            "architectures transformers ships (register a base with --trust-remote-code for such code)"
        )
    for shard in _weight_files(root, set(by_rel), "model folder"):
        safetensors_shapes(by_rel[shard].path, shard)
    arch = config.get("architectures") or [config.get("model_type")]
    return str(arch[0])


# --- examples ------------------------------------------------------------------------------------


def load_examples(examples: str | os.PathLike | list[dict] | None, limits: Limits) -> list[ExampleRow]:
    """Example prompts from a JSONL file or a list of dicts: {prompt, reference?, task?, split?}."""
    if examples is None:
        return []
    if isinstance(examples, (str, os.PathLike)):
        path = Path(examples).expanduser()
        if not path.is_file():
            raise RegistrationError(f"examples file {str(examples)!r} does not exist")
        if path.stat().st_size > limits.max_examples_bytes:
            raise RegistrationError(f"examples file is larger than {_human(limits.max_examples_bytes)}")
        rows: list[tuple[str, Any]] = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise RegistrationError(f"examples file {path.name} is not UTF-8 text") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"examples {path.name} line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise RegistrationError(f"examples {path.name} line {n}: not valid JSON ({exc.msg})") from None
    elif isinstance(examples, (list, tuple)):
        rows = [(f"examples item {i}", row) for i, row in enumerate(examples)]
    else:
        raise RegistrationError("examples must be a path to a JSONL file or a list of dicts")
    if len(rows) > limits.max_examples:
        raise RegistrationError(f"more than {limits.max_examples} examples (the limit)")
    return [_example(where, row) for where, row in rows]


def _example(where: str, row: Any) -> ExampleRow:
    if not isinstance(row, dict):
        raise RegistrationError(f"{where}: expected a JSON object with a 'prompt'")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RegistrationError(f"{where}: 'prompt' must be a non-empty string")
    out = {"prompt": prompt}
    for key in ("reference", "task"):
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise RegistrationError(f"{where}: {key!r} must be a string")
        out[key] = value or ""
    if len(out["task"]) > 128:
        raise RegistrationError(f"{where}: 'task' is longer than 128 characters")
    split = row.get("split") or "train"
    if split not in EXAMPLE_SPLITS:
        raise RegistrationError(f"{where}: split {split!r} is not one of {', '.join(EXAMPLE_SPLITS)}")
    return ExampleRow(prompt=prompt, reference=out["reference"], task=out["task"], split=split)
