"""Knowledge distillation: train the compressed student to match the original teacher's next-token
distribution on calibration text, without undoing what earlier stages built.

What is trained, and why:
- quantized linears keep their integer codes; only their per-group scales are trained (the grid the
  artifact stores stays exact, no straight-through rounding whose codes would flip step to step, and
  4-bit codes need no fp32 master copy);
- pruned linears train their kept weights; the pruned ones get no gradient and stay exactly zero;
- every norm weight trains; embeddings, the LM head and untouched linears are frozen.
Loss: KL(teacher ‖ student) on logits at temperature T (× T²), plus optionally a hidden-state term:
the mean squared error of the last hidden states, or (`hidden_layers: all`) the mean over blocks of
each block output's squared error normalised by the teacher's squared norm, so that every depth
weighs alike (the "SquareHead" loss of arXiv:2310.06927, made for recovering pruned LLMs).
`lr_schedule: cosine` decays both learning rates to zero after a linear warmup. The KL is taken from
the final hidden states a chunk of tokens at a time, its gradient formed in the same pass
(`chunked_kl`): a batch's full logits, tokens × vocabulary, never exist.
With `data.calibration.compute_dtype: bfloat16` both models' forward (and the student's backward)
run under CPU autocast, mixed-precision training: the trained parameters, AdamW's moments and the
loss stay float32.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from kiln.arch import module_name
from kiln.compress.base import ActScheme, StageConfig
from kiln.compress.quant import QuantizedWeight, group_index


class DistillConfig(StageConfig):
    kind: Literal["distill"] = "distill"
    teacher: str | None = Field(None, description="'original' (the model before compression) or a model source")
    steps: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(4, ge=1, le=256)
    samples: int | None = Field(None, ge=1, le=1_000_000,
                                description="train on this many windows of data.calibration's source and seq_len "
                                "(default: the calibration windows); the first data.calibration.samples of them are "
                                "the calibration windows, the rest continue the same document stream")
    seq_len: int | None = Field(None, ge=8, description="train on the first seq_len tokens of each calibration "
                                "window (default: whole windows); shorter is proportionally faster")
    lr: float = Field(5e-5, gt=0.0, le=1.0, description="AdamW learning rate for kept weights and norms")
    scale_lr: float = Field(1e-4, gt=0.0, le=1.0, description="learning rate for quantization scales")
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    hidden_weight: float = Field(0.0, ge=0.0, description="weight of the hidden-state term")
    hidden_layers: Literal["last", "all"] = Field("last", description="'last': MSE of the last hidden states; "
                                                  "'all': mean over blocks of the normalised MSE of each block's output")
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="linear warmup before the schedule")
    seed: int = 0

    needs_calibration = True
    role = "training"

    @model_validator(mode="after")
    def _needs_teacher(self) -> "DistillConfig":
        if not self.teacher:
            raise ValueError("distill needs a teacher: set `teacher: original` (the model before compression) "
                             "or a model source such as a folder or pkg: path")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        return self


class ScaleTrainedLinear(nn.Module):
    """A linear whose weight is (codes - zero) · scale[group]: codes frozen, scales trainable.
    Replaces nn.Linear and GPT-2's Conv1D alike (the weight here is always (out, in))."""

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("centered", q.codes.float() - q.zero.float()[:, group_index(q.codes.shape[1], q.group_size)])
        self.register_buffer("g_idx", group_index(q.codes.shape[1], q.group_size))
        self.scale = nn.Parameter(q.scale.float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.q = q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.centered * self.scale[:, self.g_idx], self.bias)

    def quantized(self) -> QuantizedWeight:
        q = self.q
        return QuantizedWeight(q.codes, self.scale.detach().clone(), q.zero, q.bits, q.group_size, q.symmetric)


def _head_weight(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's (vocabulary, hidden) weight and bias as tensors of the autograd graph: a quantized
    head's weight is built from its codes and its trainable scales."""
    if isinstance(head, ScaleTrainedLinear):
        return head.centered * head.scale[:, head.g_idx], head.bias
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    raise TypeError(f"distill: the output head is a {type(head).__name__}, not a linear layer")


def _logits(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, cap: float | None) -> torch.Tensor:
    """float32 c(x Wᵀ + b), the GEMM in x's and W's dtype; c: the soft-cap cap·tanh(u/cap), if any."""
    z = (x @ W.T).float()
    if b is not None:
        z += b
    return z if cap is None else torch.tanh(z / cap) * cap


class _HeadKL(torch.autograd.Function):
    """Σ over rows of T²·KL(p ‖ q), q = softmax(z/T) for the student's logits z = c(h Wᵀ + b) (c: the
    optional soft-cap, cap·tanh(u/cap)) and p the teacher's, taken `chunk` rows at a time. The
    gradients are formed in the same pass, ∂/∂z = T·(q − p), times c′(u) = 1 − (z/cap)², so no
    chunk's logits outlive it and none is recomputed: tokens × vocabulary floats never exist at once.
    GEMMs run in `dtype` (bfloat16 under a bfloat16 compute_dtype, as autocast would run the head);
    sums and softmax statistics in float32."""

    @staticmethod
    def forward(ctx, h, W, b, teacher_logits, T: float, cap: float | None, chunk: int, dtype: torch.dtype):
        want_W, want_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        Wd = W.detach().to(dtype)
        bias = None if b is None else b.detach().float()
        grad_h = torch.empty_like(h)
        grad_W = torch.zeros(W.shape, dtype=torch.float32) if want_W else None
        grad_b = torch.zeros(W.shape[0], dtype=torch.float32) if want_b else None
        total = torch.zeros((), dtype=torch.float64)
        for i in range(0, h.shape[0], chunk):
            hc = h[i : i + chunk].detach().to(dtype)
            z = _logits(hc, Wd, bias, cap)
            log_q = F.log_softmax(z / T, dim=-1)
            log_p = F.log_softmax(teacher_logits(i, i + chunk) / T, dim=-1)
            p = log_p.exp()
            total += float((p * (log_p - log_q)).sum()) * T * T
            g = (log_q.exp() - p) * T
            if cap is not None:
                g *= 1 - (z / cap).square()
            grad_h[i : i + chunk] = (g.to(dtype) @ Wd).to(h.dtype)
            if want_W:
                grad_W += (g.to(dtype).T @ hc).float()
            if want_b:
                grad_b += g.sum(0)
        ctx.grads = (grad_h, grad_W, grad_b)
        return total.to(h.dtype)

    @staticmethod
    def backward(ctx, out):
        grad_h, grad_W, grad_b = ctx.grads
        scaled = [None if t is None else t * out for t in (grad_h, grad_W, grad_b)]
        return (*scaled, None, None, None, None, None)


def chunked_kl(student_head: nn.Module, teacher_head: nn.Module, s_h: torch.Tensor, t_h: torch.Tensor, T: float,
               cap: float | None = None, chunk: int = 512, dtype: torch.dtype = torch.float32,
               teacher_cap: float | None = None) -> torch.Tensor:
    """Mean over tokens of T²·KL(teacher ‖ student) from the final hidden states and the two heads,
    `chunk` tokens at a time (`_HeadKL`); `cap`, `teacher_cap`: each model's final logit soft-cap."""
    s_h, t_h = s_h.reshape(-1, s_h.shape[-1]), t_h.reshape(-1, t_h.shape[-1])
    W, b = _head_weight(student_head)
    Wt, bt = _head_weight(teacher_head)
    Wt, bt = Wt.detach().to(dtype), None if bt is None else bt.detach().float()

    def teacher_logits(i: int, j: int) -> torch.Tensor:
        return _logits(t_h[i:j].detach().to(dtype), Wt, bt, teacher_cap)

    with torch.autocast("cpu", enabled=False):
        return _HeadKL.apply(s_h, W, b, teacher_logits, T, cap, chunk, dtype) / s_h.shape[0]


class _HeadsOff:
    """Within the block, each model's output head is an identity (and a final logit soft-cap, Gemma 2's,
    is off), so that `model(...).logits` are the final hidden states; `heads` and `caps` are what the
    loss applies instead, a chunk at a time."""

    def __init__(self, *models: nn.Module):
        self.models = models
        self.names = [module_name(model, model.get_output_embeddings()) for model in models]
        self.heads = [model.get_submodule(n) for model, n in zip(models, self.names)]
        self.caps = [getattr(model.config, "final_logit_softcapping", None) for model in models]

    def __enter__(self) -> "_HeadsOff":
        for model, name, cap in zip(self.models, self.names, self.caps):
            model.set_submodule(name, nn.Identity())
            if cap is not None:
                model.config.final_logit_softcapping = None
        return self

    def __exit__(self, *exc) -> None:
        for model, name, head, cap in zip(self.models, self.names, self.heads, self.caps):
            model.set_submodule(name, head)
            if cap is not None:
                model.config.final_logit_softcapping = cap


def _hidden_mse(student_hidden, teacher_hidden, layers: str) -> torch.Tensor:
    if layers == "last":
        return F.mse_loss(student_hidden[-1].float(), teacher_hidden[-1].float())
    # hidden_states[0] is the embedding output, the same in both models
    terms = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
             for s, t in zip(student_hidden[1:], teacher_hidden[1:])]
    return torch.stack(terms).mean()


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The multiplier of the base learning rates at `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def _teacher(plan, cfg: DistillConfig):
    from kiln.model import WeightStore, load_full
    from kiln.recipe import ModelConfig
    from kiln.source import resolve_model

    if cfg.teacher == "original":
        path = plan.model.path
    else:
        path = resolve_model(ModelConfig(source=cfg.teacher, trust_remote_code=plan.recipe.model.trust_remote_code)).path
    return load_full(path, WeightStore(path), plan.recipe.model.trust_remote_code)


def run_distill(plan, store, cfg: DistillConfig, targets: list[str], calib: torch.Tensor, out_dir: Path, ctx, sparse,
                compute_dtype: str = "float32"):
    from kiln.compress.engine import StageOutput, compute_autocast
    from kiln.errors import CompressionError
    from kiln.model import load_full, save_overlay

    student = load_full(plan.model.path, store, plan.recipe.model.trust_remote_code)
    teacher = _teacher(plan, cfg).eval()
    if teacher.config.vocab_size != student.config.vocab_size:
        raise CompressionError(f"distill teacher {cfg.teacher!r} has vocabulary {teacher.config.vocab_size}, "
                               f"the student {student.config.vocab_size}", hint="use a teacher with the same tokenizer")
    for p in student.parameters():
        p.requires_grad_(False)

    scale_modules: dict[str, ScaleTrainedLinear] = {}
    masks: dict[str, torch.Tensor] = {}
    weights, scales = [], []
    for name in targets:
        mod = student.get_submodule(name)
        q = store.quantized(name + ".weight")
        if q is not None:
            new = ScaleTrainedLinear(q, mod.bias)
            student.set_submodule(name, new)
            scale_modules[name] = new
            scales.append(new.scale)
        elif name in sparse:
            mod.weight.requires_grad_(True)
            mask = (mod.weight != 0)
            masks[name] = mask
            mod.weight.register_hook(lambda g, m=mask: g * m)
            weights.append(mod.weight)
    norms = [p for n, p in student.named_parameters() if "norm" in n.split(".")[-2].lower() or "ln" in n.split(".")[-2]]
    for p in norms:
        p.requires_grad_(True)
    groups = [{"params": weights + norms, "lr": cfg.lr}] + ([{"params": scales, "lr": cfg.scale_lr}] if scales else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.lr_schedule))

    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(calib.shape[0], generator=g)
    curve = []
    student.train()
    t0 = time.perf_counter()
    with ctx.progress("distill: steps", cfg.steps) as advance, _HeadsOff(student, teacher) as heads:
        for step in range(cfg.steps):
            idx = order[(torch.arange(cfg.batch_size) + step * cfg.batch_size) % calib.shape[0]]
            x = calib[idx, : cfg.seq_len]
            with compute_autocast(compute_dtype):
                with torch.no_grad():
                    t_out = teacher(input_ids=x, use_cache=False, output_hidden_states=cfg.hidden_weight > 0)
                s_out = student(input_ids=x, use_cache=False, output_hidden_states=cfg.hidden_weight > 0)
                # with the heads off, .logits are the final hidden states
                loss = chunked_kl(*heads.heads, s_out.logits, t_out.logits, cfg.temperature, heads.caps[0],
                                  dtype=getattr(torch, compute_dtype), teacher_cap=heads.caps[1])
            if cfg.hidden_weight > 0:
                loss = loss + cfg.hidden_weight * _hidden_mse(s_out.hidden_states, t_out.hidden_states, cfg.hidden_layers)
            if not math.isfinite(loss.item()):
                raise CompressionError(f"distill: the loss became {loss.item()} at step {step}",
                                       hint="lower lr / scale_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for name, mask in masks.items():
                student.get_submodule(name).weight.data.mul_(mask)
            curve.append(round(loss.item(), 6))
            advance()
    student.eval()

    tensors, quantized = {}, {}
    for name, mod in scale_modules.items():
        info = store.quant_info(name + ".weight") or {}
        act = (ActScheme(bits=info["activation_bits"], rotation=info.get("rotation", "none"))
               if info.get("activation_bits") else None)
        quantized[name + ".weight"] = (mod.quantized(), bool(info.get("transposed")), act)
    for name in masks:
        w = student.get_submodule(name).weight.detach()
        tensors[name + ".weight"] = w.clone()
    for n, p in student.named_parameters():
        if p.requires_grad and p.dim() == 1:
            tensors[n] = p.detach().clone()
    out = StageOutput()
    f = out_dir / "distill.safetensors"
    save_overlay(f, tensors, quantized)
    out.files.append(f)
    out.modules = {n: {"trained": "scales" if n in scale_modules else "kept weights" if n in masks else "none"} for n in targets}
    out.extra = {"train_windows": calib.shape[0], "train_seq_len": calib[:, : cfg.seq_len].shape[1],
                 "loss_curve": curve, "loss_first": curve[0], "loss_last": curve[-1],
                 "train_seconds": round(time.perf_counter() - t0, 2), "steps": cfg.steps}
    del teacher, student
    return out
