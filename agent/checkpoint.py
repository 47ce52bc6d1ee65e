"""Checkpoints in the official Hugging Face layout.

A checkpoint is a directory with ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` plus its shards. The key names are the official ones (spec 2.10
and 1.9); our modules use them as attribute names, so loading is a pure mapping with shape checks.

Everything here is model-agnostic: the language model and the audio tokenizer both use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

#: dtypes a checkpoint may store floating-point weights in.
SUPPORTED_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


#: what a checkpoint holds, as error messages name it (``--model`` and ``--tokenizer`` of ``serve``)
LM_CHECKPOINT = "language model checkpoint"
CODEC_CHECKPOINT = "audio tokenizer checkpoint"

#: ``config.json`` markers of each kind of checkpoint, to name a mix-up instead of failing on keys
_KIND_MARKERS = {
    LM_CHECKPOINT: ({"qwen2"}, {"MiMoAudioForCausalLM", "MiMoAudioModel"}),
    CODEC_CHECKPOINT: ({"mimo_audio_tokenizer"}, {"MiMoAudioTokenizer"}),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or key at fault."""


def check_field_types(config: object, error: type[Exception], counts: Iterable[str] = (),
                      skip: Iterable[str] = ()) -> None:
    """Check each field of a config dataclass against its annotation, so that a JSON ``"big"`` for
    a size is named here instead of surfacing as a torch error far from the file. ``counts`` must
    be at least 1; float fields must be finite. Raises ``error`` naming the field."""
    hints = typing.get_type_hints(type(config))
    counts, skip = set(counts), set(skip)
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        allowed = tuple(typing.get_origin(t) or t for t in (typing.get_args(hint) if union else (hint,)))
        value = getattr(config, f.name)
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, bool):
            ok = bool in allowed
        elif isinstance(value, int):
            ok = int in allowed or float in allowed
        elif isinstance(value, float):
            ok = float in allowed and math.isfinite(value)
        else:
            ok = isinstance(value, tuple(t for t in allowed if isinstance(t, type)))
        if not ok:
            kinds = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
            raise error(f"{f.name}={value!r} must be {'a finite ' if isinstance(value, float) else ''}{kinds}")
        if f.name in counts and value < 1:
            raise error(f"{f.name}={value!r} must be at least 1")


def check_lm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Refuse fp16 for the language model: the official code runs it in bf16 only (it builds the
    speech embeddings in bf16, so an fp16 model fails there) and Qwen2-7B's activations are not
    kept within fp16's range (65504) by its bf16 training."""
    if dtype == torch.float16:
        raise CheckpointError(
            "fp16 is not supported for the language model: MiMo-Audio runs in bf16 (the official code "
            "builds its speech embeddings in bf16) and a Qwen2-7B in fp16 risks overflow; use bf16 or fp32"
        )
    return dtype


def check_kind(directory: Path, config: Mapping, want: str) -> None:
    """Raise when ``config.json`` says the directory holds the other kind of checkpoint."""

    def marked(kind: str) -> bool:
        model_types, architectures = _KIND_MARKERS[kind]
        return config.get("model_type") in model_types or bool(set(config.get("architectures") or ()) & architectures)

    for other in _KIND_MARKERS:
        if other != want and marked(other) and not marked(want):
            flag = "--model" if other == LM_CHECKPOINT else "--tokenizer"
            raise CheckpointError(
                f"{directory} is a {other} ({CONFIG_NAME} has model_type={config.get('model_type')!r}), "
                f"not a {want}; pass it as {flag}"
            )


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"fp16"``/``"fp32"`` (or a torch dtype) to a torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in SUPPORTED_FLOAT_DTYPES:
            raise CheckpointError(f"unsupported dtype {name}; use one of bf16, fp16, fp32")
        return name
    try:
        return _DTYPE_NAMES[name.lower()]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {name!r}; use one of bf16, fp16, fp32") from None


def parse_device(name: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA when present) to a device. A CUDA
    device always comes back with its index (``"cuda"`` is the current one), as
    ``torch.cuda.set_device`` and comparisons with a tensor's device need."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise CheckpointError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise CheckpointError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    return device


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a Hugging Face hub id downloaded into the local cache.

    A string that names an existing directory is used as is. Anything else of the form
    ``owner/name`` is treated as a hub id and fetched with ``huggingface_hub.snapshot_download``
    (config, safetensors and tokenizer files only).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"checkpoint path {text!r} is a file; pass the directory that holds {CONFIG_NAME}")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise CheckpointError(f"checkpoint {text!r} is neither a local directory nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise CheckpointError("huggingface_hub is needed to download hub checkpoints") from exc
    try:
        local = snapshot_download(
            repo_id=text,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"],
        )
    except Exception as exc:
        raise CheckpointError(f"could not download checkpoint {text!r} from the Hugging Face hub: {exc}") from exc
    return Path(local)


def read_json(path: Path, what: str = "checkpoint") -> dict:
    """A JSON object file of a checkpoint; errors name the file, the kind of checkpoint and, for
    bad JSON, the line and column."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} {path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_config(directory: str | os.PathLike, what: str = "checkpoint") -> dict:
    """The parsed ``config.json`` of a checkpoint directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"missing file: {path} (a {what} directory needs {CONFIG_NAME})")
    return read_json(path, what)


@contextlib.contextmanager
def open_weights(path: Path, what: str = "checkpoint") -> Iterator:
    """``safe_open`` whose failures (a truncated download, a Git LFS pointer, another format)
    raise :class:`CheckpointError` naming the file and the kind of checkpoint."""
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:
        raise CheckpointError(f"{what} {path} is not a readable safetensors file: {exc}{_hint(path)}") from None
    with handle as f:
        yield f


def _hint(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return ""
    if head.startswith(b"version https://git-lfs"):
        return " (it is a Git LFS pointer: fetch the weights with `git lfs pull` or huggingface_hub)"
    return " (a truncated or corrupted download? fetch it again)"


def weight_files(directory: str | os.PathLike, what: str = "checkpoint") -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it (single file or sharded)."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    single = directory / WEIGHTS_NAME
    if index.is_file():
        weight_map = read_json(index, what).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{what} {index} is not a valid safetensors index (needs a 'weight_map' object)")
        files = {}
        for key, shard in weight_map.items():
            shard_path = directory / str(shard)
            if not shard_path.is_file():
                raise CheckpointError(f"missing file: {shard_path} (listed in {INDEX_NAME} for key {key!r})")
            files[key] = shard_path
        return files
    if single.is_file():
        with open_weights(single, what) as f:
            return {key: single for key in f.keys()}  # noqa: SIM118 - safe_open has keys(), not iteration
    raise CheckpointError(f"missing file: no {WEIGHTS_NAME} or {INDEX_NAME} in {directory} ({what})")


def load_state_dict(
    directory: str | os.PathLike,
    *,
    keys: Iterable[str] | None = None,
    prefix: str = "",
    what: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Read tensors from a checkpoint directory (all of them, or ``keys``, or those under ``prefix``)."""
    files = weight_files(directory, what)
    wanted = set(keys) if keys is not None else None
    by_file: dict[Path, list[str]] = {}
    for key, path in files.items():
        if (wanted is None or key in wanted) and key.startswith(prefix):
            by_file.setdefault(path, []).append(key)
    state: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with open_weights(path, what) as f:
            stored = set(f.keys())
            for name in names:
                if name not in stored:
                    raise CheckpointError(f"{what} {path} lacks tensor {name!r}, which {INDEX_NAME} puts there")
                state[name] = f.get_tensor(name)
    return state


def load_into_module(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    ignore_unexpected: Iterable[str] = (),
    ignore_missing: Iterable[str] = (),
    keep_fp32: Iterable[str] = (),
) -> None:
    """Copy ``state`` into ``module``'s parameters and persistent buffers, checking everything.

    Raises :class:`CheckpointError` naming the first problems found: keys the module needs that
    the checkpoint lacks, keys the checkpoint has that the module does not know, a tensor whose
    shape differs (both shapes named), a tensor stored in an unsupported dtype, or NaN/Inf values
    (checked on the destination, so a value that overflows the load dtype counts too; one
    device-side reduction per tensor and a single host sync). ``ignore_*`` are regular expressions
    for keys to skip (training-only buffers, say). Tensors are cast to the dtype of the
    destination, except those matching ``keep_fp32``, which stay fp32.
    """
    targets = dict(module.state_dict(keep_vars=True))
    ignore_unexpected_re = [re.compile(p) for p in ignore_unexpected]
    ignore_missing_re = [re.compile(p) for p in ignore_missing]
    keep_fp32_re = [re.compile(p) for p in keep_fp32]

    missing = sorted(
        k for k in targets if k not in state and not any(p.fullmatch(k) for p in ignore_missing_re)
    )
    unexpected = sorted(
        k for k in state if k not in targets and not any(p.fullmatch(k) for p in ignore_unexpected_re)
    )
    problems = []
    if missing:
        problems.append(f"missing key(s) in {source}: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) in {source}: {_first(unexpected)}")
    for key, tensor in state.items():
        if key not in targets:
            continue
        want = targets[key]
        if tuple(tensor.shape) != tuple(want.shape):
            problems.append(
                f"wrong shape for {key}: {source} has {list(tensor.shape)}, the model expects {list(want.shape)}"
            )
        elif want.is_floating_point() and tensor.dtype not in SUPPORTED_FLOAT_DTYPES:
            problems.append(f"unsupported dtype {tensor.dtype} for {key} in {source} (expected bf16, fp16 or fp32)")
        elif not want.is_floating_point() and tensor.is_floating_point():
            problems.append(f"unsupported dtype {tensor.dtype} for {key} in {source} (expected {want.dtype})")
    if problems:
        raise CheckpointError("; ".join(problems))

    finite: list[tuple[str, torch.Tensor]] = []
    with torch.no_grad():
        for key, tensor in state.items():
            if key not in targets:
                continue
            dest = targets[key]
            if any(p.fullmatch(key) for p in keep_fp32_re):
                dest.data = tensor.to(device=dest.device, dtype=torch.float32).clone()
            else:
                dest.copy_(tensor.to(device=dest.device, dtype=dest.dtype))
            if dest.is_floating_point():
                finite.append((key, torch.isfinite(dest.data).all()))
    if finite:
        flags = torch.stack([ok.to("cpu") for _, ok in finite]).tolist()
        bad = [key for (key, _), ok in zip(finite, flags, strict=True) if not ok]
        if bad:
            raise CheckpointError(
                f"non-finite values (NaN or Inf) in tensor(s) of {source}: {_first(bad)}"
                + ("" if all(state[k].dtype == targets[k].dtype for k in bad) else
                   " (after conversion to the load dtype: a value beyond its range?)")
            )


def save_checkpoint(
    directory: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    config: Mapping,
    *,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``config.json`` and the weights in the official layout.

    With ``max_shard_bytes`` the weights are split into ``model-0000i-of-0000n.safetensors``
    shards plus ``model.safetensors.index.json``, as ``save_pretrained`` does.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    tensors = {}
    for key, value in state.items():
        t = value.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view of a larger tensor (fused projections): safetensors stores whole storages
        tensors[key] = t
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata=meta)
        return directory
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=meta)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return directory


def checkpoint_fingerprint(directory: str | os.PathLike) -> str:
    """A short hash that identifies a checkpoint: its config, and per weight file the name, size,
    safetensors header and the first and last MiB of data.

    Cheap even for a 16 GB checkpoint; used by exports to refuse graphs made from another one.
    """
    import hashlib

    directory = Path(directory)
    h = hashlib.sha256()
    h.update((directory / CONFIG_NAME).read_bytes())
    block = 1 << 20
    for path in sorted(set(weight_files(directory).values())):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, size)))
            h.update(f.read(block))
            if size > 2 * block:
                f.seek(size - block)
                h.update(f.read(block))
    return h.hexdigest()[:16]


def _first(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


# --------------------------------------------------------------------------- language model
def load_lm(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device | None = None,
    *,
    tokenizer: bool | object = True,
    revision: str | None = None,
):
    """Load the MiMo-Audio language model: ``(lm, config, text_tokenizer)``.

    ``name_or_path`` is a checkpoint directory (``config.json``, ``model.safetensors`` or the
    sharded index, ``tokenizer.json``) or a hub id. The special-token ids come from the
    tokenizer; ``tokenizer`` may instead be a ready ``TextTokenizer`` (e.g. a byte tokenizer for a
    test checkpoint without ``tokenizer.json``), or False to use the config's default
    ``empty_token_id`` and return no tokenizer.
    """
    from agent.lm.config import ConfigError, MiMoAudioConfig
    from agent.lm.model import empty_model
    from agent.lm.tokenizer import TextTokenizer, TokenizerError

    directory = resolve_checkpoint_dir(name_or_path, revision=revision)
    torch_dtype, torch_device = check_lm_dtype(parse_dtype(dtype)), parse_device(device)
    raw = read_config(directory, LM_CHECKPOINT)
    check_kind(directory, raw, LM_CHECKPOINT)
    text_tokenizer = None
    try:
        if tokenizer is True:
            text_tokenizer = TextTokenizer.from_dir(directory)
        elif isinstance(tokenizer, TextTokenizer):
            text_tokenizer = tokenizer
        elif tokenizer is not False and tokenizer is not None:
            kind = type(tokenizer).__name__
            raise CheckpointError(f"tokenizer must be True, False or a TextTokenizer, got {kind}")
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc
    overrides = {} if text_tokenizer is None else {"empty_token_id": text_tokenizer.specials.empty}
    try:
        config = MiMoAudioConfig.from_dict(raw, **overrides)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {exc}") from exc
    if text_tokenizer is not None and text_tokenizer.vocab_size > config.vocab_size:
        added = text_tokenizer.added_tokens
        raise CheckpointError(
            f"the tokenizer of {directory} has ids up to {text_tokenizer.vocab_size - 1}, beyond the model's "
            f"vocab_size={config.vocab_size}"
            + (f"; it lacked {', '.join(added)}, which were added (as the official code does) at ids "
               f"{', '.join(map(str, added.values()))}" if added else "")
        )
    lm = empty_model(config, torch_dtype, torch_device)
    load_into_module(lm, load_state_dict(directory, what=LM_CHECKPOINT), source=f"{LM_CHECKPOINT} {directory}")
    return lm, config, text_tokenizer


def save_lm(
    lm: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer: object | None = None,
    max_shard_bytes: int | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write ``lm`` in the official layout (``config.json`` + safetensors, sharded when
    ``max_shard_bytes`` is given) and, when given, the tokenizer's ``tokenizer.json``."""
    config = lm.config  # type: ignore[attr-defined]
    out = save_checkpoint(
        directory,
        lm.state_dict(),
        config.to_dict(),
        max_shard_bytes=max_shard_bytes,
        dtype=None if dtype is None else parse_dtype(dtype),
    )
    if tokenizer is not None:
        tokenizer.save(out)  # type: ignore[attr-defined]
    return out
