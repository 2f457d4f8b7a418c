"""Load and save Hugging Face checkpoint folders (safetensors only).

Loading validates everything before allocating anything: `config.json`, every safetensors header (offsets
inside the file, byte counts matching dtype x shape), the shard index, and the key set and shapes against
the model built on the meta device. Only then are tensors copied, block by block, from a memory map into
freshly allocated parameters of the target dtype and device. Each block's pages are released from the
map after its copy, so host memory peaks near the size of the weights themselves (plus one block), not
twice it. Measured on Qwen2.5-0.5B's shapes (bf16 file, CPU, peak RSS above the baseline): loading as bf16
peaks at 1.17x the weights this way and at 2.16x when each tensor is copied whole with its pages left
mapped; loading as fp32, 1.09x against 1.58x. Nothing is unpickled: `.bin`/`.pt` checkpoints are refused
with a message.

Saving writes `config.json`, `model.safetensors` (or shards + `model.safetensors.index.json`) with
`{"format": "pt"}` metadata and `generation_config.json`, into a temporary folder first; files are then
renamed into place, so an interrupted save never leaves a half-written file under a final name.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from fasttune.errors import CheckpointError, ConfigError, FasttuneError
from fasttune.io import safe_read as safe_io
from fasttune.models.attention import set_attention_backend
from fasttune.models.kernels import apply_kernels
from fasttune.models.model import CausalLM, ModelConfig

log = logging.getLogger("fasttune")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_COPY_BLOCK_BYTES = 64 << 20  # host memory above the weights while loading: one block of this size


def parse_dtype(dtype: str | torch.dtype | None, where: str = "dtype") -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPE_NAMES:
        raise ValueError(f"{where}: unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPE_NAMES[key]


def read_json(path: Path, cap: int = safe_io.JSON_CAP, error: type[FasttuneError] = CheckpointError) -> dict:
    """A JSON object from a regular file of at most `cap` bytes (safe_io states the caps)."""
    data = safe_io.read_json(path, cap, error)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a checkpoint folder (or of a `config.json` path)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists() and not file.is_symlink():
        raise ConfigError(f"{file}: no config.json; a model folder needs a Hugging Face config.json")
    d = read_json(file, safe_io.CONFIG_CAP, ConfigError)
    if "quantization_config" in d:
        raise ConfigError(
            f"{file}: the checkpoint is quantized ({d['quantization_config'].get('quant_method')}); "
            "fasttune loads fp32/fp16/bf16 checkpoints"
        )
    return ModelConfig.from_hf(d, source=str(file))


# ----------------------------------------------------------------------------------------------------------
# Safetensors headers: read and checked by hand so that a bad file is reported before anything is loaded.


def read_safetensors_header(file: Path) -> tuple[dict[str, dict], int]:
    """{name: {"dtype", "shape", "data_offsets"}} and the byte offset where tensor data starts.

    Format: 8 bytes little-endian header length N, N bytes of JSON, then the data; each tensor's
    `data_offsets` [begin, end) is relative to the data start and must hold dtype size x prod(shape) bytes.
    """
    size = safe_io.check_regular(file, CheckpointError)  # a FIFO or device is refused before it is opened
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(raw, "little")
        if n > size - 8 or n > 100 << 20:
            raise CheckpointError(
                f"{file}: truncated or corrupt safetensors file (header of {n} bytes, file of {size} bytes)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (a JSON {type(header).__name__})")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            numel = 1
            for s in info["shape"]:
                numel *= s
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{file}: tensor {name!r} has an unreadable header entry {info!r}"
            ) from None
        if end > data_size:
            raise CheckpointError(
                f"{file}: truncated safetensors file: tensor {name!r} ends at byte "
                f"{data_start + end} but the file has {size} bytes"
            )
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(
                f"{file}: tensor {name!r} has {end - begin} bytes of data, "
                f"expected {numel * dtype.itemsize} for {info['dtype']} {info['shape']}"
            )
    return header, data_start


def _weight_files(folder: Path) -> dict[str, Path]:
    """name -> file that holds it, from the index (sharded) or the single file."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
        if missing:
            raise CheckpointError(f"{index}: shard file(s) not found: {', '.join(missing)}")
        return {name: folder / f for name, f in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.exists():
        return {name: single for name in read_safetensors_header(single)[0]}
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = (
        f" (found {', '.join(pickled)}: pickle-based weights are never loaded; convert them to safetensors)"
        if pickled
        else ""
    )
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


# ----------------------------------------------------------------------------------------------------------
# Loading


def expected_tensors(model: CausalLM) -> dict[str, torch.Size]:
    """The checkpoint keys the model needs, with their shapes; a tied head is not a separate key."""
    shapes = {name: t.shape for name, t in model.state_dict(keep_vars=True).items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


@dataclass
class CheckpointPlan:
    """A validated checkpoint: its config, the model on the meta device, and where each tensor lives."""

    folder: Path
    config: ModelConfig
    meta_model: CausalLM
    headers: dict[Path, tuple[dict[str, dict], int]]
    location: dict[str, Path]  # expected key -> file

    @property
    def num_parameters(self) -> int:
        return self.meta_model.num_parameters()

    @property
    def stored_dtypes(self) -> list[str]:
        return sorted({self.headers[f][0][n]["dtype"] for n, f in self.location.items()})


def check_checkpoint(path: str | os.PathLike) -> CheckpointPlan:
    """Validate a checkpoint folder without loading a weight: config.json, every safetensors header, the
    shard index, and the key set and shapes against the model the config describes. Raises ConfigError
    or CheckpointError listing every problem found."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a model folder holds config.json and *.safetensors)")
    cfg = read_config(folder)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = expected_tensors(model)

    where = _weight_files(folder)
    headers = {f: read_safetensors_header(f) for f in sorted(set(where.values()))}
    listed_not_stored = sorted(n for n, f in where.items() if n not in headers[f][0])
    if listed_not_stored:
        raise CheckpointError(
            f"{folder / INDEX_FILE}: keys listed but absent from their shard: {_names(listed_not_stored)}"
        )
    found = {name: (f, info) for f, (header, _) in headers.items() for name, info in header.items()}
    problems = []
    missing = sorted(set(expected) - set(found))
    # A tied checkpoint may still store lm_head.weight (some exports do): it is the embedding, so skip it.
    tied_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(set(found) - set(expected) - tied_extra)
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    for name in sorted(set(expected) & set(found)):
        f, info = found[name]
        if tuple(info["shape"]) != tuple(expected[name]):
            problems.append(
                f"wrong shape for {name} in {f.name}: {tuple(info['shape'])}, the config "
                f"implies {tuple(expected[name])}"
            )
        elif not _ST_DTYPES[info["dtype"]].is_floating_point:
            problems.append(f"{name} in {f.name} is {info['dtype']}: fasttune loads fp32/fp16/bf16 weights")
    if problems:
        raise CheckpointError(
            f"{folder}: checkpoint does not match config.json ({cfg.model_type}): " + "; ".join(problems)
        )
    return CheckpointPlan(folder, cfg, model, headers, {name: found[name][0] for name in expected})


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    kernels: str = "auto",
    attention: str = "auto",
) -> CausalLM:
    """Load a Hugging Face checkpoint folder into a `CausalLM` on `device`.

    dtype: the parameters' dtype; None takes the config's `dtype`/`torch_dtype`, else float32.
    kernels: "triton" (fused Triton ops), "torch" (PyTorch references) or "auto" (Triton on CUDA, the
    references elsewhere); the choice is logged. Asking for "triton" where it cannot run is an error.
    attention: "auto", "sdpa" or "flash" (models/attention.py), set on the model and logged.
    The model comes back in eval mode, as transformers returns it. Raises ConfigError or CheckpointError
    naming the file and keys at fault, before any weight is read; never returns a partly loaded model.
    """
    plan = check_checkpoint(path)
    folder, cfg, model = plan.folder, plan.config, plan.meta_model
    dtype = parse_dtype(dtype) or parse_dtype(
        cfg.hf.get("dtype") or cfg.hf.get("torch_dtype") or "float32", f"{folder / 'config.json'}: dtype"
    )
    device = torch.device(device)

    for name, out in read_tensors(plan, lambda name, shape: torch.empty(shape, dtype=dtype, device=device)):
        _set_parameter(model, name, out)
    model.tie_weights()
    model.model.inv_freq = model.model.inv_freq.to(device)
    model.info.source_path = str(folder)
    model.info.generation_config = _read_generation_config(folder)
    apply_kernels(model, kernels, device)
    set_attention_backend(model, attention, device, dtype)
    model.eval()  # as transformers' from_pretrained: dropout (LoRA's) is off until a loop calls train()
    log.info(
        "loaded %s (%s, %.1fM parameters) as %s on %s",
        folder,
        cfg.model_type,
        model.num_parameters() / 1e6,
        str(dtype).replace("torch.", ""),
        device,
    )
    return model


def read_tensors(plan: CheckpointPlan, out_for):
    """Each tensor of a checked checkpoint, file by file through a memory map: `out_for(name, shape)`
    gives the tensor to fill (its dtype and device are the result's; the stored dtype is converted), which
    is yielded with its name before the next one is read. Callers decide where each tensor lives: a new
    parameter (load_model) or a reused staging buffer that is quantised at once (qlora)."""
    by_file: dict[Path, list[str]] = {}
    for name, f in plan.location.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        header, data_start = plan.headers[f]
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
            for name in names:
                info = header[name]
                out = out_for(name, tuple(info["shape"]))
                _copy_from_map(mm, data_start + info["data_offsets"][0], _ST_DTYPES[info["dtype"]], out)
                yield name, out


def _names(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" (+{len(names) - most} more)" if len(names) > most else "")


def _copy_from_map(mm: mmap.mmap, offset: int, src_dtype: torch.dtype, out: torch.Tensor) -> None:
    """Copy (and cast) a tensor's bytes from the map into `out`, one block at a time, then drop each
    block's pages from this process (MADV_DONTNEED on a private, unwritten map: the file is untouched)."""
    flat = out.view(-1)
    step = max(1, _COPY_BLOCK_BYTES // src_dtype.itemsize)
    page = mmap.PAGESIZE
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        start = offset + i * src_dtype.itemsize
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns on mmap buffers it cannot resize: harmless
            src = torch.frombuffer(mm, dtype=src_dtype, count=n, offset=start)
        flat[i : i + n].copy_(src)
        del src
        if hasattr(mm, "madvise"):
            lo = start // page * page
            mm.madvise(mmap.MADV_DONTNEED, lo, start + n * src_dtype.itemsize - lo)


def _set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)


def _read_generation_config(folder: Path) -> dict | None:
    f = folder / "generation_config.json"
    return read_json(f, safe_io.CONFIG_CAP) if f.exists() else None


# ----------------------------------------------------------------------------------------------------------
# Saving


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size: cannot read size {size!r} (use bytes or e.g. '5GB')")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def save_model(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Save `model` as a Hugging Face folder that transformers loads.

    tokenizer: a fasttune Tokenizer; when given, its files are saved too and `generation_config.json`
    stops on the chat template's end tokens. Otherwise the generation config the model was loaded with
    is kept, or one is derived from config.json. dtype: cast on save (default: as the parameters are).
    """
    folder = Path(path)
    dtype = parse_dtype(dtype)
    limit = parse_size(max_shard_size)
    state = {n: t.detach() for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, t in state.items():
        nbytes = t.numel() * (dtype or t.dtype).itemsize
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for fname, shard in zip(names, shards, strict=True):
            cpu = {n: t.to(device="cpu", dtype=dtype or t.dtype).contiguous() for n, t in shard.items()}
            save_file(cpu, str(tmp / fname), metadata={"format": "pt"})
            del cpu
        if len(shards) > 1:
            weight_map = {n: fname for fname, shard in zip(names, shards, strict=True) for n in shard}
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            _write_json(tmp / INDEX_FILE, index)
        save_dtype = dtype or next(iter(state.values())).dtype
        _write_json(tmp / "config.json", _hf_config(model.config, save_dtype))
        _write_json(tmp / "generation_config.json", _generation_config(model, tokenizer))
        if tokenizer is not None:
            tokenizer.save(tmp)
        _move_into(tmp, folder, keep=set(names) | ({INDEX_FILE} if len(shards) > 1 else set()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved %s (%d file(s), %.2f GB)", folder, len(names), sum(sizes) / 1e9)
    return folder


def _hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    d = dict(cfg.hf)
    d.pop("torch_dtype", None)
    d["dtype"] = str(dtype).replace("torch.", "")
    d["tie_word_embeddings"] = cfg.tie_word_embeddings
    return d


def _generation_config(model: CausalLM, tokenizer) -> dict:
    gen = dict(model.info.generation_config)
    if tokenizer is not None:
        stops = tokenizer.stop_token_ids
        gen["eos_token_id"] = stops if len(stops) > 1 else stops[0]
        if tokenizer.pad_token_id is not None:
            gen["pad_token_id"] = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            gen["bos_token_id"] = tokenizer.bos_token_id
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in gen and model.config.hf.get(key) is not None:
            gen[key] = model.config.hf[key]
    return gen


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _move_into(tmp: Path, folder: Path, keep: set[str]) -> None:
    """Move finished files into `folder`: a new folder is one atomic rename; an existing one gets each
    file by an atomic rename, then loses the weight files of an earlier save that the new one does not
    use (a sharded save over a single-file one, say). Other files in it (a README, say) stay."""
    if not folder.exists():
        os.replace(tmp, folder)
        tmp.mkdir()  # the caller removes it
        return
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder")
    for f in sorted(tmp.iterdir()):
        os.replace(f, folder / f.name)
    for old in folder.iterdir():
        stale = old.name == INDEX_FILE or re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old.name)
        if stale and old.name not in keep:
            old.unlink()


def load_sharded(model: CausalLM, path: str | os.PathLike) -> None:
    """Fill a model whose parameters are FSDP shards (DTensors) from a Hugging Face folder: every rank
    reads only the slices it holds, through torch.distributed.checkpoint's safetensors reader, converting
    the stored dtype to the parameter's. Names are HF names; LoRA adapters (not in the folder) are left
    for the caller. The folder is validated first, as `load_model` does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    plan = check_checkpoint(path)
    # LoRA wraps a linear: its frozen weight is `<name>.base_layer.weight`, the folder has `<name>.weight`
    state = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if "lora_" not in n}
    missing = sorted(set(state) - set(plan.location))
    if missing:
        raise CheckpointError(f"{plan.folder}: no tensor for {_names(missing)}")
    with torch.no_grad():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(plan.folder)))
    model.info.source_path = str(plan.folder)
    model.info.generation_config = _read_generation_config(plan.folder)
    log.info("loaded %s shard by shard (%.1fM parameters)", plan.folder, plan.num_parameters / 1e6)
