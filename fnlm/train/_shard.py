"""Sharded data parallelism (ZeRO / FSDP semantics) for parameter pytrees, on flattened vectors.

::

    rank, world, device = init_distributed(timeout=300)      # torchrun; gloo on CPU, NCCL on GPU
    sharding = Sharding(params, level=3)                      # the layout; params' values not kept
    held = sharding.shard(params); del params                 # what this worker holds
    opt = optim.adamw(schedule, weight_decay=0.1)             # no clip_by_global_norm: max_grad_norm=
    opt_state = sharding.init(opt, held)
    step = make_sharded_train_step(loss_fn, opt, sharding, max_grad_norm=1.0)
    with worker_guard(300):
        for i, batch in enumerate(global_batches):
            held, opt_state, metrics = step(held, opt_state, sharding.split_batch(batch), fold_in(key, i))
            save_sharded(ckpt_dir, sharding, held, opt_state, i + 1, key)    # every worker
    params = sharding.unshard(held)                           # every worker (a collective at level 3)

The parameter tree is flattened into one vector per group (:func:`fnlm.tree.ravel`; by default one
group per layer and decay class, :func:`shard_groups`), each vector ``v_g`` of ``n_g`` elements is
zero-padded to ``N s_g`` with ``s_g = ceil(n_g / N)`` over ``N`` workers, and worker ``r`` owns the
slice ``v_g[r s_g : (r+1) s_g]``. One step on worker ``r`` (its share ``B_r`` of the global batch)::

    P_g   = all_gather(p_g^r)                       (level 3 only: parameters are held as shards)
    G_g^r = grad_{P_g} L(unravel(P), B_r, fold_in(key, r))        (padded with zeros to N s_g)
    g_g^r = [all_reduce(G_g) / N]_r   (levels 0, 1)   or   reduce_scatter(G_g)_r / N   (levels 2, 3)
    ||g||^2 = sum_r sum_g ||g_g^r||^2                 (one small all-reduce with the loss and aux)
    g^r  <- g^r * min(1, max_grad_norm / (||g|| + 1e-6))               (when max_grad_norm is set)
    u^r, s^r' = optimizer.update(g^r, s^r, p^r);   p^r' = p^r + u^r   (on the shard only)
    P'_g  = all_gather(p_g^r')                      (levels 1, 2: parameters are held whole)

==========  =================================  ========================  ==========================
level       held between steps, per worker     collectives per step      as
==========  =================================  ========================  ==========================
0           params, optimizer state: whole     all-reduce(G)             DDP (on vectors)
1           params whole, optimizer state 1/N  all-reduce(G), gather(p)  ZeRO-1
2           params whole, optimizer state 1/N  reduce-scatter(G),        ZeRO-2
            (gradients reduce-scattered)       gather(p)
3           params 1/N, optimizer state 1/N    gather(p), reduce-scatter ZeRO-3 / FSDP
==========  =================================  ========================  ==========================

(at level 0 the optimizer runs on the whole vectors, as plain data parallelism). All groups of one
dtype travel in ONE collective (the shards are concatenated, as FSDP2 does per unit), so a step is
two large collectives plus one of a few scalars, whatever the number of groups.

* **Equivalence.** Worker ``r``'s ``loss_fn`` gets ``fold_in(key, r)`` (with ``N > 1``), so ``N``
  workers with equal shares equal ONE process running ``make_train_step(..., accum_steps=N)`` on
  the global batch split into ``N`` micro-batches, up to float rounding (tested at every level for
  GPT-2 with dropout). The optimizer runs on ``{label: shard}`` dicts: element-wise optimizers
  (SGD, Adam, AdamW, their schedules and ``inject_hyperparams``) give the same numbers as on the
  whole tree, and the labels end in ``weight`` / ``other`` so that
  :func:`~fnlm.optim.default_decay_mask` still decays exactly the ``weight`` leaves (as
  :func:`fnlm.optim.flatten`). A transformation that reduces over the whole gradient cannot see it
  from a shard: ``clip_by_global_norm`` inside ``optimizer`` is refused at levels 1-3; pass
  ``max_grad_norm=`` instead, which clips with the global norm above.
* **Level 3 gathers whole, not per layer.** ``loss_fn`` receives an ordinary parameter tree, and
  fnlm's model functions are pure functions of that tree with no hook between layers, so the step
  cannot gather layer ``l`` just before the model reaches it. It gathers every group at the start
  of the forward (one collective) and reduce-scatters every gradient after the backward; the
  gathered weights are saved for the backward by autograd anyway. So level 3 makes the *resident*
  state 1/N (between steps: parameters, gradients and optimizer state), while the peak inside a
  step still holds one whole copy of the parameters and of the gradients. Per-layer gathering
  needs the model to take its layers' parameters lazily (a ``gather(layer)`` callback in
  ``gpt2_hidden``'s loop plus rematerialisation of the gather in the backward), which is the next
  step and not done here; ``docs/scaling.md`` gives the memory of both. The collectives also stay
  *outside* the differentiated function (the gradient is taken with respect to the gathered
  vectors, then reduce-scattered) rather than an all-gather whose backward is a reduce-scatter:
  in torch 2.13 the functional collectives' autograd wrappers (``all_gather_single_autograd``)
  are ``autograd.Function`` s without ``setup_context``, which ``torch.func.grad`` refuses, and a
  custom one with ``setup_context`` works eagerly but dynamo still fails on it under
  ``grad`` ("RuntimeError when making fake tensor call"; tried here), so it could not sit in the
  compiled step.
* **Compiled.** The collectives are the *functional* ones (``torch.distributed._functional_collectives``),
  which dynamo traces, so forward, backward, the collectives, clipping and the optimizer are ONE
  ``fullgraph=True`` graph (gloo on CPU, tested with ``'aot_eager'``; NCCL on GPU, where Inductor
  can overlap them with compute). Eager mode runs the same functions.
* **Resident bytes** (float32, AdamW): ``4 (n + 2n/N)`` per worker at levels 1 and 2, ``4 (3n/N)``
  at level 3, plus at most ``N - 1`` padding elements per group (tested from the tensors held).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.func import grad_and_value

from fnlm import random
from fnlm.optim._flatten import decay_groups
from fnlm.optim._inject import find_hyperparam
from fnlm.optim._transforms import GradientTransformation, apply_updates
from fnlm.train._step import (
    _RESERVED,
    NONFINITE,
    Step,
    _mean_tree,
    compile_fn,
    keep_if_finite,
    param_group,
)
from fnlm.tree import PyTree, flatten_names, ravel, tree_leaves, tree_map

LEVELS = (0, 1, 2, 3)


def shard_groups(name: str) -> str:
    """The default group of a leaf: its layer (:func:`~fnlm.train.param_group`, dots made
    underscores) and its decay class: ``layers.3.attn.q.weight`` -> ``'layers_3.weight'``,
    ``layers.3.norm1.beta`` -> ``'layers_3.other'``, ``tok_embed.weight`` -> ``'tok_embed.weight'``."""
    return f"{param_group(name).replace('.', '_')}.{decay_groups(name)}"


def _nest(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    """``{'layers_0.weight': v}`` -> ``{'layers_0': {'weight': v}}`` (two levels, dicts only)."""
    out: dict[str, Any] = {}
    for label, v in flat.items():
        head, _, tail = label.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = v
        else:
            out[head] = v
    return out


def _contains(obj: Any, qualname: str, seen: set[int] | None = None) -> bool:
    """Whether a function named ``qualname`` (or one of its inner functions) is reachable from
    ``obj`` through closures and the tuples/lists that hold transformations."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if callable(obj) and hasattr(obj, "__qualname__") and hasattr(obj, "__code__"):
        q = obj.__qualname__
        if q == qualname or q.startswith(qualname + ".<locals>"):
            return True
        return any(_contains(c.cell_contents, qualname, seen) for c in (obj.__closure__ or ()) if _cell_ok(c))
    if isinstance(obj, (tuple, list)):
        return any(_contains(x, qualname, seen) for x in obj)
    return False


def _cell_ok(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _wait(x: Tensor) -> Tensor:
    from torch.distributed import _functional_collectives as fc

    return fc.wait_tensor(x)


class Sharding:
    """The layout of a parameter tree over the workers of a process group, and the maps between
    the tree and what each worker holds (see the module docstring).

    ``Sharding(params, level, group=shard_groups, process_group=None)``: ``params`` fixes the tree's
    structure, shapes and dtypes (its values are not kept). The rank and the number of workers
    ``N`` are the process group's (1 without one: every method then works in a single process).

    * ``shard(params) -> held``: what this worker holds, ``{group: {'weight'|'other': vector}}``:
      padded whole vectors ``[N s_g]`` at levels 0-2, this worker's slice ``[s_g]`` at level 3
      (fresh tensors, so a dropped tree frees its memory).
    * ``init(optimizer, held)``: the optimizer state over this worker's shard (whole at level 0).
    * ``unshard(held) -> params``: the whole tree (at level 3 a collective: call it on every worker).
    * ``local(held)``: this worker's shard of each vector; ``split_batch(batch)``: its rows of a
      global batch (leading axis divisible by ``N``).
    """

    def __init__(
        self, params: PyTree, level: int, *, group: Callable[[str], str] = shard_groups, process_group: Any = None
    ):
        if level not in LEVELS:
            raise ValueError(f"sharding level must be one of {LEVELS}, got {level!r}")
        self.level, self.group, self.process_group = level, group, process_group
        if dist.is_available() and dist.is_initialized():
            pg = dist.group.WORLD if process_group is None else process_group
            self.rank, self.world = dist.get_rank(pg), dist.get_world_size(pg)
            self._pg = pg
        else:
            self.rank, self.world, self._pg = 0, 1, None
        leaves = tree_leaves(params)
        if not leaves or not all(isinstance(x, Tensor) for x in leaves):
            raise TypeError("Sharding: params must be a non-empty tree of tensors")
        # the layout from meta tensors: no copy of the model (ravel's unravel keeps only sizes and shapes)
        vectors, self._unravel = ravel(tree_map(lambda x: torch.empty_like(x, device="meta"), params), group)
        for label in vectors:
            head, _, tail = label.partition(".")
            if not head or "." in tail:
                raise ValueError(
                    f"sharding: group label {label!r} must be 'name' or 'name.leaf' "
                    "(one dot at most; the last part decides weight decay)"
                )
        order = list(flatten_names(_nest({g: 0 for g in vectors})))  # the order flatten_names gives
        self.labels: list[str] = order
        self.sizes = {g: vectors[g].numel() for g in order}
        self.shard_sizes = {g: math.ceil(n / self.world) for g, n in self.sizes.items()}
        self.dtypes = {g: vectors[g].dtype for g in order}
        self.device = leaves[0].device
        self.names = list(flatten_names(params))
        del vectors

    # ----------------------------------------------------------------------------- layout
    def padded_size(self, label: str) -> int:
        return self.shard_sizes[label] * self.world

    def __repr__(self) -> str:
        n = sum(self.sizes.values())
        return (
            f"Sharding(level={self.level}, worker {self.rank} of {self.world}, {len(self.labels)} groups, "
            f"{n} parameters, {sum(self.padded_size(g) for g in self.labels) - n} padding)"
        )

    def _pad(self, v: Tensor, label: str) -> Tensor:
        extra = self.padded_size(label) - v.numel()
        return torch.nn.functional.pad(v, (0, extra)) if extra else v

    def _slice(self, v: Tensor, label: str) -> Tensor:
        s = self.shard_sizes[label]
        return v[self.rank * s : (self.rank + 1) * s]

    def check_held(self, held: PyTree, what: str = "params") -> dict[str, Tensor]:
        """The flat ``{label: vector}`` of ``held``, checked against the layout (one-line errors)."""
        flat = flatten_names(held) if isinstance(held, Mapping) else None
        if flat is None or list(flat) != self.labels:
            got = sorted(flat) if flat is not None else type(held).__name__
            raise ValueError(
                f"sharded step: {what} must be what Sharding.shard returns, with groups "
                f"{self.labels[:4]}...; got {got if isinstance(got, str) else got[:4]}"
            )
        for g, v in flat.items():
            want = self.shard_sizes[g] if self.level == 3 else self.padded_size(g)
            if not isinstance(v, Tensor) or tuple(v.shape) != (want,):
                raise ValueError(
                    f"sharded step: {what} group {g!r} must be a vector of {want} elements at "
                    f"level {self.level}, got {tuple(getattr(v, 'shape', ()))}"
                )
        return flat

    # ----------------------------------------------------------------------------- collectives
    def _buckets(self) -> dict[torch.dtype, list[str]]:
        out: dict[torch.dtype, list[str]] = {}
        for g in self.labels:
            out.setdefault(self.dtypes[g], []).append(g)
        return out

    def all_gather(self, local: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{g: [N s_g]}`` from every worker's ``{g: [s_g]}``: one all-gather per dtype."""
        if self.world == 1:
            return dict(local)
        from torch.distributed import _functional_collectives as fc

        out = {}
        for labels in self._buckets().values():
            buf = torch.cat([local[g] for g in labels])
            rows = _wait(fc.all_gather_single(buf, 0, self._pg)).view(self.world, -1)
            off = 0
            for g in labels:
                s = self.shard_sizes[g]
                out[g] = rows[:, off : off + s].reshape(-1)
                off += s
        return {g: out[g] for g in self.labels}

    def reduce_scatter_mean(self, full: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{g: [s_g]}``, this worker's slice of ``(1/N) sum_r full_r``: one reduce-scatter per dtype."""
        if self.world == 1:
            return dict(full)
        from torch.distributed import _functional_collectives as fc

        out = {}
        for labels in self._buckets().values():
            buf = torch.cat([full[g].view(self.world, -1) for g in labels], dim=1).reshape(-1)
            mine = _wait(fc.reduce_scatter_single(buf, "sum", 0, self._pg)) / self.world
            off = 0
            for g in labels:
                s = self.shard_sizes[g]
                out[g] = mine[off : off + s]
                off += s
        return {g: out[g] for g in self.labels}

    def all_reduce_mean(self, full: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{g: (1/N) sum_r full_r[g]}``: one all-reduce per dtype."""
        if self.world == 1:
            return dict(full)
        from torch.distributed import _functional_collectives as fc

        out = {}
        for labels in self._buckets().values():
            buf = _wait(fc.all_reduce(torch.cat([full[g] for g in labels]), "sum", self._pg)) / self.world
            out.update(zip(labels, torch.split(buf, [full[g].numel() for g in labels])))
        return {g: out[g] for g in self.labels}

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        from torch.distributed import _functional_collectives as fc

        return _wait(fc.all_reduce(x, "sum", self._pg))

    # ----------------------------------------------------------------------------- tree <-> held
    def shard(self, params: PyTree) -> dict[str, Any]:
        """What this worker holds of ``params`` (see the class docstring)."""
        vectors, _ = ravel(params, self.group)
        if set(vectors) != set(self.labels):
            raise ValueError(
                f"Sharding.shard: params have groups {sorted(vectors)[:4]}..., the layout {sorted(self.labels)[:4]}..."
            )
        out = {}
        for g in self.labels:
            v = self._pad(vectors[g].detach(), g)
            out[g] = self._slice(v, g).clone() if self.level == 3 else v.clone()
        return _nest(out)

    def full_vectors(self, held: PyTree) -> dict[str, Tensor]:
        """``{g: [N s_g]}`` whole padded vectors (an all-gather at level 3)."""
        flat = self.check_held(held)
        return self.all_gather(flat) if self.level == 3 else dict(flat)

    def unshard(self, held: PyTree) -> PyTree:
        """The whole parameter tree (a collective at level 3: every worker must call it)."""
        full = self.full_vectors(held)
        return self._unravel({g: full[g][: self.sizes[g]] for g in full})

    def local(self, held: PyTree) -> dict[str, Any]:
        """This worker's shard ``{group: {...: [s_g]}}`` of each vector."""
        flat = self.check_held(held)
        return _nest(flat if self.level == 3 else {g: self._slice(v, g) for g, v in flat.items()})

    def init(self, optimizer: GradientTransformation, held: PyTree) -> PyTree:
        """``optimizer.init`` over this worker's shard (over the whole vectors at level 0)."""
        return optimizer.init(held if self.level == 0 else self.local(held))

    def split_batch(self, batch: PyTree) -> PyTree:
        """This worker's rows ``[r b/N, (r+1) b/N)`` of every leaf of a global batch."""

        def part(x):
            if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[0] % self.world:
                raise ValueError(
                    f"split_batch: every batch leaf needs a leading axis divisible by {self.world} "
                    f"workers, got shape {tuple(getattr(x, 'shape', ()))}"
                )
            b = x.shape[0] // self.world
            return x[self.rank * b : (self.rank + 1) * b]

        return tree_map(part, batch)


def sharded_step_fn(
    loss_fn: Callable,
    optimizer: GradientTransformation,
    sharding: Sharding,
    *,
    accum_steps: int = 1,
    autocast_dtype: torch.dtype | None = None,
    nonfinite: str = "raise",
    max_grad_norm: float | None = None,
) -> Callable:
    """The pure, uncompiled sharded step ``(held, opt_state, batch, key) -> (held, opt_state,
    metrics)`` that :func:`make_sharded_train_step` compiles."""
    sh = sharding
    clip = None if not max_grad_norm or math.isinf(max_grad_norm) else float(max_grad_norm)

    def forward(vecs, batch, key):
        params = sh._unravel(vecs)
        if autocast_dtype is None:
            loss, aux = loss_fn(params, batch, key)
        else:
            with torch.autocast(device_type=sh.device.type, dtype=autocast_dtype):
                loss, aux = loss_fn(params, batch, key)
        aux = dict(aux or {})
        bad = [k for k in aux if k in _RESERVED]
        if bad:
            raise ValueError(f"loss_fn aux names {bad} clash with the step's own metrics {_RESERVED}")
        return loss.float(), {k: a.float() for k, a in aux.items()}

    grad_fn = grad_and_value(forward, has_aux=True)

    def step(held, opt_state, batch, key):
        flat = dict(flatten_names(held))
        full = sh.all_gather(flat) if sh.level == 3 else flat
        vecs = {g: full[g][: sh.sizes[g]] for g in sh.labels}
        if sh.world > 1:
            key = random.fold_in(key, sh.rank)
        if accum_steps == 1:
            grads, (loss, aux) = grad_fn(vecs, batch, key)
        else:
            parts = [grad_fn(vecs, tree_map(lambda x: x[i], batch), random.fold_in(key, i)) for i in range(accum_steps)]
            grads = _mean_tree([g for g, _ in parts])
            loss = _mean_tree([la[0] for _, la in parts])
            aux = _mean_tree([la[1] for _, la in parts])
        grads = {g: sh._pad(grads[g], g) for g in sh.labels}
        if sh.level == 0:
            g_local = sh.all_reduce_mean(grads)
        elif sh.level == 1:
            g_local = {g: sh._slice(v, g) for g, v in sh.all_reduce_mean(grads).items()}
        else:
            g_local = sh.reduce_scatter_mean(grads)
        # one small all-reduce: the loss, aux and each group's squared gradient norm on this shard
        names = list(aux)
        sq = torch.stack([g_local[g].float().pow(2).sum() for g in sh.labels])
        if sh.level == 0:  # whole gradients on every worker: their norms need no reduction
            red = sh.all_reduce_sum(torch.stack([loss, *[aux[k] for k in names]])) / sh.world
        else:
            red = sh.all_reduce_sum(torch.cat([torch.stack([loss, *[aux[k] for k in names]]) / sh.world, sq]))
            sq = red[1 + len(names) :]
        loss, aux = red[0], {k: red[1 + i] for i, k in enumerate(names)}
        grads_finite = torch.isfinite(sq)
        grad_norm = torch.sqrt(sq.sum())
        finite = torch.isfinite(loss) & grads_finite.all()
        if clip is not None:
            coef = torch.clamp(clip / (grad_norm + 1e-6), max=1.0)
            g_local = {g: v * coef.to(v.dtype) for g, v in g_local.items()}
        p_local = flat if sh.level in (0, 3) else {g: sh._slice(v, g) for g, v in flat.items()}
        updates, new_state = optimizer.update(_nest(g_local), opt_state, _nest(p_local))
        new_local = flatten_names(apply_updates(_nest(p_local), updates))
        if nonfinite == "skip":
            new_local = keep_if_finite(finite, new_local, p_local)
            new_state = keep_if_finite(finite, new_state, opt_state)
        new_held = sh.all_gather(new_local) if sh.level in (1, 2) else new_local
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "grads_finite": grads_finite}
        lr = find_hyperparam(new_state, "lr")
        if lr is not None:
            metrics["lr"] = lr
        metrics.update(aux)
        return _nest(new_held), new_state, metrics

    return step


def make_sharded_train_step(
    loss_fn: Callable,
    optimizer: GradientTransformation,
    sharding: Sharding,
    *,
    max_grad_norm: float | None = None,
    compile: bool | str | Callable = True,
    accum_steps: int = 1,
    autocast_dtype: torch.dtype | None = None,
    nonfinite: str = "raise",
    dynamic: bool = False,
    compile_options: Mapping[str, Any] | None = None,
    max_shapes: int = 16,
    deterministic: bool = False,
    seed_global_rng: bool = False,
) -> Step:
    """A sharded training step ``step(held, opt_state, batch, key) -> (held, opt_state, metrics)``:
    :func:`~fnlm.train.make_train_step` for ``N`` workers at ``sharding.level`` (module docstring).

    ``held = sharding.shard(params)``, ``opt_state = sharding.init(optimizer, held)``, ``batch``
    is this worker's share (``sharding.split_batch``), ``key`` the same on every worker (the step
    folds the rank in). ``max_grad_norm``: clip by the global norm of the averaged gradient, as
    ``clip_by_global_norm`` (which ``optimizer`` must not contain at levels 1-3). ``metrics``:
    ``loss`` and aux averaged over workers, ``grad_norm`` (before clipping), ``finite``,
    ``grads_finite`` (one flag per group, ``sharding.labels`` order), ``lr``. The other keywords
    are :func:`~fnlm.train.make_train_step`'s. Every worker must call the step the same number of
    times (it holds collectives).
    """
    if not isinstance(sharding, Sharding):
        raise TypeError(f"sharding must be a fnlm.train.Sharding, got {type(sharding).__name__}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(f"optimizer must be a GradientTransformation, got {type(optimizer).__name__}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm >= 0):
        raise ValueError(f"max_grad_norm must be a non-negative number or None, got {max_grad_norm!r}")
    if sharding.level > 0 and _contains(optimizer.update, "clip_by_global_norm"):
        raise ValueError(
            f"sharding level {sharding.level}: the optimizer contains clip_by_global_norm, which "
            "would see one shard's norm; remove it and pass max_grad_norm= to the sharded step"
        )
    pure = sharded_step_fn(
        loss_fn,
        optimizer,
        sharding,
        accum_steps=accum_steps,
        autocast_dtype=autocast_dtype,
        nonfinite=nonfinite,
        max_grad_norm=max_grad_norm,
    )
    compiled = compile_fn(
        pure, compile=compile, dynamic=dynamic, compile_options=compile_options, max_shapes=max_shapes
    )

    def check_args(held, opt_state, batch, key):
        random._check_key(key)
        sharding.check_held(held)
        if accum_steps > 1:
            for name, x in flatten_names(batch).items():
                if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[0] != accum_steps:
                    raise ValueError(
                        f"accum_steps={accum_steps}: batch leaf {name!r} must have a leading "
                        f"micro-batch axis of size {accum_steps}, got shape "
                        f"{tuple(getattr(x, 'shape', ()))}"
                    )

    return Step(
        pure,
        compiled,
        check_args=check_args,
        nonfinite=nonfinite,
        deterministic=deterministic,
        seed_from=3 if seed_global_rng else None,
    )


def resident_bytes(*trees: PyTree) -> int:
    """Bytes of the distinct storages behind the tensor leaves of ``trees`` (what they keep alive)."""
    seen: dict[int, int] = {}
    for t in trees:
        for x in tree_leaves(t):
            if isinstance(x, Tensor):
                st = x.untyped_storage()
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def shard_costs(
    n: int, level: int, world: int, *, param_bytes: int = 4, state_bytes: int = 8, grad_bytes: int | None = None
) -> dict[str, float]:
    """The per-worker costs of one step of this module's sharded training of ``n`` parameters over
    ``world`` workers at ``level``, in bytes (activations excluded; docs/scaling.md tabulates them).

    With ``P = param_bytes n`` (float32 master weights: 4), ``S = state_bytes n`` (AdamW's two
    moments: 8), ``G = grad_bytes n`` (gradients in the parameters' dtype), ``f = (N-1)/N``:

    * ``resident`` (held between steps): ``P + S`` (level 0), ``P + S/N`` (1, 2), ``(P + S)/N`` (3);
    * ``transient`` (alive inside the step on top of it): the whole local gradient ``G``, the
      concatenated buffer the collective sends ``G`` (Inductor may write the gradient straight into
      it), the gathered parameters ``P`` at level 3, and the new state, as big as ``resident``
      (the step is pure: its inputs are not donated, old and new state coexist until the caller
      drops the old);
    * ``sent`` (ring collectives, per worker): all-reduce ``2fG``, reduce-scatter ``fG``,
      all-gather ``fP``: ``2fG`` (0), ``2fG + fP`` (1), ``fG + fP`` (2, 3).
    """
    if level not in LEVELS:
        raise ValueError(f"sharding level must be one of {LEVELS}, got {level!r}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    N, f = world, (world - 1) / world
    P, S = param_bytes * n, state_bytes * n
    G = (param_bytes if grad_bytes is None else grad_bytes) * n
    resident = {0: P + S, 1: P + S / N, 2: P + S / N, 3: (P + S) / N}[level]
    transient = 2 * G + (P if level == 3 else 0) + resident
    sent = {0: 2 * f * G, 1: 2 * f * G + f * P, 2: f * G + f * P, 3: f * G + f * P}[level]
    return {"resident": resident, "transient": transient, "peak": resident + transient, "sent": sent}
