"""bf16 compute weights with fp32 master weights in the optimizer (one process, bf16 precision).

Under autocast with fp32 weights every micro-batch casts each matmul weight to bf16 in its forward and each bf16
weight gradient back to fp32 in its backward, then adds it into `.grad`: traffic proportional to the parameter
count that MoT, with 2.5x the dense parameters at the same FLOPs, pays 2.5x over (bench/NOTES.md). Here the
weights that autocast would cast (those of `TowerLinear` and `nn.Linear`) are bf16 in the model, so forward and
backward cast nothing, and the optimizer keeps their fp32 masters:

- one micro-batch per step: AdamW reads the bf16 gradients as they are;
- several: `stash_gradients()` after each but the last adds them into fp32 sums (one pass), so gradients are
  still accumulated in fp32; with `accumulate_in_backward(model)` the weights of `TowerLinear` (the blocks'
  projections) skip that pass: their backward GEMMs add into the fp32 sums directly
  (mot.model.tower_matmul);
- the update (`adamw_update`) reads gradient, master and moments once and writes master, moments and the
  bf16 copy in one fused kernel (torch.compile on CUDA; the same function runs eagerly elsewhere).

The forward and backward see exactly the values they see under autocast with fp32 weights (bf16(master)), so
training is the same computation with fewer passes. Embeddings, norms and Pattention parameters stay fp32 (the
residual stream and the norm gains are fp32 either way). Checkpoints hold the fp32 masters as the model weights
(`master_state_dict`); the optimizer state holds the moments, as torch's AdamW does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mot.model.routing import TowerLinear

COMPUTE_DTYPE = torch.bfloat16


def compute_weight_names(model: nn.Module) -> list[str]:
    """Names of the parameters that autocast casts for its matmuls: weights and biases of `TowerLinear` and
    `nn.Linear`, unless a parameter is also an embedding table (tied head), which must stay fp32."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names, seen = [], set()
    for module_name, module in model.named_modules():
        if not isinstance(module, TowerLinear | nn.Linear):
            continue
        for name, param in module.named_parameters(recurse=False):
            if id(param) in embedding_ids or id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            names.append(f"{module_name}.{name}" if module_name else name)
    return names


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 scalars: torch.Tensor, inv_grad_scale: torch.Tensor, compute_copy: torch.Tensor | None = None):
    """One AdamW step of an fp32 tensor, in place, as torch.optim.AdamW computes it (decoupled decay).

    scalars = [1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, lr / (1 - beta1^t), sqrt(1 - beta2^t)];
    the gradient is multiplied by inv_grad_scale (the clip factor). compute_copy, if given, receives the new
    value in its own dtype (the bf16 weight the model computes with).
    """
    decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt = scalars.unbind()
    g = grad.float() * inv_grad_scale
    new_param = param * decay
    new_avg = exp_avg + one_minus_beta1 * (g - exp_avg)  # lerp, as torch's AdamW
    new_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g
    denom = new_avg_sq.sqrt() / bias_correction2_sqrt + eps
    new_param = new_param - step_size * (new_avg / denom)
    param.copy_(new_param)
    exp_avg.copy_(new_avg)
    exp_avg_sq.copy_(new_avg_sq)
    if compute_copy is not None:
        compute_copy.copy_(new_param)


def adamw_update_many(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                      exp_avg_sqs: list[torch.Tensor], scalars: torch.Tensor, inv_grad_scale: torch.Tensor,
                      compute_copies: list[torch.Tensor] | None = None) -> None:
    """`adamw_update` of every tensor of a list: compiled, one fused kernel per tensor from a single call."""
    for i in range(len(params)):
        adamw_update(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], scalars, inv_grad_scale,
                     compute_copies[i] if compute_copies is not None else None)


_compiled_update = None


def _update_fn(device: torch.device):
    """CUDA: compiled once per list layout with static shapes (a kernel per shape, the same parameters every
    step, so no recompiles); one Python call per list keeps the launch overhead of ~100 tensors small.
    Elsewhere eager."""
    global _compiled_update
    if device.type != "cuda":
        return adamw_update_many
    if _compiled_update is None:
        # Up to 6 list layouts per optimizer (decay or not x master or not x bf16 or fp32 gradients), and a
        # benchmark may build several optimizers in one process.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_update = torch.compile(adamw_update_many, dynamic=False, fullgraph=True)
    return _compiled_update


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW over a model whose compute weights (`compute_weight_names`) are converted to bf16 here, with their
    fp32 masters kept by the optimizer. Other parameters are updated in place in their own (fp32) dtype.

    param_groups are the model's parameters (so schedulers, accelerate and torch.distributed.checkpoint see an
    ordinary optimizer); `grad_scale` divides all gradients at the next step (the clip, as for fused AdamW).
    """

    def __init__(self, model: nn.Module, param_groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        params = dict(model.named_parameters())
        self.master_names: dict[torch.Tensor, str] = {}
        self.masters: dict[torch.Tensor, torch.Tensor] = {}
        in_groups = {id(p) for g in self.param_groups for p in g["params"]}
        for name in compute_weight_names(model):
            param = params[name]
            if id(param) not in in_groups:
                continue
            if param.dtype != torch.float32:
                raise ValueError(f"master weights start from fp32 parameters; {name} is {param.dtype}")
            self.masters[param] = param.detach().clone()
            self.master_names[param] = name
            param.data = param.data.to(COMPUTE_DTYPE)
        self.grad_sums: dict[torch.Tensor, torch.Tensor] = {}  # fp32 sums of the stashed micro-batches
        # fp32 sums the backward adds into (accumulate_in_backward), also in grad_sums: kept, zeroed by zero_grad
        self.backward_sums: dict[torch.Tensor, torch.Tensor] = {}
        self.grad_scale: torch.Tensor | None = None

    def accumulate_in_backward(self, model: nn.Module) -> None:
        """Let every `TowerLinear` whose weight has a master add its weight gradient into an fp32 sum in its
        backward GEMMs (`TowerLinear.accumulate_gradients_into`; its `.grad` stays None). For several
        micro-batches per step; the model's forward must then route with host counts (training does; one tower
        needs none). Every such weight counts as having a gradient each step. Where a projection runs another
        kernel (mot.model.kernels: no host counts, or too small on CUDA) its gradient lands in `.grad` and is
        stashed into the same sum."""
        for module in model.modules():
            if isinstance(module, TowerLinear) and module.weight in self.masters:
                total = torch.zeros_like(self.masters[module.weight])
                module.accumulate_gradients_into(total)
                self.backward_sums[module.weight] = self.grad_sums[module.weight] = total

    # ------------------------------------------------------------ gradients

    def stash_gradients(self) -> None:
        """After a micro-batch that is not the step's last: move the bf16 gradients of the compute weights into
        fp32 sums, so the step's gradients are accumulated in fp32."""
        self._add_into_sums([p for p in self.masters if p.grad is not None])

    def _add_into_sums(self, params: list[torch.Tensor]) -> None:
        existing = [p for p in params if p in self.grad_sums]  # dict lookups by identity (tensors hash by id)
        if existing:
            torch._foreach_add_([self.grad_sums[p] for p in existing], [p.grad for p in existing])
        for p in params:
            if p not in self.grad_sums:
                self.grad_sums[p] = p.grad.float()
            p.grad = None

    def gradients(self) -> list[torch.Tensor]:
        """The step's gradient of every parameter that has one (fp32 sums where micro-batches were stashed;
        the last micro-batch's bf16 gradients are added into them here)."""
        self._add_into_sums([p for p in self.grad_sums if p.grad is not None])
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = self.grad_sums.get(p, p.grad)
                if grad is not None:
                    grads.append(grad)
        return grads

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.grad_sums.clear()
        if self.backward_sums:  # kept (the backward writes into them), zeroed
            torch._foreach_zero_(list(self.backward_sums.values()))
            self.grad_sums.update(self.backward_sums)

    # ------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW takes no closure")
        self.gradients()  # folds in any pending micro-batch
        scale = self.grad_scale
        self.grad_scale = None  # one step only, as the clip sets it before every step
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            # Tensors that share device, step count, master or not and gradient dtype go in one call.
            buckets: dict[tuple, tuple[list, ...]] = {}
            for p in group["params"]:
                grad = self.grad_sums.get(p, p.grad)
                if grad is None:
                    continue
                state = self.state[p]
                master = self.masters.get(p, p)
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(master, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(master, dtype=torch.float32)
                state["step"] += 1
                key = (p.device, int(state["step"].item()), master is not p, grad.dtype)
                lists = buckets.setdefault(key, ([], [], [], [], []))
                for target, value in zip(lists, (master, grad, state["exp_avg"], state["exp_avg_sq"], p),
                                         strict=True):
                    target.append(value)
            for (device, step, has_master, _), (masters, grads, avgs, avg_sqs, params) in buckets.items():
                lr = float(group["lr"])
                values = [1 - lr * group["weight_decay"], 1 - beta1, beta2, 1 - beta2, group["eps"],
                          lr / (1 - beta1**step), math.sqrt(1 - beta2**step)]
                # Pinned and non-blocking: a pageable host-to-device copy would wait for the backward to finish.
                pinned = device.type == "cuda"
                scalars = torch.tensor(values, dtype=torch.float32, pin_memory=pinned).to(device, non_blocking=True)
                inv_scale = 1.0 / scale.to(device) if scale is not None else torch.ones((), device=device)
                _update_fn(device)(masters, grads, avgs, avg_sqs, scalars, inv_scale, params if has_master else None)
        return None

    # ------------------------------------------------------------ state

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 masters by parameter name: what a checkpoint stores as these weights."""
        return {self.master_names[p]: m for p, m in self.masters.items()}

    def load_masters(self, state: dict[str, torch.Tensor]) -> None:
        """Masters (and their bf16 copies) from checkpoint weights, by name, before the model rounded them."""
        for p, name in self.master_names.items():
            if name in state:
                self.masters[p].copy_(state[name])
                p.data.copy_(self.masters[p])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # The base class casts floating state to each parameter's dtype: the moments of bf16 compute weights
        # stay fp32.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)
