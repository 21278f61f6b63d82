"""Turning prompts into validated, right-padded token batches.

Every stage reads positions as "position 0 is the first token". That only holds if padding is
on the right and the mask says which positions are real, so all inputs are normalised here:

* strings are tokenised one by one (no silent truncation; too-long prompts raise);
* token tensors with an ``attention_mask`` may be left- or right-padded; left-padded rows are
  shifted so that every row starts at position 0;
* token tensors *without* a mask that look padded (a run of pad tokens at either end of some
  row) raise, because the padded positions would otherwise be counted as text;
* position 0 must be the model's BOS ([CLS] for BERT) unless ``require_bos=False``.

**Defaults follow the checkpoint's tokenizer** (:func:`first_token_policy`). If it adds a BOS
([CLS]) when it encodes text, strings get one and position 0 must hold it. If it adds none
(Pythia's and Qwen's do not), strings are tokenised as it would and position 0 is analysed as it
is: the causal mask makes the first token, whatever it is, the position every query can see,
so that is where the sink forms. ``meta["first_token"]`` records what was done and why; an
explicit ``prepend_bos=`` or ``require_bos=`` always wins. TransformerLens' own default,
``cfg.default_prepend_bos``, is a per-family guess (``False`` for GPT-NeoX, Qwen, Phi, BLOOM
whatever the checkpoint's tokenizer does), and its bridge tokenizer cannot be asked either (it is
re-loaded with ``add_bos_token=True``), so the answer comes from the checkpoint's tokenizer as
re-read by :func:`tl_sinks._compat.inspect_model`.
"""

from __future__ import annotations

import functools
import hashlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tl_sinks._compat import ModelInfo
from tl_sinks._types import ModelLike

Prompts = str | Sequence[str] | Tensor | Sequence[Sequence[int]] | Sequence[Tensor]


@dataclass(frozen=True)
class PreparedPrompts:
    """Validated prompts as a list of 1-D token tensors (no padding).

    Attributes:
        sequences: One 1-D ``int64`` tensor per prompt.
        pos0_is_bos: Per prompt, whether position 0 holds the model's first-token id.
        first_token_id: The BOS/[CLS] id checked against, or ``None`` if unknown.
        prepend_bos: The ``prepend_bos`` used when tokenising strings (``None`` for tokens).
        first_token: What was done about position 0 and why (``meta["first_token"]``).
    """

    sequences: list[Tensor]
    pos0_is_bos: list[bool]
    first_token_id: int | None
    prepend_bos: bool | None
    first_token: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def max_len(self) -> int:
        return max(len(s) for s in self.sequences)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the prepared token ids, prompt by prompt (``meta["corpus_sha256"]``): two
        results with the same fingerprint were computed on the same tokens, in the same order."""
        h = hashlib.sha256()
        for s in self.sequences:
            h.update(len(s).to_bytes(8, "little"))
            h.update(s.to(torch.int64).numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def meta(self) -> dict[str, Any]:
        n_bos = sum(self.pos0_is_bos)
        return {
            "n_prompts": len(self),
            "n_tokens": self.n_tokens,
            "corpus_sha256": self.fingerprint,
            "max_len": self.max_len,
            "prepend_bos": self.prepend_bos,
            "first_token_id": self.first_token_id,
            "pos0_is_bos": n_bos == len(self),
            "pos0_is_bos_fraction": n_bos / len(self),
            "first_token": dict(self.first_token),
        }


@dataclass(frozen=True)
class TokenBatch:
    """A right-padded batch.

    Attributes:
        tokens: ``[batch, pos]`` token ids; padded positions hold ``pad_id`` and are masked.
        attention_mask: ``[batch, pos]`` 1 for real tokens, 0 for padding.
        lengths: ``[batch]`` number of real tokens per row.
        prompt_index: ``[batch]`` index of each row in the prepared prompts.
    """

    tokens: Tensor
    attention_mask: Tensor
    lengths: Tensor
    prompt_index: Tensor

    # Cached: every stage's hooks read these once per batch (``is_padded`` syncs the host).
    @functools.cached_property
    def valid(self) -> Tensor:
        """``[batch, pos]`` bool mask of real tokens."""
        return self.attention_mask.bool()

    @functools.cached_property
    def is_padded(self) -> bool:
        """Whether any row is shorter than the batch (one host sync, cached)."""
        return bool((self.lengths < self.tokens.shape[1]).any())

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(
            tokens=self.tokens.to(device),
            attention_mask=self.attention_mask.to(device),
            lengths=self.lengths.to(device),
            prompt_index=self.prompt_index.to(device),
        )


_DECODED: "weakref.WeakKeyDictionary[Any, tuple[int, dict[int, str]]]" = weakref.WeakKeyDictionary()


def token_strings(model: ModelLike, ids: Sequence[int]) -> list[str]:
    """``tokenizer.decode([id])`` of each id (``str(id)`` without a tokenizer).

    Remembered per tokenizer (and forgotten when its vocabulary grows): the stages name every
    token they saw, which for a few thousand distinct ids costs as much as a small forward pass.
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [str(int(i)) for i in ids]
    size = len(tok)
    try:
        cached = _DECODED.get(tok)
        if cached is None or cached[0] != size:
            cached = _DECODED[tok] = (size, {})
        memo = cached[1]
    except TypeError:  # not weak-referenceable
        memo = {}
    out = []
    for i in ids:
        i = int(i)
        s = memo.get(i)
        if s is None:
            s = memo[i] = tok.decode([i])
        out.append(s)
    return out


def _check_id_dtype(t: Tensor, what: str) -> None:
    """Token ids must be integers: floats would be truncated and bools read as ids 0/1."""
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"{what} holds {t.dtype} values; token ids must be integers (pass a torch.long tensor)")


def _id_sequence(p: Any, i: int) -> Tensor:
    """Prompt ``i`` of a list of token-id sequences, as a 1-D ``int64`` tensor (checked, not coerced)."""
    if isinstance(p, str):
        raise TypeError("mix of strings and token sequences; pass one kind")
    if isinstance(p, (bool, int, float)) or (isinstance(p, Tensor) and p.ndim == 0):
        raise ValueError(
            f"prompts: prompt {i} is a single number ({p!r}), not a sequence of token ids; "
            "for one prompt pass [[id, id, ...]]"
        )
    try:
        t = torch.as_tensor(p)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"prompts: prompt {i} is not a sequence of integer token ids ({e})") from None
    if t.numel() == 0:  # before the dtype check: an empty list becomes a float tensor
        raise ValueError(f"prompt {i} has no tokens")
    _check_id_dtype(t, f"prompts: prompt {i}")
    if t.ndim != 1:
        raise ValueError(f"prompts: prompt {i} has shape {tuple(t.shape)}; each prompt must be a flat sequence of token ids")
    return t.long().cpu()


def _tokenize_strings(model: ModelLike, prompts: Sequence[str], prepend_bos: bool | None) -> list[Tensor]:
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer, so text prompts cannot be used; pass token ids instead.")
    out = []
    for i, s in enumerate(prompts):
        if not isinstance(s, str):
            raise TypeError(f"prompt {i} is {type(s).__name__}, expected str")
        if s == "":
            raise ValueError(f"prompt {i} is empty; remove it or give it some text.")
        ids = model.to_tokens(s, prepend_bos=prepend_bos, move_to_device=False, truncate=False)[0]
        out.append(ids.long().cpu())
    return out


def _rows_from_mask(tokens: Tensor, attention_mask: Tensor) -> list[Tensor]:
    if attention_mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but tokens have {tuple(tokens.shape)}"
        )
    am = attention_mask.cpu()
    if not bool(((am == 0) | (am == 1)).all()):
        raise ValueError("attention_mask must contain only 0 and 1")
    rows = []
    for i in range(tokens.shape[0]):
        idx = torch.nonzero(am[i]).flatten()
        if idx.numel() == 0:
            raise ValueError(f"row {i} of attention_mask is all zeros (an empty prompt)")
        if int(idx[-1] - idx[0]) + 1 != idx.numel():
            raise ValueError(
                f"row {i} of attention_mask has holes; only left- or right-padding is supported"
            )
        rows.append(tokens[i, idx].long().cpu())
    return rows


def _check_unmasked_padding(tokens: Tensor, info: ModelInfo) -> None:
    """Raise if a mask-less token tensor looks padded."""
    pad = info.pad_token_id
    if pad is None or tokens.shape[1] < 2:
        return
    t = tokens.cpu()
    is_pad = t == pad
    for i in range(t.shape[0]):
        row = is_pad[i]
        trailing = int(torch.flip(row, [0]).int().cumprod(0).sum())
        leading = int(row.int().cumprod(0).sum())
        # A BOS that doubles as the pad token is legitimate once, at position 0.
        if pad == info.first_token_id:
            leading = max(0, leading - 1)
        if (0 < trailing < t.shape[1]) or leading > 0:
            side = "ends" if trailing else "starts"
            n = trailing or leading
            raise ValueError(
                f"tokens look padded: row {i} {side} with {n} pad token(s) (id {pad}), and no "
                "attention_mask was given, so padded positions would be counted as text. Pass "
                "attention_mask (1 = real token); if these really are text tokens, pass "
                "attention_mask=torch.ones_like(tokens)."
            )


def first_token_policy(
    info: ModelInfo, prepend_bos: bool | None = None, require_bos: bool | None = None
) -> tuple[bool | None, bool, dict[str, Any]]:
    """Resolve ``prepend_bos`` / ``require_bos`` (``None``: follow the checkpoint's tokenizer).

    Returns:
        ``(prepend_bos, require_bos, record)``: the values to use and the ``meta["first_token"]``
        record (``prepend_bos``, ``require_bos``, ``bos_token_id``, ``source``, ``tokenizer_check``).
        ``source`` is ``"tokenizer adds BOS"``, ``"tokenizer adds no BOS: position 0 analysed as
        it is"``, ``"no tokenizer: ..."`` or ``"user"`` (an explicit argument was given).
    """
    adds = info.tokenizer_adds_bos
    if adds is None:  # no tokenizer: as before, position 0 must be the config's BOS
        prep, req = prepend_bos, True if require_bos is None else require_bos
        source = "no tokenizer: position 0 must be cfg.bos_token_id"
        bos = info.first_token_id
    else:
        prep = adds if prepend_bos is None else prepend_bos
        req = adds if require_bos is None else require_bos
        source = "tokenizer adds BOS" if adds else "tokenizer adds no BOS: position 0 analysed as it is"
        bos = info.tokenizer_bos_token_id
    if prepend_bos is not None or require_bos is not None:
        source = "user"
    record = {"prepend_bos": prep, "require_bos": req, "bos_token_id": bos, "source": source,
              "tokenizer_check": info.tokenizer_check}
    return prep, req, record


def prepare_prompts(
    model: ModelLike,
    info: ModelInfo,
    prompts: Any,  # a Prompts; checked here, so a runtime type checker cannot pre-empt the messages
    *,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    require_bos: bool | None = None,
) -> PreparedPrompts:
    """Validate and tokenise prompts.

    Args:
        model: The model (its tokenizer is used for strings).
        info: :func:`tl_sinks._compat.inspect_model` of ``model``.
        prompts: A string, a list of strings, a ``[batch, pos]`` token tensor, or a list of
            token-id sequences (ragged lengths allowed).
        attention_mask: For a token tensor: 1 for real tokens, 0 for padding (left or right).
        prepend_bos: Whether strings get a BOS (``None``: if the checkpoint's tokenizer adds
            one; see :func:`first_token_policy`).
        require_bos: Raise unless position 0 of every prompt is the model's BOS ([CLS])
            (``None``: if the checkpoint's tokenizer adds one).

    Returns:
        :class:`PreparedPrompts`.

    Raises:
        ValueError: Empty prompts, bad masks, unmasked padding, missing BOS, double BOS, or a
            prompt longer than the model's context ``n_ctx``.
    """
    prepend_bos, require_bos, record = first_token_policy(info, prepend_bos, require_bos)
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor):
        if prompts.ndim == 1:
            prompts = prompts.unsqueeze(0)
        if prompts.ndim != 2:
            raise ValueError(f"token tensor must be [batch, pos], got shape {tuple(prompts.shape)}")
        if prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise ValueError(f"token tensor is empty (shape {tuple(prompts.shape)})")
        _check_id_dtype(prompts, "prompts: the token tensor")
        if attention_mask is None:
            _check_unmasked_padding(prompts, info)
            seqs = [row.long().cpu() for row in prompts]
        else:
            seqs = _rows_from_mask(prompts, attention_mask)
        used_prepend: bool | None = None
    else:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if attention_mask is not None:
            raise ValueError("attention_mask only applies to a token tensor")
        if all(isinstance(p, str) for p in prompts):
            seqs = _tokenize_strings(model, prompts, prepend_bos)
            used_prepend = prepend_bos
        else:
            seqs = [_id_sequence(p, i) for i, p in enumerate(prompts)]
            used_prepend = None
    for i, s in enumerate(seqs):
        if len(s) > info.n_ctx:
            raise ValueError(
                f"prompt {i} has {len(s)} tokens, longer than the model's context n_ctx={info.n_ctx}; "
                "shorten it (tl_sinks never truncates silently)."
            )
        if bool(((s < 0) | (s >= info.d_vocab)).any()):
            raise ValueError(f"prompt {i} has token ids outside [0, {info.d_vocab})")
    first = info.first_token_id
    pos0 = [first is not None and int(s[0]) == first for s in seqs]
    if require_bos:
        if first is None:
            raise ValueError(
                "the model's tokenizer defines no BOS token, so position 0 cannot be checked; "
                "pass require_bos=False to analyse position 0 whatever it holds."
            )
        bad = [i for i, ok in enumerate(pos0) if not ok]
        if bad:
            raise ValueError(
                f"{len(bad)} prompt(s) (first: {bad[0]}) do not start with BOS (id {first}); the "
                "sink metrics treat position 0 as the BOS sink. Tokenise with prepend_bos=True, "
                "or pass require_bos=False to analyse whatever token comes first."
            )
        doubled = [i for i, s in enumerate(seqs) if len(s) > 1 and int(s[1]) == first]
        if doubled:
            raise ValueError(
                f"prompt {doubled[0]} starts with two BOS tokens (id {first}); the text already "
                "holds BOS and another was prepended. Pass prepend_bos=False."
            )
    record["prepend_bos"] = used_prepend  # None: token ids were given, nothing was prepended
    return PreparedPrompts(
        sequences=seqs, pos0_is_bos=pos0, first_token_id=first, prepend_bos=used_prepend, first_token=record
    )


def iter_batches(
    prepared: PreparedPrompts, batch_size: int, *, pad_id: int = 0
) -> Iterator[TokenBatch]:
    """Right-padded batches of ``batch_size`` prompts, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seqs = prepared.sequences
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        n = max(len(s) for s in chunk)
        tokens = torch.full((len(chunk), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, s in enumerate(chunk):
            tokens[i, : len(s)] = s
            mask[i, : len(s)] = 1
        yield TokenBatch(
            tokens=tokens,
            attention_mask=mask,
            lengths=torch.tensor([len(s) for s in chunk]),
            prompt_index=torch.arange(start, start + len(chunk)),
        )
