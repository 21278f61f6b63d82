"""Shape aliases and the structural model type shared by every stage.

No ``from __future__ import annotations`` here: jaxtyping reads these aliases at runtime.
"""

from typing import Any, Callable, Protocol, runtime_checkable

from jaxtyping import Bool, Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch pos"]
AttentionMask = Int[Tensor, "batch pos"]
ValidMask = Bool[Tensor, "batch pos"]
Pattern = Float[Tensor, "batch head_index query_pos key_pos"]
HeadVector = Float[Tensor, "batch pos head_index d_head"]
Resid = Float[Tensor, "batch pos d_model"]
Neurons = Float[Tensor, "batch pos d_mlp"]
Logits = Float[Tensor, "batch pos d_vocab"]

# A hook function as TransformerLens calls it: ``fn(tensor, hook=HookPoint)``.
HookFn = Callable[..., Any]


@runtime_checkable
class ModelLike(Protocol):
    """Structural type for a TransformerLens 4.x ``TransformerBridge``.

    Mirrors ``transformer_lens.model_protocol.TransformerLensModel`` plus the hook surface
    tl_sinks needs (``hooks``, ``hook_dict``), so a later backend only has to match this.
    """

    @property
    def cfg(self) -> Any: ...

    @property
    def hook_dict(self) -> Any: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any: ...

    def hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def to_tokens(self, *args: Any, **kwargs: Any) -> Any: ...
