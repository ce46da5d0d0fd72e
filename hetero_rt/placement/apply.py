"""Load a model as a resolved Plan says. Each MoE layer's routed experts are read by the checkpoint's
loader as ExpertWeights (kept in their stored format where the layer's backend runs it in place,
else in the placement dtype) and built once by the experts builder (hetero_rt.experts.build); the
model is then built on the meta device around them, and every other weight streams from the memory
map straight to its device and dtype, one tensor at a time."""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..checkpoint.loader import Where, build_model
from ..checkpoint.names import names_for
from ..config import ModelArgs
from ..experts import ExpertsBuilder, registry
from ..model.transformer import Transformer
from .plan import Plan

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(loader, args: ModelArgs, plan: Plan, main_dtype: torch.dtype) -> Transformer:
    """loader: a checkpoint loader (checkpoint.loader.SafetensorsLoader, checkpoint.gguf_loader.GGUFLoader)."""
    builder = ExpertsBuilder(args, plan.main.device, main_dtype)
    moe_layers = [layer for layer in range(args.num_hidden_layers) if args.is_moe_layer(layer)]
    # a bar on stderr while loading (one step per MoE layer's experts, one for the rest), redrawn at every
    # step (a step is a layer: seconds, not microseconds); silent when stderr is not a terminal (tqdm's
    # disable=None), so logs and tests see nothing
    with tqdm(total=len(moe_layers) + 1, desc="loading", unit="part", disable=None, leave=False, mininterval=0,
              miniters=1) as bar:
        for layer in moe_layers:
            p = plan.experts(layer)
            dtype = TORCH_DTYPES[p.dtype] if p.dtype else main_dtype
            bar.set_postfix_str(f"layer {layer} experts", refresh=False)
            builder.build(loader.expert_weights(layer, registry.get(p.backend), dtype), p)
            bar.update()
        model = build_model(args, builder.experts_for)
        bar.set_postfix_str("attention, shared experts, embeddings", refresh=False)
        loader.load(model, param_placement(plan, main_dtype, args))
        bar.update()
    for name, param in model.named_parameters():        # format: stored weights take their activations
        stored = getattr(param, "stored", None)
        if stored is not None:
            stored.act = plan.owner(names_for(args).hf_name(name)).activations or "fp32"
    return model.eval()


def param_placement(plan: Plan, main_dtype: torch.dtype, args: ModelArgs) -> Where:
    """where(our parameter name, routed experts excepted) -> (device, dtype, weight format or None)."""
    main, hf_name = torch.device(plan.main.device), names_for(args).hf_name
    return lambda name: (main, main_dtype, plan.owner(hf_name(name)).format)
