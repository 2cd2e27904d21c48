"""Muon + AdamW, single-process (`MuonAdamW`) and ZeRO-2-style distributed (`DistMuonAdamW`).

Follows nanochat's (nanochat nanochat/optim.py @1ec0a34), itself adapted from modded-nanogpt.
Which parameters go where (GPT.setup_optimizer): Muon takes the 2-D matrices of the transformer
blocks, the hidden linear maps whose updates it orthogonalises so every direction of a matrix
moves at a comparable rate; AdamW takes what is not such a map: the token embedding and value
embedding tables (lookups), the unembedding lm_head, and the per-layer scalars.

Each parameter group has `kind`:
- 'adamw': keys lr, betas, eps, weight_decay. Decoupled-decay AdamW with bias correction.
- 'muon':  keys lr, momentum, ns_steps, beta2, weight_decay. All params of a group share one
  shape and are updated stacked: Nesterov momentum -> Polar Express orthogonalisation (bf16)
  -> NorMuon per-row/column variance normalisation -> cautious weight decay + update, with the
  lr multiplied by sqrt(max(1, rows/cols)).
Schedules change group['lr'], group['momentum'], group['weight_decay'] between steps; the
values reach the kernels as 0-D CPU tensors, on whatever device the params are (scalar kernel
arguments, as nanochat's), so a compiled kernel never recompiles and nothing is copied to the GPU.

There is ONE implementation of each update rule (`adamw_step_fused`, `muon_step_fused`) and one
place that feeds them hyperparameters (`_MuonAdamWBase._adamw_update/_muon_update`); the two
optimizers differ only in which slice of which tensor they hand over.

Checkpoints: `state_dict()` is in one world-size independent form for both classes: full
(unsharded) state keyed by global parameter index, as torch does. `DistMuonAdamW.state_dict()`
is therefore a collective (every rank must call it) and `load_state_dict` re-slices the full
state for the current rank, so a run saved with N ranks resumes with M.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

# (a, b, c) per iteration, from "The Polar Express" (arXiv 2505.16932); ns_steps=5 uses all.
polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

STATE_FORMAT = "nanopipe.muon_adamw.v1"
SMALL_PARAM_NUMEL = 1024  # DistMuonAdamW all-reduces AdamW params smaller than this instead of sharding them


def _as(t: Tensor, like: Tensor) -> Tensor:
    # 0-D CPU hyperparameter -> like's dtype, staying a CPU scalar tensor: ops on any device take a
    # 0-D CPU tensor as a scalar (a kernel argument, no host-to-device copy), and a compiled kernel
    # reads it as a graph input, so a new value never recompiles. Only the dtype must match (lerp
    # insists its weight has the input's dtype). As nanochat nanochat/optim.py @1ec0a34
    # (`momentum_t.to(stacked_grads.dtype)`): never `.to(device=...)`, which would copy each
    # hyperparameter host-to-device at every step.
    return t.to(dtype=like.dtype)


def adamw_step_fused(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_t: Tensor,
                     lr_t: Tensor, beta1_t: Tensor, beta2_t: Tensor, eps_t: Tensor, wd_t: Tensor) -> None:
    """One AdamW step in place on p (any slice of a parameter). Hyperparameters are 0-D CPU tensors.

    The math runs in fp32 whatever the parameter's dtype, and the results are cast back to the
    param/state dtypes at the end (nanochat nanochat/optim.py @e02b339, after 1ec0a34): on CUDA the
    token and value embeddings are stored in bf16, and doing their update in bf16 rounds the
    constants themselves (1 - lr*wd, 1 - beta2, eps, lr/bias1) to bf16's 8 significant bits:
    1 - lr*wd = 0.999 becomes 1.0, i.e. no weight decay at all. For fp32 tensors `.float()` is the
    tensor itself and the copies back are no-ops, so fp32 results are bit-identical to before.
    """
    p32, grad32 = p.float(), grad.float()
    exp_avg32, exp_avg_sq32 = exp_avg.float(), exp_avg_sq.float()
    p32.mul_(_as(1 - lr_t * wd_t, p32))
    exp_avg32.lerp_(grad32, _as(1 - beta1_t, exp_avg32))
    exp_avg_sq32.lerp_(grad32.square(), _as(1 - beta2_t, exp_avg_sq32))
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq32 / _as(bias2, exp_avg_sq32)).sqrt() + _as(eps_t, exp_avg_sq32)
    p32.sub_((exp_avg32 / denom) * _as(lr_t / bias1, p32))
    # Write back, as nanochat: for fp32 tensors a copy onto itself, which torch skips.
    p.copy_(p32)
    exp_avg.copy_(exp_avg32)
    exp_avg_sq.copy_(exp_avg_sq32)


def muon_step_fused(stacked_grads: Tensor, stacked_params: Tensor, momentum_buffer: Tensor,
                    second_momentum_buffer: Tensor, momentum_t: Tensor, lr_t: Tensor, wd_t: Tensor,
                    beta2_t: Tensor, ns_steps: int, red_dim: int) -> None:
    """One Muon step on K stacked same-shape matrices (K, r, c), in place on stacked_params.

    stacked_grads is clobbered (it holds the Nesterov blend). second_momentum_buffer is
    (K, r, 1) when r >= c (red_dim=-1) else (K, 1, c) (red_dim=-2). lr_t already includes the
    sqrt(max(1, r/c)) factor.
    """
    # Nesterov momentum: buf = mu*buf + (1-mu)*g ; g = (1-mu)*g + mu*buf
    momentum = _as(momentum_t, stacked_grads)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)
    # Polar Express orthogonalisation in bf16 (replaces Newton-Schulz): maps the momentum to
    # (approximately) the nearest semi-orthogonal matrix: singular values pushed towards 1.
    X = g.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if g.size(-2) > g.size(-1):  # tall: iterate on the small c x c Gram matrix
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    g = X
    # NorMuon (arXiv 2510.05491): Muon's output has uneven scales across neurons; normalise each
    # row (or column) by its running RMS, keeping the Frobenius norm
    beta2 = _as(beta2_t, second_momentum_buffer)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_dim_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_dim_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(dtype=second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    scaled_sq_sum = (v_mean * red_dim_size) * step_size.float().square()
    v_norm_new = scaled_sq_sum.sum(dim=(-2, -1), keepdim=True).sqrt()
    final_scale = step_size * (v_norm / v_norm_new.clamp_min(1e-10))
    g = g * final_scale.to(g.dtype)
    # Cautious weight decay: decay only where the update agrees in sign with the weight
    lr = _as(lr_t, g)
    wd = _as(wd_t, g)
    mask = (g * stacked_params) >= 0
    stacked_params.sub_(lr * g + lr * wd * stacked_params * mask)


_compiled_kernels: dict = {}


def _kernel(fn, compiled: bool):
    """The eager function, or its torch.compile'd twin (built once, shared by all optimizers)."""
    if not compiled:
        return fn
    if fn not in _compiled_kernels:
        _compiled_kernels[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _compiled_kernels[fn]


def _muon_state_shape(num: int, shape) -> tuple:
    return (num, shape[-2], 1) if shape[-2] >= shape[-1] else (num, 1, shape[-1])


_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
_MUON_KEYS = ("lr", "momentum", "ns_steps", "beta2", "weight_decay")


class _MuonAdamWBase(torch.optim.Optimizer):
    """Group validation, hyperparameter plumbing and the update calls shared by both optimizers."""

    def __init__(self, param_groups: list[dict], compile: bool | None = None):
        for i, g in enumerate(param_groups):
            kind = g.get("kind")
            required = {"adamw": _ADAMW_KEYS, "muon": _MUON_KEYS}.get(kind)
            if required is None:
                raise ValueError(f"param group {i}: unknown optimizer kind {kind!r} (expected 'adamw' or 'muon')")
            missing = [k for k in required if k not in g]
            if missing:
                raise ValueError(f"param group {i} ({kind}): missing keys {missing}")
            if kind == "muon":
                shapes = {tuple(p.shape) for p in g["params"]}
                if len(shapes) > 1 or any(len(s) != 2 for s in shapes):
                    raise ValueError(f"param group {i} (muon): needs 2-D params of one shape, got {sorted(shapes)}")
        super().__init__(param_groups, defaults={})
        if compile is None:  # compiled kernels pay off on GPU; on CPU the compile time dominates
            compile = any(p.is_cuda for g in self.param_groups for p in g["params"])
        self._compile = compile
        t = lambda: torch.tensor(0.0, dtype=torch.float32, device="cpu")  # noqa: E731
        self._adamw_step_t, self._adamw_lr_t, self._adamw_beta1_t = t(), t(), t()
        self._adamw_beta2_t, self._adamw_eps_t, self._adamw_wd_t = t(), t(), t()
        self._muon_momentum_t, self._muon_lr_t, self._muon_wd_t, self._muon_beta2_t = t(), t(), t(), t()

    # --- the single place hyperparameters meet the kernels -------------------------------
    def _adamw_update(self, p_slice: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p_slice)
            state["exp_avg_sq"] = torch.zeros_like(p_slice)
        state["step"] += 1
        self._adamw_step_t.fill_(state["step"])
        self._adamw_lr_t.fill_(group["lr"])
        self._adamw_beta1_t.fill_(group["betas"][0])
        self._adamw_beta2_t.fill_(group["betas"][1])
        self._adamw_eps_t.fill_(group["eps"])
        self._adamw_wd_t.fill_(group["weight_decay"])
        _kernel(adamw_step_fused, self._compile)(
            p_slice, grad, state["exp_avg"], state["exp_avg_sq"], self._adamw_step_t, self._adamw_lr_t,
            self._adamw_beta1_t, self._adamw_beta2_t, self._adamw_eps_t, self._adamw_wd_t)

    def _muon_update(self, stacked_grads: Tensor, stacked_params: Tensor, momentum_buffer: Tensor,
                     second_momentum_buffer: Tensor, group: dict) -> None:
        rows, cols = stacked_params.shape[-2:]
        self._muon_momentum_t.fill_(group["momentum"])
        self._muon_beta2_t.fill_(group["beta2"] if group["beta2"] is not None else 0.0)
        self._muon_lr_t.fill_(group["lr"] * max(1.0, rows / cols) ** 0.5)
        self._muon_wd_t.fill_(group["weight_decay"])
        _kernel(muon_step_fused, self._compile)(
            stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer, self._muon_momentum_t,
            self._muon_lr_t, self._muon_wd_t, self._muon_beta2_t, group["ns_steps"], -1 if rows >= cols else -2)

    @staticmethod
    def _stacked_grads(group: dict, gi: int) -> list[Tensor]:
        grads = [p.grad for p in group["params"]]
        if any(g is None for g in grads):
            missing = [i for i, g in enumerate(grads) if g is None]
            raise RuntimeError(f"muon param group {gi}: params {missing} have no grad; every matrix in a "
                               "muon group must take part in the loss")
        return grads

    # --- world-size independent state --------------------------------------------------
    def _group_meta(self) -> list[dict]:
        """param_groups as torch saves them: hyperparameters plus global param indices."""
        out, start = [], 0
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = list(range(start, start + len(g["params"])))
            d["param_shapes"] = [list(p.shape) for p in g["params"]]
            start += len(g["params"])
            out.append(d)
        return out

    def _check_and_load_groups(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            fmt = state_dict.get("format") if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"optimizer state has format {fmt!r}, expected {STATE_FORMAT!r} "
                             "(was it written by a different optimizer or an older nanopipe?)")
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved)} param groups, this optimizer has {len(self.param_groups)} "
                             "(different model architecture?)")
        for i, (g, s) in enumerate(zip(self.param_groups, saved)):
            shapes = [list(p.shape) for p in g["params"]]
            if s.get("kind") != g["kind"] or s.get("param_shapes") != shapes:
                raise ValueError(f"optimizer param group {i}: saved kind={s.get('kind')!r} shapes={s.get('param_shapes')} "
                                 f"but this model has kind={g['kind']!r} shapes={shapes}")
        for g, s in zip(self.param_groups, saved):
            for k, v in s.items():
                if k not in ("params", "param_shapes"):
                    g[k] = tuple(v) if k == "betas" else v
        self.state.clear()

    @staticmethod
    def _to_param(t: Tensor, like: Tensor) -> Tensor:
        return t.to(device=like.device, dtype=like.dtype, copy=True).contiguous()  # never alias the loaded dict


class MuonAdamW(_MuonAdamWBase):
    """Single-process optimizer. `MuonAdamW(param_groups, compile=None)`; compile defaults to
    True when the params live on CUDA."""

    @torch.no_grad()
    def step(self):
        for gi, group in enumerate(self.param_groups):
            if group["kind"] == "adamw":
                for p in group["params"]:
                    if p.grad is not None:
                        self._adamw_update(p, p.grad, self.state[p], group)
            elif group["kind"] == "muon":
                params: list[Tensor] = group["params"]
                if not params:
                    continue
                state = self.state[params[0]]  # the whole group's state lives on its first param
                if "momentum_buffer" not in state:
                    p = params[0]
                    state["momentum_buffer"] = torch.zeros(len(params), *p.shape, dtype=p.dtype, device=p.device)
                    state["second_momentum_buffer"] = torch.zeros(_muon_state_shape(len(params), p.shape),
                                                                  dtype=p.dtype, device=p.device)
                stacked_grads = torch.stack(self._stacked_grads(group, gi))
                stacked_params = torch.stack(params)
                self._muon_update(stacked_grads, stacked_params, state["momentum_buffer"],
                                  state["second_momentum_buffer"], group)
                torch._foreach_copy_(params, list(stacked_params.unbind(0)))
            else:
                raise ValueError(f"Unknown optimizer kind: {group['kind']}")

    def state_dict(self) -> dict:
        state, idx = {}, 0
        for g in self.param_groups:
            for p in g["params"]:
                if self.state.get(p):
                    state[idx] = dict(self.state[p])
                idx += 1
        return {"format": STATE_FORMAT, "state": state, "param_groups": self._group_meta()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._check_and_load_groups(state_dict)
        saved_state, idx = state_dict["state"], 0
        for g in self.param_groups:
            for p in g["params"]:
                s = saved_state.get(idx)
                if s:
                    self.state[p] = {k: (self._to_param(v, p) if torch.is_tensor(v) else v) for k, v in s.items()}
                idx += 1


# -----------------------------------------------------------------------------
# Distributed


def _reduce_scatter(out: Tensor, inp: Tensor, op):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, op=op, async_op=True)


def _all_gather(out: Tensor, inp: Tensor, async_op: bool = True):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, async_op=async_op)


class DistMuonAdamW(_MuonAdamWBase):
    """ZeRO-2-style optimizer used INSTEAD of DDP: call step() after a local backward and it
    averages gradients itself.

    - AdamW params with numel < 1024 (the lambdas): all-reduce(AVG), replicated update and state.
    - Larger AdamW params (wte, lm_head, value embeds): reduce-scatter rows, each rank updates and
      keeps state for rows [r*n/W, (r+1)*n/W), then all-gather the parameter.
    - Muon group of K matrices: ranks own ceil(K/W) consecutive matrices (zero padded), receive their
      averaged grads by reduce-scatter, update them, and all-gather the stack back.
    Communication is launched asynchronously group by group so it overlaps with compute.
    """

    def __init__(self, param_groups: list[dict], compile: bool | None = None):
        super().__init__(param_groups, compile=compile)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistMuonAdamW needs an initialised torch.distributed process group "
                               "(launch with torchrun, or use MuonAdamW for one process)")
        world = dist.get_world_size()
        for gi, g in enumerate(self.param_groups):
            if g["kind"] != "adamw":
                continue
            for p in g["params"]:
                if p.numel() >= SMALL_PARAM_NUMEL and p.shape[0] % world != 0:
                    raise ValueError(f"DistMuonAdamW: param group {gi} has a param of shape {tuple(p.shape)} whose first "
                                     f"dim is not divisible by world size {world}; pick a world size dividing "
                                     f"{p.shape[0]} (padded vocab is a multiple of 64)")

    @staticmethod
    def _owned(num_params: int, world: int, rank: int) -> tuple[int, int, int]:
        chunk = math.ceil(num_params / world)
        start = rank * chunk
        return chunk, start, min(chunk, max(0, num_params - start))

    def _adamw_grads(self, group: dict, gi: int) -> list[Tensor]:
        grads = [p.grad for p in group["params"]]
        if any(g is None for g in grads):
            raise RuntimeError(f"adamw param group {gi} has params without grad; DistMuonAdamW needs a grad "
                               "for every param on every rank (all ranks must run the same graph)")
        return grads

    @torch.no_grad()
    def step(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        # Phase 1: launch every reduction.
        infos = []
        for gi, group in enumerate(self.param_groups):
            if group["kind"] == "adamw":
                per_param = []
                for p, grad in zip(group["params"], self._adamw_grads(group, gi)):
                    if p.numel() < SMALL_PARAM_NUMEL:
                        work = dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True)
                        per_param.append((work, grad, True))
                    else:
                        rows = p.shape[0] // world
                        grad_slice = torch.empty_like(grad[:rows])
                        per_param.append((_reduce_scatter(grad_slice, grad, dist.ReduceOp.AVG), grad_slice, False))
                infos.append(per_param)
            elif group["kind"] == "muon":
                params = group["params"]
                chunk, _, _ = self._owned(len(params), world, rank)
                p = params[0]
                stacked = torch.zeros(chunk * world, *p.shape, dtype=p.dtype, device=p.device)
                stacked[:len(params)].copy_(torch.stack(self._stacked_grads(group, gi)))
                grad_chunk = torch.empty(chunk, *p.shape, dtype=p.dtype, device=p.device)
                infos.append((_reduce_scatter(grad_chunk, stacked, dist.ReduceOp.AVG), grad_chunk, stacked))
            else:
                raise ValueError(f"Unknown optimizer kind: {group['kind']}")
        # Phase 2: update what this rank owns, launch the gathers.
        gathers = []
        for group, info in zip(self.param_groups, infos):
            if group["kind"] == "adamw":
                for p, (work, grad_slice, small) in zip(group["params"], info):
                    work.wait()
                    if small:
                        self._adamw_update(p, grad_slice, self.state[p], group)
                    else:
                        rows = p.shape[0] // world
                        p_slice = p[rank * rows:(rank + 1) * rows]
                        self._adamw_update(p_slice, grad_slice, self.state[p], group)
                        gathers.append((_all_gather(p, p_slice), None, None))
            else:
                work, grad_chunk, stacked = info
                work.wait()
                params = group["params"]
                chunk, start, owned = self._owned(len(params), world, rank)
                p = params[0]
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros(chunk, *p.shape, dtype=p.dtype, device=p.device)
                    state["second_momentum_buffer"] = torch.zeros(_muon_state_shape(chunk, p.shape),
                                                                  dtype=p.dtype, device=p.device)
                updated = torch.zeros(chunk, *p.shape, dtype=p.dtype, device=p.device)
                if owned > 0:
                    updated[:owned].copy_(torch.stack(params[start:start + owned]))
                    mbuf, sbuf = state["momentum_buffer"], state["second_momentum_buffer"]
                    # Slices of the state/param buffers are views: the kernel updates them in place.
                    self._muon_update(grad_chunk[:owned], updated[:owned], mbuf[:owned], sbuf[:owned], group)
                # Reuse the stacked-grads buffer as the gather target.
                gathers.append((_all_gather(stacked, updated), stacked, params))
        # Phase 3: wait, copy gathered matrices back.
        for work, stacked, params in gathers:
            work.wait()
            if params is not None:
                torch._foreach_copy_(params, list(stacked[:len(params)].unbind(0)))

    # --- world-size independent state (collectives: every rank must call) ----------------
    def state_dict(self, rank0_only: bool = False) -> dict | None:
        """Full, unsharded state on CPU, gathered one tensor at a time so GPU memory grows by one
        parameter's state at most. With rank0_only, other ranks return None (they still take part)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        keep = (not rank0_only) or rank == 0
        state, idx = {}, 0
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "adamw":
                for p in params:
                    s = self.state.get(p)
                    if s:
                        if p.numel() < SMALL_PARAM_NUMEL:
                            full = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                        else:
                            full = {"step": s["step"]}
                            for k in ("exp_avg", "exp_avg_sq"):
                                buf = torch.empty(p.shape, dtype=s[k].dtype, device=s[k].device)
                                _all_gather(buf, s[k].contiguous(), async_op=False)
                                full[k] = buf.cpu()
                        if keep:
                            state[idx] = full
                    idx += 1
            else:
                s = self.state.get(params[0]) if params else None
                if s:
                    full = {}
                    for k in ("momentum_buffer", "second_momentum_buffer"):
                        local = s[k]
                        buf = torch.empty(local.shape[0] * world, *local.shape[1:], dtype=local.dtype, device=local.device)
                        _all_gather(buf, local.contiguous(), async_op=False)
                        full[k] = buf[:len(params)].cpu()
                    if keep:
                        state[idx] = full
                idx += len(params)
        if not keep:
            return None
        return {"format": STATE_FORMAT, "state": state, "param_groups": self._group_meta()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full state (from any world size) and keep this rank's shard. No communication."""
        self._check_and_load_groups(state_dict)
        rank, world = dist.get_rank(), dist.get_world_size()
        saved_state, idx = state_dict["state"], 0
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "adamw":
                for p in params:
                    s = saved_state.get(idx)
                    if s:
                        if p.numel() < SMALL_PARAM_NUMEL:
                            self.state[p] = {k: (self._to_param(v, p) if torch.is_tensor(v) else v) for k, v in s.items()}
                        else:
                            rows = p.shape[0] // world
                            self.state[p] = {"step": s["step"], **{
                                k: self._to_param(s[k][rank * rows:(rank + 1) * rows], p) for k in ("exp_avg", "exp_avg_sq")}}
                    idx += 1
            else:
                s = saved_state.get(idx)
                if s and params:
                    p = params[0]
                    chunk, start, owned = self._owned(len(params), world, rank)
                    new = {}
                    for k in ("momentum_buffer", "second_momentum_buffer"):
                        full = s[k]
                        buf = torch.zeros(chunk, *full.shape[1:], dtype=p.dtype, device=p.device)
                        if owned > 0:
                            buf[:owned].copy_(full[start:start + owned])
                        new[k] = buf
                    self.state[p] = new
                idx += len(params)
