"""Fine-tuning an open_clip vision tower: which weights train, and how they are saved and merged.

Three methods (``TowerConfig.method``), each touching whole residual blocks of the ViT:

- ``lora``: LoRA (peft) on ``lora_modules`` of the last ``lora_blocks`` blocks (default every
  block's ``attn``, ``mlp.c_fc`` and ``mlp.c_proj``); the tower itself stays frozen.
- ``last-blocks``: the last ``unfreeze_blocks`` blocks, ``ln_post`` and ``proj`` train in full.
- ``last-blocks+lora``: the last ``unfreeze_blocks`` train in full, LoRA on the ``lora_blocks``
  below them. A block is either trained in full or adapted, never both.

Two tower layouts (``TowerLayout``, told from the tower itself): open_clip's own ViT (the names
above) and a timm ViT inside open_clip's ``TimmModel`` (SigLIP, SigLIP 2 and the other
``timm_model_name`` configs): blocks ``trunk.blocks``, LoRA by default on each block's
``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (plain ``nn.Linear``), and the final
norms, the attention pool and ``head`` training with the unfrozen blocks.

peft adapts an ``nn.MultiheadAttention`` (open_clip's ``attn``) through both ``in_proj`` and
``out_proj`` (peft >= 0.16; targeting ``attn.out_proj`` alone would do nothing: its forward is
never called); ``c_fc`` / ``c_proj`` are plain ``nn.Linear``. Targets are checked against the
tower before anything trains: a name it lacks is a ConfigError naming it.

What is saved is only what trained (``tower_state``): the LoRA tensors under peft's own key names
and the unfrozen tensors under the base tower's names, so a fine-tuned ranker is a few MB beside
its base ModelSpec, never a copy of the frozen backbone. ``merged_visual_state`` folds the
adapters into plain weights: a full open_clip checkpoint that loads as ``ARCH:PATH``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from keeper_core.errors import ConfigError, ModelLoadError

TuneMethod = Literal["lora", "last-blocks", "last-blocks+lora"]
TUNE_METHODS: tuple[TuneMethod, ...] = ("lora", "last-blocks", "last-blocks+lora")
_BASE = ".base_layer"


@dataclass(frozen=True)
class TowerLayout:
    """Where a kind of vision tower keeps its residual blocks, and what trains beside them.

    Attributes:
        kind: named in errors and reports.
        blocks: the blocks' container inside the tower.
        lora_modules: the parts of a block LoRA adapts by default.
        head: name prefixes of the tower's parameters after the blocks (final norm, pooling,
            projection into the embedding space), trained with the unfrozen blocks.
    """

    kind: str
    blocks: str
    lora_modules: tuple[str, ...]
    head: tuple[str, ...]


#: open_clip's VisionTransformer: attention (an ``nn.MultiheadAttention``: in_proj + out_proj)
#: and MLP; the final norm and the projection.
OPEN_CLIP_VIT = TowerLayout(
    "open_clip ViT",
    "transformer.resblocks",
    ("attn", "mlp.c_fc", "mlp.c_proj"),
    ("ln_post", "proj"),
)
#: A timm VisionTransformer in open_clip's TimmModel (SigLIP, SigLIP 2, ...): the fused qkv and
#: output projections and the MLP, all ``nn.Linear``; the final norms, the attention pool (MAP)
#: and TimmModel's head.
TIMM_VIT = TowerLayout(
    "timm ViT",
    "trunk.blocks",
    ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    ("trunk.norm.", "trunk.fc_norm.", "trunk.attn_pool.", "head."),
)


class TowerConfig(BaseModel):
    """Which weights of the vision tower train. Validated at construction; saved with a model.

    Attributes:
        base_spec: the ModelSpec of the frozen tower (``ARCH[:WEIGHTS]``).
        base_weights: what ``base_spec``'s checkpoint held when the tower was tuned
            (``keeper_core.models.weights_version``: ``sha256:`` of a file, ``etag:`` of an S3
            object); None for random init and hub tags (named versions), and in configs saved
            before it was recorded. A tuned tower loads only onto these weights.
        method: see the module docstring.
        lora_blocks: LoRA on the last N blocks (of those not unfrozen); None = all of them.
        unfreeze_blocks: blocks trained in full (``last-blocks`` and ``last-blocks+lora``).
        lora_modules: the sub-modules of a LoRA block that get adapters; None: the tower
            layout's (``TowerLayout.lora_modules``).
        targets: explicit module names inside the tower (e.g. ``transformer.resblocks.11.attn``);
            replaces ``lora_blocks`` x ``lora_modules`` when given.
        rank, alpha, dropout: LoRA rank r, scale numerator (the update is ``alpha / r * B A``)
            and dropout on the adapter's input.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_spec: str
    base_weights: str | None = None
    method: TuneMethod = "lora"
    lora_blocks: int | None = Field(None, ge=1)
    unfreeze_blocks: int = Field(1, ge=1)
    lora_modules: tuple[str, ...] | None = None
    targets: tuple[str, ...] | None = None
    rank: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _sensible(self) -> TowerConfig:
        if self.method == "last-blocks" and self.targets:
            raise ValueError("method last-blocks has no LoRA: targets do not apply")
        if self.lora_modules is not None and not self.lora_modules:
            raise ValueError("lora_modules must name at least one module")
        return self

    @property
    def uses_lora(self) -> bool:
        return self.method != "last-blocks"

    @property
    def unfreezes(self) -> bool:
        return self.method != "lora"


def tower_layout(visual: nn.Module) -> TowerLayout:
    """The layout of ``visual``: open_clip's ViT or a timm ViT (``TimmModel``).

    Raises:
        ConfigError: neither (e.g. a ModifiedResNet, a timm ConvNeXt), named.
    """
    modules = dict(visual.named_modules())
    for layout in (OPEN_CLIP_VIT, TIMM_VIT):
        blocks = modules.get(layout.blocks)
        if isinstance(blocks, nn.ModuleList | nn.Sequential) and len(blocks) > 0:
            return layout
    raise ConfigError(
        f"fine-tuning needs a ViT tower: open_clip's ({OPEN_CLIP_VIT.blocks}) or a timm one "
        f"({TIMM_VIT.blocks}, as SigLIP's); {type(visual).__name__} has neither"
    )


def vision_blocks(visual: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The residual blocks of a ViT tower, in order.

    Raises:
        ConfigError: the tower is no ViT of a known layout (``tower_layout``).
    """
    blocks = dict(visual.named_modules())[tower_layout(visual).blocks]
    assert isinstance(blocks, nn.ModuleList | nn.Sequential)  # tower_layout checked it
    return blocks


def unfrozen_block_indices(visual: nn.Module, config: TowerConfig) -> list[int]:
    """Indices of the blocks trained in full (empty for ``lora``)."""
    n = len(vision_blocks(visual))
    if not config.unfreezes:
        return []
    if config.unfreeze_blocks > n:
        raise ConfigError(f"unfreeze_blocks={config.unfreeze_blocks}, but the tower has {n} blocks")
    return list(range(n - config.unfreeze_blocks, n))


def lora_targets(visual: nn.Module, config: TowerConfig) -> list[str]:
    """Module names (inside the tower) that get LoRA adapters, checked to exist and be adaptable.

    Raises:
        ConfigError: a target the tower does not have (named, with what it does have), a target
            of a kind LoRA cannot adapt, or more ``lora_blocks`` than there are.
    """
    if not config.uses_lora:
        return []
    modules = dict(visual.named_modules())
    layout = tower_layout(visual)
    blocks_at = layout.blocks
    if config.targets:
        names = list(config.targets)
    else:
        n = len(vision_blocks(visual))
        free = n - len(unfrozen_block_indices(visual, config))
        want = free if config.lora_blocks is None else config.lora_blocks
        if free == 0:  # last-blocks+lora with every block trained in full
            fix = (
                f"use unfreeze_blocks from 1 to {n - 1}, or method last-blocks"
                if n > 1
                else "use method lora or last-blocks"
            )
            raise ConfigError(
                f"unfreeze_blocks={config.unfreeze_blocks} trains all {n} blocks of the tower "
                f"in full, which leaves no block for LoRA (lora_blocks needs at least 1): {fix}"
            )
        if want > free:
            has = (
                f"the tower has {n} block{'s' if n > 1 else ''}"
                if free == n
                else f"only {free} of the tower's {n} blocks {'is' if free == 1 else 'are'} left "
                f"for LoRA (unfreeze_blocks={n - free} trains the last {n - free} in full)"
            )
            raise ConfigError(
                f"lora_blocks={want}, but {has}: use lora_blocks from 1 to {free}, or leave it "
                "unset for all of them"
            )
        parts = config.lora_modules or layout.lora_modules
        names = [f"{blocks_at}.{i}.{m}" for i in range(free - want, free) for m in parts]
    for name in names:
        module = modules.get(name)
        if module is None:
            block0 = [
                k.removeprefix(f"{blocks_at}.0.")
                for k in modules
                if k.startswith(f"{blocks_at}.0.")
            ]
            raise ConfigError(
                f"LoRA target {name!r} is not a module of {config.base_spec}'s vision tower, "
                f"a {layout.kind} (a block holds {block0}; blocks are "
                f"{blocks_at}.0..{len(vision_blocks(visual)) - 1})"
            )
        owner = modules.get(name.rpartition(".")[0])
        if isinstance(owner, nn.MultiheadAttention) and module is owner.out_proj:
            raise ConfigError(
                f"LoRA target {name!r} is the out_proj of a MultiheadAttention, whose forward "
                f"never calls it: target {name.rpartition('.')[0]!r} (adapts in_proj and out_proj)"
            )
        if not isinstance(module, nn.Linear | nn.MultiheadAttention | nn.Conv2d):
            raise ConfigError(
                f"LoRA target {name!r} is a {type(module).__name__}; LoRA adapts Linear, "
                "MultiheadAttention and Conv2d modules"
            )
    unfrozen = {f"{blocks_at}.{i}." for i in unfrozen_block_indices(visual, config)}
    clash = [t for t in names if any(t.startswith(u) for u in unfrozen)]
    if clash:
        raise ConfigError(f"LoRA targets {clash} lie in blocks that train in full")
    return names


@dataclass
class TrainableParts:
    """What ``apply_tuning`` made trainable, by parameter group (for per-group learning rates)."""

    lora: dict[str, nn.Parameter] = field(default_factory=dict)
    backbone: dict[str, nn.Parameter] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)

    def count(self) -> int:
        return sum(p.numel() for p in (*self.lora.values(), *self.backbone.values()))


def base_name(name: str) -> str:
    """A parameter name of an adapted tower as the plain tower names it."""
    return name.replace(_BASE, "")


def _is_lora(name: str) -> bool:
    return ".lora_" in name


def apply_tuning(visual: nn.Module, config: TowerConfig) -> TrainableParts:
    """Freeze ``visual``, then add adapters and unfreeze blocks as ``config`` says (in place).

    Returns:
        The trainable parameters by group, names as ``visual.named_parameters()`` gives them.

    Raises:
        ConfigError: see ``lora_targets`` and ``unfrozen_block_indices``; checked before any
            module is changed.
    """
    targets = lora_targets(visual, config)
    blocks = unfrozen_block_indices(visual, config)
    visual.requires_grad_(False)
    if targets:
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets,
            bias="none",
        )
        # peft's documented hook for custom layers ("dynamic dispatch"): see _functional_mha.
        lora._register_custom_module({nn.MultiheadAttention: _functional_mha()})
        inject_adapter_in_model(lora, visual)  # adapters are created trainable, the rest stays
    layout = tower_layout(visual)
    prefixes = tuple(f"{layout.blocks}.{i}." for i in blocks) + (layout.head if blocks else ())
    parts = TrainableParts(targets=targets, blocks=blocks)
    for name, p in visual.named_parameters():
        if _is_lora(name):
            p.requires_grad_(True)
            parts.lora[name] = p
        elif base_name(name).startswith(prefixes):
            p.requires_grad_(True)
            parts.backbone[name] = p
    return parts


def _functional_mha() -> type:
    """peft's LoRA MultiheadAttention, with a forward that never writes the frozen weights.

    peft (0.21) runs an adapted ``nn.MultiheadAttention`` by adding the LoRA delta into
    ``in_proj_weight`` and ``out_proj.weight``, calling the module, then subtracting it again: in
    float32 ``(W + d) - d`` is not ``W``, so every forward moved the "frozen" weights by rounding
    noise (and two threads scoring at once would race on them); it also added the out_proj delta
    twice, in the forward and in the merge alike. Here ``W + d`` is computed into temporaries and
    passed to ``F.multi_head_attention_forward``; ``merge`` adds each delta once. Key names and
    saved files are peft's own. (LoRA dropout has no place in a weight-space update: it applies to
    Linear targets only.)
    """
    import torch.nn.functional as F
    from peft.tuners.lora.layer import MultiheadAttention as PeftMHA
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class FunctionalLoraMHA(PeftMHA):
        def _weights(self) -> tuple[Any, torch.Tensor, torch.Tensor]:
            base: Any = self.get_base_layer()
            out: Any = base.out_proj
            w_in, w_out = base.in_proj_weight, out.get_base_layer().weight
            if not (self.disable_adapters or self.merged):
                for a in self.active_adapters:
                    if a in self.lora_A:
                        w_in = w_in + self.get_delta_weight(a)
                        w_out = w_out + out.get_delta_weight(a)
            return base, w_in, w_out

        def forward(  # type: ignore[override]  # nn.MultiheadAttention.forward's signature
            self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
            attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
            is_causal: bool = False,
        ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
            base, w_in, w_out = self._weights()
            q, k, v = (query, key, value)
            if base.batch_first:
                q, k, v = (t.transpose(0, 1) for t in (query, key, value))
            o, w = F.multi_head_attention_forward(
                q, k, v, base.embed_dim, base.num_heads, w_in, base.in_proj_bias,
                base.bias_k, base.bias_v, base.add_zero_attn, base.dropout, w_out,
                base.out_proj.get_base_layer().bias, training=self.training,
                key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )  # fmt: skip
            return (o.transpose(0, 1) if base.batch_first else o), w

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            names = check_adapters_to_merge(self, adapter_names)
            base: Any = self.get_base_layer()
            with torch.no_grad():
                for a in names:
                    merged = base.in_proj_weight + self.get_delta_weight(a)
                    if safe_merge and not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs merging adapter {a!r} into {type(base).__name__}")
                    base.in_proj_weight.copy_(merged)
                    self.merged_adapters.append(a)
            base.out_proj.merge(safe_merge=safe_merge, adapter_names=names)  # its own, once

    return FunctionalLoraMHA


def lora_parameter_count(visual: nn.Module, targets: list[str], rank: int) -> int:
    """What LoRA adds: ``r * (in + out)`` per adapted Linear; an MHA adapts in_proj (d -> 3d) and
    out_proj (d -> d). Computed from the plain tower's shapes (for checks and reports)."""
    modules = dict(visual.named_modules())
    total = 0
    for t in targets:
        m = modules[t]
        if isinstance(m, nn.MultiheadAttention):
            d = m.embed_dim
            total += rank * (d + 3 * d) + rank * (d + d)
        elif isinstance(m, nn.Linear):
            total += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            total += rank * (m.in_channels * k) + m.out_channels * rank
    return total


def tower_state(visual: nn.Module, parts: TrainableParts) -> dict[str, dict[str, torch.Tensor]]:
    """What trained, to save: ``{"adapter": peft-named LoRA tensors, "blocks": base-named}``.

    A snapshot: CPU copies that later optimizer steps do not change. (``.detach().cpu()`` alone
    is the live parameter itself on a CPU tower, so a "best epoch" kept that way followed every
    later update.)
    """
    adapter: dict[str, torch.Tensor] = {}
    if parts.lora:
        from peft import get_peft_model_state_dict

        adapter = dict(get_peft_model_state_dict(visual))
    blocks = {base_name(n): p for n, p in parts.backbone.items()}
    return {"adapter": snapshot(adapter), "blocks": snapshot(blocks)}


def snapshot(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of ``tensors``, never sharing storage with them."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def load_tower_state(
    visual: nn.Module, parts: TrainableParts, adapter: dict[str, torch.Tensor],
    blocks: dict[str, torch.Tensor], *, source: str,
) -> None:  # fmt: skip
    """Put saved tensors back into a tower prepared by ``apply_tuning`` with the same config.

    Raises:
        ModelLoadError: a tensor is missing, unexpected or of the wrong shape.
    """
    expected = tower_state(visual, parts)
    for kind, given in (("adapter", adapter), ("blocks", blocks)):
        want = expected[kind]
        missing, extra = sorted(set(want) - set(given)), sorted(set(given) - set(want))
        bad = [k for k in want if k in given and given[k].shape != want[k].shape]
        if missing or extra or bad:
            raise ModelLoadError(
                source,
                f"{kind} tensors do not fit the tower: missing {missing[:4]}, unexpected "
                f"{extra[:4]}, wrong shape {bad[:4]}",
            )
    if adapter:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(visual, adapter)
    by_base = {base_name(n): p for n, p in parts.backbone.items()}
    with torch.no_grad():
        for k, v in blocks.items():
            by_base[k].copy_(v)


def merged_visual_state(visual: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's weights with every adapter folded in, under the plain tower's names.

    Works on a copy (the adapted tower is left as it is). peft merges an adapted MHA's in_proj
    and its nested out_proj together; its nested out_proj layer then reports itself merged.
    """
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(visual).cpu()
    for module in _outermost(merged, LoraLayer):
        module.merge(safe_merge=True)
    return {
        base_name(k): v.detach().contiguous()
        for k, v in merged.state_dict().items()
        if not _is_lora(k)
    }


def _outermost(root: nn.Module, kind: type) -> Iterator[Any]:
    """Modules of ``kind`` not nested inside another of ``kind`` (an MHA merges its out_proj)."""
    seen: list[str] = []
    for name, module in root.named_modules():
        if isinstance(module, kind) and not any(name.startswith(s + ".") for s in seen):
            seen.append(name)
            yield module


class TunedTower(nn.Module):
    """A (possibly adapted) vision tower: uint8 or normalised pixels -> unit-norm embeddings."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, visual: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        if x.dtype == torch.uint8:
            x = (x.float() / 255.0 - self.mean) / self.std
        emb = self.visual(x.float())
        if isinstance(emb, tuple):  # towers configured to also return tokens
            emb = emb[0]
        return torch.nn.functional.normalize(emb.float(), dim=-1)
