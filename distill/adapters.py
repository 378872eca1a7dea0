"""Mask-only adapters: LoRA that acts at `<MTP>` positions only, so plain next-token decoding stays the base model's.

The paper fine-tunes every weight (§2.3, §7.7); its k=1 accuracy drops 3.5 points, and on a small model a few
minutes of that rewrites the greedy answers. With `lora_mask_only` the LoRA update of every adapted linear layer is
multiplied by a gate g_t = [input token t is `<MTP>`]:

    y_t = W x_t + g_t · (α/r) B A x_t

so every real token's hidden states, keys/values and next-token logits are the base model's, bit for bit; only the mask
positions (and the trainable `<MTP>` embedding row) carry the adaptation. Consequences, by construction:
  * static k=1 of the distilled model *is* the base model's greedy decoding; ConfAdapt's first token of every span is
    the base model's next token; self-speculative decoding verifies against the base model itself (lossless with
    respect to the model the user started from);
  * the masks attend to the exact key/value cache plain decoding would build, as the paper's inference does (§1.2);
  * the weights cannot be merged into one matrix: an export keeps the base weights and the adapter side by side
    (distill/export.py), and the loaders re-attach it (`attach_mask_adapter`).

Mechanics: a forward pre-hook on the input embedding reads the token ids of each forward and stores the gate; a
forward pre-hook on every LoRA `A` projection multiplies its input by the gate (A and B are linear and bias-free, so
the update is gated exactly). For inference (`skip_unmasked=True`) a forward without any `<MTP>` turns the adapter
layers off for that forward, so plain decoding costs what the base model costs. The gate needs `input_ids` (an
`inputs_embeds`-only forward is refused).

The training output records the choice in `mtp_adapter.json` beside `adapter_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.errors import UserError

MARKER_FILE = "mtp_adapter.json"  # beside adapter_config.json: this adapter acts at <MTP> positions only
EXPORT_SUBDIR = "mtp_adapter"  # inside an exported checkpoint: the mask-only adapter, kept unmerged


class MaskGate:
    """Gates every LoRA layer of `model` (a model with peft LoRA layers injected) to `<MTP>` positions."""

    def __init__(self, model: torch.nn.Module, mask_token_id: int, *, skip_unmasked: bool = False):
        from peft.tuners.lora import LoraLayer

        self.mask_token_id = int(mask_token_id)
        self.skip_unmasked = skip_unmasked
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        if not self.layers:
            raise UserError("lora_mask_only needs LoRA layers in the model (use_peft with a LoRA config)")
        self.gate: torch.Tensor | None = None
        self._adapters_off = False
        embed = model.get_input_embeddings()
        self._handles = [model.register_forward_pre_hook(self._start, with_kwargs=True),
                         embed.register_forward_pre_hook(self._read_ids)]
        for layer in self.layers:
            for lora_a in layer.lora_A.values():
                self._handles.append(lora_a.register_forward_pre_hook(self._apply))

    def _start(self, module, args, kwargs):
        if kwargs.get("input_ids") is None and not (args and isinstance(args[0], torch.Tensor)):
            raise UserError("a mask-only adapter needs input_ids (it gates the adapter by token); inputs_embeds "
                            "alone cannot be gated")
        self.gate = None  # set by the embedding's hook of this forward

    def _read_ids(self, module, args):
        is_mask = args[0] == self.mask_token_id
        self.gate = is_mask.unsqueeze(-1)
        if self.skip_unmasked:
            off = not bool(is_mask.any())
            if off != self._adapters_off:
                for layer in self.layers:  # peft's per-layer switch (BaseTunerLayer.disable_adapters reads it)
                    layer._disable_adapters = off
                self._adapters_off = off

    def _apply(self, module, args):
        x = args[0]
        gate = self.gate
        if gate is None or gate.shape[:-1] != x.shape[:-1]:
            raise UserError(f"mask-only adapter: the gate of shape {None if gate is None else tuple(gate.shape)} "
                            f"does not match the layer input {tuple(x.shape)}")
        return (x * gate.to(x.dtype),) + tuple(args[1:])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._adapters_off:
            for layer in self.layers:
                layer._disable_adapters = False
            self._adapters_off = False


def gate_model(model: torch.nn.Module, mask_token_id: int, *, skip_unmasked: bool = False) -> MaskGate:
    """Install the gate on `model` (a PeftModel or the model peft injected into) and remember it on the model."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    gate = MaskGate(target, mask_token_id, skip_unmasked=skip_unmasked)
    target._mtp_mask_gate = gate
    return gate


def is_mask_only(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / MARKER_FILE).is_file()


def write_marker(adapter_dir: str | Path, mask_token_id: int) -> None:
    doc = {"active_at": "<MTP>", "mask_token_id": int(mask_token_id),
           "rule": "LoRA update multiplied by [input token == <MTP>]: real tokens run the base weights"}
    (Path(adapter_dir) / MARKER_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def read_marker(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / MARKER_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        int(doc["mask_token_id"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a mask-only adapter record (expected a JSON object with mask_token_id)") from None
    return doc


def exported_adapter(model_dir: str | Path) -> Path | None:
    """The mask-only adapter an export keeps beside the base weights, if any."""
    sub = Path(model_dir) / EXPORT_SUBDIR
    return sub if (sub / "adapter_config.json").is_file() and is_mask_only(sub) else None


def attach_mask_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Load a mask-only LoRA adapter into `model` in place (peft), gate it for inference, return the plain model.

    The returned object is `model` itself (a transformers model whose linear layers now carry the adapter), so code
    that inspects its forward signature or config sees the usual model."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    marker = read_marker(adapter_dir)
    mask_id = getattr(model.config, "mtp_mask_token_id", None)
    if mask_id is not None and int(mask_id) != int(marker["mask_token_id"]):
        raise UserError(f"{adapter_dir} was trained with <MTP> id {marker['mask_token_id']}, but the model's is {mask_id}")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as exc:  # peft raises several types for a mismatched adapter
        raise UserError(f"cannot load the mask-only adapter {adapter_dir}: {str(exc).strip().splitlines()[0]}") from exc
    plain = peft_model.get_base_model()
    gate_model(plain, marker["mask_token_id"], skip_unmasked=True)
    plain.eval()
    return plain


def mask_gate_of(model) -> MaskGate | None:
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(target, "_mtp_mask_gate", None)
