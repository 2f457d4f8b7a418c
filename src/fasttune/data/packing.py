"""Tokenized examples as flat arrays, packed into fixed token budgets, sampled resumably.

Storage: a tokenized split is four arrays (token ids uint32, a trained-token mask uint8, per-example
offsets int64, the example's line index) saved as `.npy` and opened memory-mapped, so a corpus of millions
of examples trains with flat host memory. `meta.json` beside them records the tokenizer's fingerprint.

Packing: best-fit-decreasing. Examples are sorted longest first (ties in a seeded random order) and each
goes into the open bin with the least room that still fits it, or a new bin. For the reference corpus
(~58-token examples into 16k-token bins) that fills bins to within a few tokens.

A batch is one row: input_ids [1, T], position_ids restarting at 0 for each sequence, cu_seqlens, and
targets already shifted (targets[t] = ids[t+1] where token t+1 is trained, else -100), so the last token
of every sequence predicts nothing and no target crosses a boundary. With `pad_to` the row is padded to a
fixed length (static shapes for torch.compile and CUDA graphs); the padding is a sequence of its own that
nothing attends to and that has no targets.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fasttune.choices import TOO_LONG
from fasttune.data.records import DataError, Example, Problem, report
from fasttune.models.tokenizer import Tokenizer


@dataclass
class TokenizeOptions:
    max_seq_len: int = 2048
    too_long: str = "drop"  # drop | truncate | error
    system_prompt: str = "default"  # "default" (the template's), "none", or the text of a system prompt
    train_on_input: bool = False  # train on every token, the prompt's included

    def __post_init__(self):
        if self.too_long not in TOO_LONG:
            raise DataError(f"too_long must be one of {', '.join(TOO_LONG)}, got {self.too_long!r}")
        if self.max_seq_len < 2:
            raise DataError(f"max_seq_len must be at least 2, got {self.max_seq_len}")


def with_system_prompt(messages: list[dict], system_prompt: str, tokenizer: Tokenizer) -> list[dict]:
    """Apply the system-prompt option to one conversation. An example's own system message always stays.

    "none" must defeat templates that insert a default prompt when there is none (Qwen2.5's): for those an
    empty system message is the shortest rendering without the default text."""
    if messages[0]["role"] == "system" or system_prompt == "default":
        return messages
    if system_prompt == "none":
        return ([{"role": "system", "content": ""}] + messages) if _injects_default(tokenizer) else messages
    return [{"role": "system", "content": system_prompt}] + messages


def _injects_default(tokenizer: Tokenizer) -> bool:
    probe = [{"role": "user", "content": "probe"}]
    if not hasattr(tokenizer, "_injects_default"):
        tokenizer._injects_default = tokenizer.render(probe) != tokenizer.render(
            [{"role": "system", "content": ""}] + probe
        )
    return tokenizer._injects_default


class TokenizedData:
    """Token ids, trained-token mask and offsets of N examples; `index[i]` is the example's position in the
    list it was tokenized from (its line in the split file); `weight[i]` its sampling weight (None: all 1)."""

    def __init__(self, ids, mask, offsets, index, meta: dict | None = None, weight=None):
        self.ids, self.mask, self.offsets, self.index = ids, mask, offsets, index
        self.meta = meta or {}
        self.weight = weight

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.ids[s:e], self.mask[s:e]

    def save(self, folder: str | os.PathLike) -> None:
        """Write through a temporary folder and a rename: an interrupted save leaves the old data whole."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            for name in ("ids", "mask", "offsets", "index", "weight"):
                if getattr(self, name) is not None:
                    np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2) + "\n")
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old)
            else:
                os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, folder: str | os.PathLike, mmap: bool = True) -> TokenizedData:
        folder = Path(folder)
        try:
            arrays = [
                np.load(folder / f"{n}.npy", mmap_mode="r" if mmap else None)
                for n in ("ids", "mask", "offsets", "index")
            ]
            meta = json.loads((folder / "meta.json").read_text())
        except FileNotFoundError as e:
            raise DataError(
                f"{folder}: not a tokenized dataset ({Path(e.filename).name} is missing)"
            ) from None
        weight = np.load(folder / "weight.npy") if (folder / "weight.npy").exists() else None
        data = cls(*arrays, meta=meta, weight=weight)
        if data.offsets[0] != 0 or data.offsets[-1] != len(data.ids) or len(data.mask) != len(data.ids):
            raise DataError(f"{folder}: tokenized dataset is inconsistent (offsets do not match the arrays)")
        return data


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(tokenizer.tk.to_str().encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()[:16]


def tokenize(
    examples: list[Example], tokenizer: Tokenizer, opts: TokenizeOptions, chunk: int = 8192
) -> tuple[TokenizedData, list[Problem]]:
    """Tokenize with the chat template, mask the prompt, apply the length policy.

    Returns the data and the problems: examples longer than max_seq_len (dropped, or all of them raised
    at once with too_long="error"), and examples with no trained token left after truncation."""
    ids, masks, offsets, index, weights, problems = [], [], [0], [], [], []
    for start in range(0, len(examples), chunk):
        batch = examples[start : start + chunk]
        convs = [with_system_prompt(e.messages, opts.system_prompt, tokenizer) for e in batch]
        for j, (e, enc) in enumerate(zip(batch, tokenizer.encode_chats(convs), strict=True)):
            tok = np.asarray(enc.ids, dtype=np.uint32)
            mask = (
                np.ones(len(tok), dtype=np.uint8) if opts.train_on_input else np.asarray(enc.mask, np.uint8)
            )
            if len(tok) > opts.max_seq_len:
                if opts.too_long != "truncate":
                    problems.append(
                        Problem(
                            e.file,
                            e.line,
                            f"{len(tok)} tokens, longer than max_seq_len="
                            f"{opts.max_seq_len} ({opts.too_long})",
                            e.raw,
                        )
                    )
                    continue
                tok, mask = tok[: opts.max_seq_len], mask[: opts.max_seq_len]
            # Token 0 is never a target (nothing precedes it), so it cannot count as trained.
            if not mask[1:].any():
                problems.append(
                    Problem(
                        e.file,
                        e.line,
                        f"no trainable token (after truncation to {opts.max_seq_len} tokens)",
                        e.raw,
                    )
                )
                continue
            ids.append(tok)
            masks.append(mask)
            offsets.append(offsets[-1] + len(tok))
            index.append(start + j)
            weights.append(e.weight)
    if opts.too_long == "error" and any("longer than max_seq_len" in p.reason for p in problems):
        raise DataError(report(problems, len({e.file for e in examples})), problems)
    meta = {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "options": asdict(opts),
        "num_examples": len(index),
        "num_tokens": int(offsets[-1]),
    }
    data = TokenizedData(
        np.concatenate(ids) if ids else np.zeros(0, np.uint32),
        np.concatenate(masks) if masks else np.zeros(0, np.uint8),
        np.asarray(offsets, dtype=np.int64),
        np.asarray(index, dtype=np.int64),
        meta,
        weight=np.asarray(weights, dtype=np.float32) if any(w != 1 for w in weights) else None,
    )
    # count_targets over every example, vectorised: the mask's sum less each sequence's first token
    data.meta["num_targets"] = (
        int(data.mask.sum()) - int(data.mask[data.offsets[:-1]].sum()) if len(data) else 0
    )
    return data, problems


# ----------------------------------------------------------------------------------------------------------
# Packing


def pack_bfd(lengths: np.ndarray, budget: int, seed: int = 0) -> list[list[int]]:
    """Best-fit-decreasing bins of example indices, each bin's lengths summing to at most `budget`."""
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > budget:
        i = int(lengths.argmax())
        raise DataError(f"example {i} has {int(lengths[i])} tokens, more than the packing budget of {budget}")
    order = np.random.default_rng(seed).permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]  # longest first, ties in seeded order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted: bisect finds the tightest fit
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = budget, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def packing_efficiency(lengths: np.ndarray, bins: list[list[int]], budget: int) -> float:
    """Real tokens over the tokens the bins occupy (each bin is a full budget)."""
    return float(np.sum(lengths)) / (len(bins) * budget) if bins else 0.0


def padded_efficiency(lengths: np.ndarray, batch_size: int = 32, seed: int = 0) -> float:
    """The comparison point: shuffled batches of `batch_size` padded to their longest example, as TRL's
    default collation does. Real tokens over the tokens computed."""
    lengths = np.asarray(lengths)[np.random.default_rng(seed).permutation(len(lengths))]
    padded = sum(
        int(lengths[i : i + batch_size].max()) * len(lengths[i : i + batch_size])
        for i in range(0, len(lengths), batch_size)
    )
    return float(lengths.sum()) / padded if padded else 0.0


class PackedSampler:
    """Bins of examples, packed afresh each epoch with a seed of (seed, epoch) and visited in a seeded
    order. `state_dict()` is the position (epoch and bins done); restoring it continues exactly there."""

    def __init__(self, lengths: np.ndarray, budget: int, seed: int = 0, weights: np.ndarray | None = None):
        self.lengths, self.budget, self.seed = np.asarray(lengths), budget, seed
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.epoch, self.position = 0, 0
        self._bins: list[list[int]] | None = None

    def _epoch_examples(self) -> np.ndarray:
        """Example indices of this epoch: a weight w repeats an example floor(w) times, plus once more
        with probability frac(w), drawn from the epoch's seed."""
        idx = np.arange(len(self.lengths))
        if self.weights is None:
            return idx
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        reps = np.floor(self.weights).astype(np.int64) + (rng.random(len(idx)) < self.weights % 1)
        return np.repeat(idx, reps)

    def bins(self) -> list[list[int]]:
        if self._bins is None:
            examples = self._epoch_examples()
            packed = pack_bfd(self.lengths[examples], self.budget, seed=self.seed * 1_000_003 + self.epoch)
            random.Random(f"{self.seed}:{self.epoch}").shuffle(packed)
            self._bins = [[int(examples[j]) for j in b] for b in packed]
        return self._bins

    def __len__(self) -> int:
        return len(self.bins())

    def __iter__(self):
        """The remaining bins of the current epoch; then the sampler moves to the next epoch."""
        while self.position < len(self.bins()):
            b = self.bins()[self.position]
            self.position += 1
            yield b
        self.epoch, self.position, self._bins = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position, self._bins = int(state["epoch"]), int(state["position"]), None


@dataclass
class Batch:
    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64, restarting at 0 per sequence
    targets: torch.Tensor  # [1, T] int64, shifted, -100 where nothing is trained
    cu_seqlens: torch.Tensor  # [n + 1] int32
    max_seqlen: int
    num_targets: int  # targets != -100, counted on the host: the loop normalises by it with no sync
    num_sequences: int  # real sequences (padding excluded)
    num_tokens: int  # real tokens (padding excluded)

    def to(self, device) -> Batch:
        move = {k: v.to(device, non_blocking=True) for k, v in vars(self).items() if torch.is_tensor(v)}
        return Batch(**{**vars(self), **move})


def count_targets(data: TokenizedData, indices: list[int]) -> int:
    """The trained tokens of the examples `indices`: a sequence's mask from its second token on (the first
    token is never a target), which is what `collate`'s `targets != -100` counts, without building it."""
    return sum(int(data.sequence(i)[1][1:].sum()) for i in indices)


def collate(data: TokenizedData, indices: list[int], pad_to: int | None = None, pad_id: int = 0) -> Batch:
    """Pack the examples `indices` into one row (padded to `pad_to` tokens when given)."""
    ids, targets, pos, lens = [], [], [], []
    for i in indices:
        tok, mask = data.sequence(i)
        tok = tok.astype(np.int64)
        tgt = np.where(mask[1:].astype(bool), tok[1:], -100)
        ids.append(tok)
        targets.append(np.append(tgt, -100))
        pos.append(np.arange(len(tok)))
        lens.append(len(tok))
    real = sum(lens)
    if pad_to is not None:
        if real > pad_to:
            raise DataError(f"{real} tokens do not fit in a row of {pad_to}")
        if pad_to > real:
            n = pad_to - real
            ids.append(np.full(n, pad_id, dtype=np.int64))
            targets.append(np.full(n, -100, dtype=np.int64))
            pos.append(np.arange(n))
            lens.append(n)
    cu = np.zeros(len(lens) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lens)
    t = np.concatenate(targets)
    return Batch(
        input_ids=torch.from_numpy(np.concatenate(ids)).unsqueeze(0),
        position_ids=torch.from_numpy(np.concatenate(pos)).unsqueeze(0),
        targets=torch.from_numpy(t).unsqueeze(0),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(max(lens)),
        num_targets=int((t != -100).sum()),
        num_sequences=len(indices),
        num_tokens=real,
    )
