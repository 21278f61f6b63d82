"""Train small Llama-style decoders from scratch, saved in Hugging Face format.

The model is a plain ``transformers.LlamaForCausalLM`` (RMSNorm, rotary, gated MLP), so the
checkpoint loads through :func:`tl_sinks.load_model` exactly like a hub model. Training is plain
PyTorch: AdamW, linear warm-up then cosine decay, gradient clipping, a progress bar, periodic
validation, checkpoints that resume bit-for-bit on CPU (model, optimiser, data-sampler and RNG
states), and a JSON log of the loss curve.

Every training sequence starts with BOS followed by ``seq_len - 1`` tokens of a random window
of the tokenised corpus (documents joined with EOS), so position 0 always holds BOS, as in the
paper's setting.

Example:
    >>> from tl_sinks.train import TrainConfig, train
    >>> train(TrainConfig(steps=100), "runs/tiny")     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tl_sinks._io import atomic_write, atomic_write_text
from tl_sinks._progress import tqdm
from tl_sinks.train.corpus import DEFAULT_PACKAGES, build_corpus

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"


# TrainConfig fields added after runs were recorded, with the default that reproduces those runs.
_LATER_FIELDS: dict[str, Any] = {"bos_prob": 1.0}


@dataclass
class TrainConfig:
    """Everything that determines a training run.

    Attributes:
        d_model, n_layers, n_heads, n_kv_heads, d_mlp: Model shape (Llama; ``n_kv_heads`` for GQA).
        vocab_size: Byte-level BPE vocabulary trained on the corpus.
        seq_len: Tokens per training sequence, BOS included.
        attention: Attention variant (:data:`tl_sinks.train.modeling.VARIANTS`): ``"softmax"``
            (baseline), ``"headnorm"``, ``"gated"``, ``"sink_logit"``, ``"softmax1"``.
        tie_embeddings: Share the embedding and unembedding matrices.
        steps, batch_size, lr, min_lr_ratio, warmup, weight_decay, beta1, beta2, grad_clip:
            Optimisation.
        packages, max_documents, val_fraction: Corpus (see :func:`build_corpus`).
        seed, device, dtype, num_threads: Run settings (``dtype`` of the parameters).
        autocast: Mixed precision for the forward and backward passes (``"bfloat16"``; the
            parameters and optimiser stay in ``dtype``). About 2x faster on CPUs with bf16
            matrix units and on GPUs, emulated and much slower on other CPUs (``train`` warns,
            see :func:`cpu_has_native_bf16`); ``None`` computes in ``dtype``.
        eval_every, eval_batches, checkpoint_every: Validation and checkpoint cadence (steps).
        bos_prob: Share of training sequences that start with BOS (default 1: all). The others
            are ``seq_len`` corpus tokens, whose first token is first only by position: with
            rotary positions and a causal mask the model can then find it only through the
            first position's value aggregation (the paper's mechanism), not by BOS's identity.
            Validation sequences start with BOS (none if ``bos_prob`` is 0).
    """

    d_model: int = 192
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None
    d_mlp: int = 512
    vocab_size: int = 4096
    seq_len: int = 256
    attention: str = "softmax"
    tie_embeddings: bool = True
    steps: int = 4000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    packages: tuple[str, ...] | list[str] = DEFAULT_PACKAGES
    max_documents: int | None = None
    val_fraction: float = 0.01
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    num_threads: int | None = None
    autocast: str | None = None
    eval_every: int = 250
    eval_batches: int = 8
    checkpoint_every: int = 500
    bos_prob: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.packages = tuple(self.packages)
        from tl_sinks.train.modeling import VARIANTS

        if self.attention not in VARIANTS:
            raise ValueError(f"unknown attention variant {self.attention!r}; choose from {VARIANTS}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}")
        if not 0.0 <= self.bos_prob <= 1.0:
            raise ValueError(f"bos_prob must be in [0, 1], got {self.bos_prob}")
        if self.seq_len < 2 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("seq_len >= 2, steps >= 1 and batch_size >= 1 are required")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["packages"] = list(self.packages)
        # Fields added after runs were recorded are left out at their defaults, so the configs of
        # earlier runs and checkpoints still compare equal (and resume).
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "packages" in kw:
            kw["packages"] = tuple(kw["packages"])
        return cls(**kw)

    def data_key(self) -> dict[str, Any]:
        """Settings that determine the tokenised data (a changed key rebuilds it)."""
        return {k: getattr(self, k) for k in ("vocab_size", "max_documents", "val_fraction")} | {
            "packages": list(self.packages)
        }


# --------------------------------------------------------------------------- tokenizer & data
def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE trained on ``texts``; prepends BOS to every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=None,
        model_max_length=1_000_000,
    )


def _encode_stream(tokenizer: Any, docs: list[str]) -> np.ndarray:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.int32
    return np.asarray(ids, dtype=dtype)


def prepare_data(cfg: TrainConfig, data_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Build (or reuse) the corpus, tokenizer and token streams under ``data_dir``."""
    from transformers import PreTrainedTokenizerFast

    data_dir.mkdir(parents=True, exist_ok=True)
    key_file = data_dir / "data_key.json"
    if key_file.exists() and json.loads(key_file.read_text()) == cfg.data_key():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(data_dir / "tokenizer")
        manifest = json.loads((data_dir / "corpus_manifest.json").read_text())
    else:
        if progress:
            print("tl_sinks.train: collecting the docstring corpus ...", flush=True)
        corpus = build_corpus(cfg.packages, max_documents=cfg.max_documents)
        train_docs, val_docs = corpus.split(cfg.val_fraction)
        if not val_docs:
            val_docs = train_docs[-1:]
        tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
        tokenizer.save_pretrained(data_dir / "tokenizer")
        train_ids, val_ids = _encode_stream(tokenizer, train_docs), _encode_stream(tokenizer, val_docs)
        atomic_write(data_dir / "train.npy", lambda f: np.save(f, train_ids))
        atomic_write(data_dir / "val.npy", lambda f: np.save(f, val_ids))
        manifest = corpus.manifest | {
            "train_documents": len(train_docs), "val_documents": len(val_docs),
            "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
        }
        atomic_write_text(data_dir / "corpus_manifest.json", json.dumps(manifest, indent=2))
        atomic_write_text(key_file, json.dumps(cfg.data_key()))  # last: it marks the data complete
    train_ids = np.load(data_dir / "train.npy", mmap_mode="r")
    val_ids = np.load(data_dir / "val.npy", mmap_mode="r")
    for name, ids in (("train", train_ids), ("validation", val_ids)):
        if len(ids) < cfg.seq_len:
            raise ValueError(f"the {name} token stream ({len(ids)} tokens) is shorter than seq_len={cfg.seq_len}")
    return {"tokenizer": tokenizer, "train": train_ids, "val": val_ids, "manifest": manifest}


def sample_batch(
    ids: np.ndarray, batch_size: int, seq_len: int, bos_id: int, gen: torch.Generator, bos_prob: float = 1.0
) -> torch.Tensor:
    """``[batch, seq_len]``: BOS, then a random window of ``seq_len - 1`` corpus tokens.

    With ``bos_prob < 1`` each row starts with BOS with that probability and is otherwise a
    window of ``seq_len`` corpus tokens. ``bos_prob=1`` draws exactly the random numbers it
    always did, so seeded runs are unchanged.
    """
    if bos_prob >= 1.0:
        starts = torch.randint(0, len(ids) - (seq_len - 1), (batch_size,), generator=gen)
        with_bos = [True] * batch_size
    else:
        if len(ids) <= seq_len:
            raise ValueError(f"the token stream ({len(ids)} tokens) needs more than seq_len={seq_len} tokens for windows without BOS")
        with_bos = (torch.rand(batch_size, generator=gen) < bos_prob).tolist()
        starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=gen)
    out = torch.empty(batch_size, seq_len, dtype=torch.long)
    for i, (s, bos) in enumerate(zip(starts.tolist(), with_bos)):
        if bos:
            out[i, 0] = bos_id
            out[i, 1:] = torch.from_numpy(np.asarray(ids[s : s + seq_len - 1], dtype=np.int64))
        else:
            out[i] = torch.from_numpy(np.asarray(ids[s : s + seq_len], dtype=np.int64))
    return out


# --------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, tokenizer: Any) -> torch.nn.Module:
    from transformers import LlamaConfig

    from tl_sinks.train.modeling import build_variant, init_headnorm_from_first_token

    hf_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        max_position_embeddings=cfg.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.seed)
    model = build_variant(hf_cfg, cfg.attention)
    if cfg.attention == "headnorm":
        init_headnorm_from_first_token(model, seed=cfg.seed)
    return model.to(dtype=getattr(torch, cfg.dtype))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
    )


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (``avx512_bf16`` or ``amx_bf16``); ``None`` if unknown.

    Read from ``/proc/cpuinfo`` on Linux; other platforms answer ``None`` (no claim either way).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.partition(":")[2].split()}
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _warn_emulated_bf16(cfg: TrainConfig) -> None:
    """One-line warning when bf16 autocast is asked of a CPU that would emulate it."""
    if cfg.autocast != "bfloat16" or torch.device(cfg.device).type != "cpu" or cpu_has_native_bf16() is not False:
        return
    # Measured on the default recipe, AVX2 EPYC, 2 threads: emulation is ~13x slower than fp32.
    warnings.warn(
        "autocast='bfloat16' on a CPU without native bf16 (no avx512_bf16/amx_bf16) is emulated and much slower "
        "(default recipe: 17.5 s/step vs 1.30 s/step in fp32 on an AVX2 EPYC); use autocast=None here",
        RuntimeWarning, stacklevel=3,
    )


def _autocast(cfg: TrainConfig) -> Any:
    """The mixed-precision context of the run (a no-op without ``cfg.autocast``)."""
    device_type = torch.device(cfg.device).type
    dtype = getattr(torch, cfg.autocast) if cfg.autocast else torch.float32
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=cfg.autocast is not None)


@torch.no_grad()
def evaluate(model: torch.nn.Module, ids: np.ndarray, cfg: TrainConfig, bos_id: int) -> float:
    """Mean next-token loss on ``eval_batches`` fixed validation windows (seeded, identical every call)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    losses = []
    for _ in range(cfg.eval_batches):
        # BOS windows, or none at all for a run that never saw BOS.
        x = sample_batch(ids, cfg.batch_size, cfg.seq_len, bos_id, gen, 1.0 if cfg.bos_prob > 0 else 0.0).to(cfg.device)
        with _autocast(cfg):
            losses.append(float(model(x, labels=x).loss))
    model.train(was_training)
    return float(np.mean(losses))


# --------------------------------------------------------------------------- training loop
def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    on_eval: Callable[[int, torch.nn.Module, float], None] | None = None,
) -> Path:
    """Train and save a model; returns the Hugging Face model directory ``out_dir/model``.

    Args:
        cfg: The run's settings.
        out_dir: Run directory (data cache, ``checkpoint.pt``, ``log.json``, ``model/``).
        resume: Continue from ``out_dir/checkpoint.pt`` when it exists (same config required).
        progress: Show a progress bar.
        stop_after: Stop (after checkpointing) once this many steps are done, to split a run
            across sessions; ``None`` trains to ``cfg.steps``.
        on_eval: Called as ``on_eval(step, model, val_loss)`` right after each validation
            (every ``cfg.eval_every`` steps and at ``cfg.steps``), before that step's
            checkpoint, with the model in training mode. It is not part of the config or the
            checkpoint: a resumed run calls it again only for validations after the checkpoint
            it resumes from (or, after a crash, again for those after the last checkpoint).
            It must leave the model's weights and mode as it found them.
    """
    _warn_emulated_bf16(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.use_deterministic_algorithms(cfg.device == "cpu", warn_only=True)
    data = prepare_data(cfg, out / "data", progress=progress)
    tokenizer = data["tokenizer"]
    bos_id = tokenizer.bos_token_id
    model = build_model(cfg, tokenizer).to(cfg.device)
    opt = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, log = 0, {"config": cfg.to_dict(), "corpus": data["manifest"], "train": [], "val": []}
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        state = _load_checkpoint(ckpt, cfg.device)
        if state["config"] != cfg.to_dict():
            raise ValueError(f"{ckpt} was written with a different config; use another out_dir or resume=False")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["sampler"])
        _set_rng_states(state)
        step, log = state["step"], state["log"]
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="tl_sinks.train", unit="step")
    t0 = time.perf_counter()
    try:
        while step < end:
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            x = sample_batch(data["train"], cfg.batch_size, cfg.seq_len, bos_id, gen, cfg.bos_prob).to(cfg.device)
            with _autocast(cfg):
                loss = model(x, labels=x).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {float(loss)} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            loss_value = float(loss.detach())
            log["train"].append([step, loss_value])
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                log["val"].append([step, evaluate(model, data["val"], cfg, bos_id)])
                if on_eval is not None:
                    on_eval(step, model, log["val"][-1][1])
            if step % cfg.checkpoint_every == 0 or step == end:
                _save_checkpoint(ckpt, model, opt, gen, step, log, cfg)
    finally:
        bar.close()
    log.setdefault("seconds", 0.0)
    log["seconds"] += time.perf_counter() - t0
    atomic_write_text(out / "log.json", json.dumps(log))
    model_dir = out / "model"
    if step >= cfg.steps:
        model.eval()
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        atomic_write_text(
            model_dir / "training.json",
            json.dumps({"config": cfg.to_dict(), "corpus": data["manifest"], "final_val_loss": log["val"][-1][1] if log["val"] else None,
                        "steps": step, "tokens_seen": step * cfg.batch_size * cfg.seq_len, "seconds": log["seconds"]}, indent=2)
        )
    return model_dir


# What a checkpoint must hold; torch.load(weights_only=True) admits only tensors and plain data.
_CHECKPOINT_KEYS = ("model", "optimizer", "sampler", "torch_rng", "step", "log", "config")


def _rng_states() -> dict[str, Any]:
    """Global RNG states as tensors and plain lists/ints (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch_rng": torch.get_rng_state(),
        "python_rng": {"version": version, "state": list(mt), "gauss_next": gauss},
        "numpy_rng": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
    }


def _set_rng_states(state: dict[str, Any]) -> None:
    """Restore :func:`_rng_states` (checkpoints from before numpy/python states lack them)."""
    torch.set_rng_state(state["torch_rng"])
    if (py := state.get("python_rng")) is not None:
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if (npr := state.get("numpy_rng")) is not None:
        np.random.set_state((npr["name"], np.asarray(npr["keys"], dtype=np.uint32), npr["pos"], npr["has_gauss"],
                             npr["cached_gaussian"]))


def _first_line(e: BaseException, pattern: str | None = None) -> str:
    """A one-line summary of a (multi-line) torch.load error: the line matching ``pattern``."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if pattern is not None:
        lines = [line for line in lines if re.search(pattern, line, flags=re.IGNORECASE)] or lines
    return (lines[0] if lines else type(e).__name__)[:200]


def _load_checkpoint(path: Path, device: str) -> dict[str, Any]:
    """Load ``checkpoint.pt`` without running code from it.

    Raises:
        ValueError: One line naming the file: it holds pickled objects other than tensors and
            plain data (which ``weights_only=False`` would execute), is unreadable, or lacks
            the entries a tl_sinks checkpoint has.
    """
    hint = "delete it or train with resume=False"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _first_line(e, r"unsupported|blocked")
        raise ValueError(f"{path}: refusing to load a checkpoint that holds more than tensors and plain data, "
                         f"since unpickling it could run code ({detail}); {hint}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt ({_first_line(e)}); {hint}") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: not a tl_sinks checkpoint (no {', '.join(missing)}); {hint}")
    return state


def _save_checkpoint(path: Path, model, opt, gen, step, log, cfg) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sampler": gen.get_state(),
             **_rng_states(), "step": step, "log": log, "config": cfg.to_dict()}
    # Atomic: a crash or a full disk never leaves a half-written checkpoint.
    atomic_write(path, lambda f: torch.save(state, f))
