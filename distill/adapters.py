"""Mask-only adapters: LoRA that acts at `<MTP>` positions only, so plain next-token decoding stays the base model's.

The paper fine-tunes every weight (§2.3, §7.7); its k=1 accuracy drops 3.5 points, and on a small model a few
minutes of that rewrites the greedy answers. With `lora_mask_only` the LoRA update of every adapted linear layer is
multiplied by a gate g_t = [input token t is `<MTP>`]:

    y_t = W x_t + g_t · (α/r) B A x_t

so every real token's hidden states, keys/values and next-token logits are the base model's, bit for bit; only the mask
positions carry the adaptation (the `<MTP>` embedding row stays as initialised: with a tied head a trained row would
change every position's `<MTP>` logit). Consequences, by construction:
  * static k=1 of the distilled model *is* the base model's greedy decoding; ConfAdapt's first token of every span is
    the base model's next token; self-speculative decoding verifies against the base model itself (lossless with
    respect to the model the user started from);
  * the masks attend to the exact key/value cache plain decoding would build, as the paper's inference does (§1.2);
  * the weights cannot be merged into one matrix: an export keeps the base weights and the adapter side by side
    (distill/export.py), and the loaders re-attach it (`attach_mask_adapter`).

Mechanics. Training (`MaskGate`, on peft's LoRA layers): a forward pre-hook on the input embedding reads the token ids
of each forward and stores the gate; a forward pre-hook on every LoRA `A` projection multiplies its input by the gate
(A and B are linear and bias-free, so the update is gated exactly). Decoding (`attach_mask_adapter`): the saved
adapter becomes one `GatedLoRALinear` per adapted layer, without peft, swapped in only for forwards that carry
`<MTP>`; a forward without any runs the base model's own layers, so plain decoding costs what the base model costs.
A forward with masks pays for the rank-r products at its mask columns only (`InferenceGate`: from the first column
holding a mask on), a few hundred tiny matrix products per forward; the layers that read one input (q/k/v, gate/up)
share one stacked A product (`SharedLoRAInput`), and on a CPU the products run in float32, which oneDNN does about 3x
faster than bfloat16 at these sizes.
Both need `input_ids` (an `inputs_embeds`-only forward is refused).

The training output records the choice in `mtp_adapter.json` beside `adapter_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.errors import UserError

MARKER_FILE = "mtp_adapter.json"  # beside adapter_config.json: this adapter acts at <MTP> positions only
EXPORT_SUBDIR = "mtp_adapter"  # inside an exported checkpoint: the mask-only adapter, kept unmerged


def _require_input_ids(args, kwargs) -> None:
    """The model's forward pre-hook: the gate is read from token ids, so a forward must carry them."""
    if kwargs.get("input_ids") is None and not (args and isinstance(args[0], torch.Tensor)):
        raise UserError("a mask-only adapter needs input_ids (it gates the adapter by token); inputs_embeds "
                        "alone cannot be gated")


class MaskGate:
    """Gates every peft LoRA layer of `model` to `<MTP>` positions: the training form (peft trains and saves the
    adapter; `attach_mask_adapter` is the lighter decoding form of the saved adapter)."""

    def __init__(self, model: torch.nn.Module, mask_token_id: int):
        from peft.tuners.lora import LoraLayer

        self.mask_token_id = int(mask_token_id)
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        if not self.layers:
            raise UserError("lora_mask_only needs LoRA layers in the model (use_peft with a LoRA config)")
        self.rank = max(int(r) for layer in self.layers for r in layer.r.values())
        self.gate: torch.Tensor | None = None
        embed = model.get_input_embeddings()
        self._handles = [model.register_forward_pre_hook(self._start, with_kwargs=True),
                         embed.register_forward_pre_hook(self._read_ids)]
        for layer in self.layers:
            for lora_a in layer.lora_A.values():
                self._handles.append(lora_a.register_forward_pre_hook(self._apply))

    def _start(self, module, args, kwargs):
        _require_input_ids(args, kwargs)
        self.gate = None  # set by the embedding's hook of this forward

    def _read_ids(self, module, args):
        self.gate = (args[0] == self.mask_token_id).unsqueeze(-1)

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


def gate_model(model: torch.nn.Module, mask_token_id: int) -> MaskGate:
    """Install the gate on `model` (a PeftModel or the model peft injected into) and remember it on the model."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    gate = MaskGate(target, mask_token_id)
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


# Adapted layers that read the same input tensor (HF's names): their A projections run as one product.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _keep_small_products_fp32(module: torch.nn.Module) -> None:
    """On a CPU the rank-r products of an adapter are tiny GEMMs, about 3x faster in float32 than in bfloat16/float16
    (oneDNN's small-matrix path); their weights stay float32 there whatever dtype the model is cast to."""
    for param in module.parameters(recurse=False):
        if param.device.type == "cpu" and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


class SharedLoRAInput(torch.nn.Module):
    """The A matrices of the adapted layers that read one input (q/k/v; gate/up), stacked: one gated product
    h = g · [A_1; A_2; ...] x serves them all. It is computed once per input tensor: the first member to see `x`
    computes it, the others find the same object and slice it (any other input is computed afresh, so a member
    called on its own is still exact)."""

    def __init__(self, lora_as: list[torch.Tensor], dtype, device, state: "InferenceGate"):
        super().__init__()
        self.a = torch.nn.Parameter(torch.cat(lora_as).to(device=device, dtype=dtype), requires_grad=False)
        self.state = state
        self._input: torch.Tensor | None = None
        self._h: torch.Tensor | None = None
        _keep_small_products_fp32(self)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        _keep_small_products_fp32(self)
        return self

    def forget(self) -> None:
        self._input = self._h = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """g · A x over the gate's columns (the last `state.tail` of `x`): [..., tail, rank x members]."""
        if x is not self._input:
            h = torch.nn.functional.linear(x[..., -self.state.tail :, :].to(self.a.dtype), self.a)
            self._input, self._h = x, h * self.state.gate_as(h.dtype)
        return self._h


class GatedLoRALinear(torch.nn.Module):
    """Inference form of one mask-only LoRA layer: y = W x + B' (g · A x)  (B' = (α/r) B), g read from the shared gate.

    A lives in a SharedLoRAInput (with the A of the layers that read the same input); the update is computed in
    float32 on a CPU and added in the model's dtype. It sits in the model only during forwards that carry <MTP>
    (InferenceGate swaps it in and out), so plain decoding runs the untouched base linear layers and costs exactly
    what the base model costs."""

    def __init__(self, base: torch.nn.Linear, shared: SharedLoRAInput, rows: slice, lora_b: torch.Tensor,
                 scale: float):
        super().__init__()
        self.base = base
        self.shared = shared
        self.rows = rows
        self.lora_b = torch.nn.Parameter((lora_b * scale).to(device=shared.a.device, dtype=shared.a.dtype),
                                         requires_grad=False)
        _keep_small_products_fp32(self)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        _keep_small_products_fp32(self)
        return self

    @property
    def weight(self):  # code that inspects a linear layer's weight (dtype, device) sees the base's
        return self.base.weight

    def forward(self, x):  # only installed while the forward carries <MTP>, so the gate is set
        y = self.base(x)
        update = torch.nn.functional.linear(self.shared.project(x)[..., self.rows], self.lora_b).to(y.dtype)
        tail = update.shape[-2]  # the update covers the gate's columns, the last of the sequence
        if torch.is_grad_enabled():
            return torch.cat([y[..., : y.shape[-2] - tail, :], y[..., -tail:, :] + update], dim=-2)
        y[..., -tail:, :] += update
        return y


class InferenceGate:
    """The gate of every GatedLoRALinear of one model: None in a forward without <MTP>, else [B, tail, 1] of 0/1 over
    the forward's last `tail` columns, from the first column holding a <MTP> on. Earlier columns get no update, so their
    products are never computed: the decoder's masks are the last K columns of every row, and a prefill of hundreds of
    prompt tokens with K masks pays the rank-r products (and their additions) for K columns, not for the prompt.

    The gated layers are swapped into their places when a forward carries <MTP> and the base linear layers back when
    one does not (a few hundred attribute writes, only when the state changes); the wrappers stay registered under
    `model.mtp_mask_adapter`, so `.to()` moves and casts them with the model."""

    def __init__(self, model: torch.nn.Module, mask_token_id: int, slots: list[tuple], rank: int):
        self.mask_token_id = int(mask_token_id)
        self.slots = slots  # (parent module, attribute name, base linear, gated layer)
        self.layers = [gated for *_, gated in slots]
        self.shared = list({id(layer.shared): layer.shared for layer in self.layers}.values())
        self.rank = int(rank)
        self.gate: torch.Tensor | None = None
        self.tail = 0
        self._gate_as: dict = {}
        self._used = True  # the shared products may hold a forward's activations
        self.installed = False
        self._handles = [model.register_forward_pre_hook(self._start, with_kwargs=True),
                         model.get_input_embeddings().register_forward_pre_hook(self._read_ids),
                         model.register_forward_hook(self._end)]

    def _end(self, module, args, output):
        self._forget()  # let the forward's activations go

    def _forget(self) -> None:
        if self._used:
            for shared in self.shared:
                shared.forget()
            self._used = False

    def _install(self, gated: bool) -> None:
        for parent, name, base, layer in self.slots:
            setattr(parent, name, layer if gated else base)
        self.installed = gated

    def _start(self, module, args, kwargs):
        _require_input_ids(args, kwargs)
        self.read(None)  # set by the embedding's hook of this forward
        self._forget()  # no input of a previous forward is reused

    def _read_ids(self, module, args):
        self.read(args[0])
        if (self.gate is not None) != self.installed:
            self._install(self.gate is not None)

    def read(self, input_ids: torch.Tensor | None) -> None:
        """Set the gate and its tail from a forward's token ids [B, T] (None: no forward, no gate)."""
        self.gate, self.tail, self._gate_as = None, 0, {}
        if input_ids is None:
            return
        columns = (input_ids == self.mask_token_id).any(0)
        if bool(columns.any()):
            first = int(columns.int().argmax())
            self.gate = (input_ids[:, first:] == self.mask_token_id).unsqueeze(-1)
            self.tail = input_ids.shape[-1] - first
            self._used = True

    def gate_as(self, dtype) -> torch.Tensor:
        """The gate [B, tail, 1] as 0/1 of `dtype` (cast once per forward)."""
        if dtype not in self._gate_as:
            self._gate_as[dtype] = self.gate.to(dtype)
        return self._gate_as[dtype]


def _adapter_weights(adapter_dir: Path) -> tuple[dict, dict]:
    """(adapter_config.json, safetensors tensors) of a peft LoRA adapter this module can run gated."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    unsupported = [name for name in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "lora_bias",
                                     "trainable_token_indices", "modules_to_save") if config.get(name)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise UserError(f"{adapter_dir}: a mask-only adapter must be plain LoRA (peft_type LORA, without "
                        f"{', '.join(unsupported) or 'other adapter types'})")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors")
    return config, load_file(str(adapter_dir / "adapter_model.safetensors"))


@torch.no_grad()
def attach_mask_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Put a saved mask-only LoRA adapter into `model` for decoding, in place, and return `model`.

    Every adapted linear layer becomes a GatedLoRALinear sharing one InferenceGate (no peft at decode time). The
    returned object is `model` itself, so code that inspects its forward signature or config sees the usual model.
    Embedding / head matrices saved with the adapter (peft saves them when the vocabulary was resized for <MTP>) are
    copied in, as peft would load them."""
    adapter_dir = Path(adapter_dir)
    marker = read_marker(adapter_dir)
    mask_id = getattr(model.config, "mtp_mask_token_id", None)
    if mask_id is not None and int(mask_id) != int(marker["mask_token_id"]):
        raise UserError(f"{adapter_dir} was trained with <MTP> id {marker['mask_token_id']}, but the model's is {mask_id}")
    if mask_gate_of(model) is not None:
        raise UserError("the model already carries a mask-only adapter")
    config, tensors = _adapter_weights(adapter_dir)
    scale = float(config["lora_alpha"]) / float(config["r"])
    prefix = "base_model.model."
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if name.endswith(tail):
                pairs.setdefault(name[: -len(tail)], {})[part] = tensor
                break
        else:
            whole[name] = tensor
    modules = dict(model.named_modules())
    for name, tensor in whole.items():  # resized embedding / head saved beside the adapter
        try:
            target = model.get_parameter(name)  # also a tied head's name
        except AttributeError:
            target = None
        if target is None or target.shape != tensor.shape:
            raise UserError(f"{adapter_dir}: {name} {tuple(tensor.shape)} does not fit the model")
        target.copy_(tensor.to(target.dtype))
    state = InferenceGate.__new__(InferenceGate)  # filled below, once the layers exist
    for name, pair in pairs.items():
        base = modules.get(name)
        if not isinstance(base, torch.nn.Linear) or set(pair) != {"lora_A", "lora_B"}:
            raise UserError(f"{adapter_dir}: adapter weights for {name}, which is not a linear layer of the model")
        if pair["lora_A"].shape[1] != base.in_features or pair["lora_B"].shape[0] != base.out_features:
            raise UserError(f"{adapter_dir}: adapter weights for {name} do not fit its shape")
    slots = []
    for group in _sibling_groups(sorted(pairs)):
        bases = [modules[name] for name in group]
        dtype, device = bases[0].weight.dtype, bases[0].weight.device
        shared = SharedLoRAInput([pairs[name]["lora_A"] for name in group], dtype, device, state)
        start = 0
        for name, base in zip(group, bases):
            rank = pairs[name]["lora_A"].shape[0]
            layer = GatedLoRALinear(base, shared, slice(start, start + rank), pairs[name]["lora_B"], scale)
            start += rank
            parent, _, child = name.rpartition(".")
            slots.append((modules[parent] if parent else model, child, base, layer))
    if not slots:
        raise UserError(f"{adapter_dir} holds no LoRA weights")
    InferenceGate.__init__(state, model, marker["mask_token_id"], slots, int(config["r"]))
    model.mtp_mask_adapter = torch.nn.ModuleList(state.layers)  # registered: .to() moves them with the model
    model._mtp_mask_gate = state
    model.eval()
    return model


def _sibling_groups(names: list[str]) -> list[list[str]]:
    """The adapted layers in groups that read one input (SIBLINGS under one parent); every other layer alone."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        family = next((i for i, family in enumerate(SIBLINGS) if child in family), None)
        groups.setdefault((parent, family) if family is not None else (name,), []).append(name)
    return list(groups.values())


def mask_gate_of(model) -> MaskGate | None:
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(target, "_mtp_mask_gate", None)
