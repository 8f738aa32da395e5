"""A whole training step as one pure function, compiled into one graph.

::

    step = make_train_step(loss_fn, optimizer)            # loss_fn(params, batch, key) -> (loss, aux)
    for batch in data:
        key, sub = random.split(key)
        params, opt_state, metrics = step(params, opt_state, batch, sub)

One call computes, inside a single ``torch.compile(fullgraph=True)`` graph::

    (g_i, (L_i, aux_i)) = grad_and_value(loss_fn)(params, batch_i, fold_in(key, i))   i = 0..k-1
    g   = (1/k) sum_i g_i        L = (1/k) sum_i L_i        aux = (1/k) sum_i aux_i
    g   = grad_sync(g)                                      (optional all-reduce, data parallel)
    ok  = isfinite(L) and isfinite(g_j) for every leaf j
    u, s' = optimizer.update(g, s, params);   params' = params + u
    (skip mode)  params', s' = where(ok, params', params), where(ok, s', s)

and returns ``metrics = {'loss', 'grad_norm' (= ||g||_2 before clipping), 'lr' (when the optimizer
state holds it: :func:`fnlm.optim.inject_hyperparams`), 'finite', 'grads_finite' (one flag per leaf,
flatten order), **aux}``.

* **Purity.** Params, optimizer state (step count included), batch and key are all tensors, so
  the graph has no Python state; the same shapes never recompile (tested). The learning rate is
  computed *inside* from the step count in the optimizer state, and kept there.
* **Gradient accumulation** (``accum_steps=k``): every batch leaf has a leading micro-batch axis
  ``[k, b, ...]``; the loop over micro-batches is unrolled in the graph (compile time grows with
  ``k``, memory does not). With equal micro-batches and a mean loss, the result equals one step on
  the whole ``[k*b, ...]`` batch. Micro-batch ``i`` gets the dropout key ``fold_in(key, i)``;
  with ``k = 1`` there is no micro axis and ``key`` is passed to ``loss_fn`` unchanged.
* **Mixed precision** (``autocast_dtype=torch.bfloat16``): the forward (``loss_fn``) runs under
  ``torch.autocast(device_type=<params' device>, dtype)``; the loss is cast to float32 and the
  backward, the gradients, the optimizer and the params stay in the params' dtype (float32 master
  weights). Meant for GPUs; it also runs on CPU (bf16 matmuls), usually not faster there.
* **Non-finite values** are detected in the graph without data-dependent control flow. After the
  call the eager wrapper reads the flags: ``nonfinite='raise'`` raises ``FloatingPointError``
  naming the step and the parameter groups (``encoder.layers.3``) whose gradients are not
  finite; ``'skip'`` keeps params and optimizer state unchanged (the ``torch.where`` above, so it
  also works per member under ``vmap``) and warns; ``'ignore'`` does not look (no host sync).
* **float16 loss scaling**: with an optimizer wrapped in :func:`fnlm.optim.dynamic_loss_scale`
  the step differentiates ``loss * S`` (``S`` from the optimizer state), the wrapper unscales and
  skips overflowing updates; ``metrics['finite']`` then checks the loss only, ``'overflow'`` says
  a step was skipped, ``'loss_scale'`` is the ``S`` it used and ``'grad_norm'`` is unscaled.
* **Shapes.** ``dynamic=False`` (default) compiles static shapes: one graph per distinct batch
  shape, so pad sequences to a few fixed lengths (buckets, e.g. 64/128/256/512), each compiled
  once. :func:`make_train_step` raises dynamo's per-function recompile limit to ``max_shapes``
  (default 16) so that all buckets stay compiled. ``dynamic=True`` compiles one graph with
  symbolic shapes instead (fewer compiles, sometimes slower kernels); note that dynamo assumes
  two sizes equal in the first call stay equal ("duck sizing"), so a first batch whose length
  equals a model width (e.g. 384 tokens with ``d_model = 384``) costs one more compile later.
* **Compile time.** fnlm's dropout masks are a counter-based integer hash (``fnlm.random``): 50+
  integer ops per element that Inductor by default inlines into every consumer, re-tracing the
  hash chain exponentially (minutes per model). :data:`COMPILE_OPTIONS` lowers Inductor's
  ``realize_opcount_threshold`` so that such chains are stored instead (compile in seconds; the
  hash still fuses into one kernel). They also cap Inductor's fusion search: a buffer read by many
  kernels (the clip factor, the step count: every optimizer update reads them) made it try up to 64
  pairings per kernel; 4 shortened the cold compile of the MiniLM step here with the
  same step time (empty cache, one process per setting; ``docs/benchmarks.md``, "Cold compile").
  :func:`compile_fn` applies them; use it for your own code too.
"""

from __future__ import annotations

import contextlib
import itertools
import types
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.func import grad_and_value

from fnlm import random
from fnlm.optim._inject import find_hyperparam
from fnlm.optim._loss_scale import find_loss_scale
from fnlm.optim._transforms import GradientTransformation, apply_updates
from fnlm.train._compile_cache import CompileCache, Precompiled
from fnlm.train._compile_cache import supported as compile_cache_supported
from fnlm.tree import PyTree, flatten_names, tree_leaves, tree_map, tree_unstack

LossFn = Callable[[PyTree, Any, Tensor], "tuple[Tensor, dict[str, Tensor]]"]

#: Inductor options used for compiled steps (see "Compile time" above). ``compile_options=``
#: adds to or overrides them.
COMPILE_OPTIONS: dict[str, Any] = {"realize_opcount_threshold": 8, "max_fusion_buffer_group_pairwise_attempts": 4}
NONFINITE = ("raise", "skip", "ignore")
_RESERVED = ("loss", "grad_norm", "lr", "finite", "grads_finite")
_ids = itertools.count()


def fresh_function(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object.

    Dynamo caches compiled graphs *per code object*, and every step made by
    :func:`make_train_step` shares the same inner function's code; a fresh copy gives each step
    its own cache (and its own recompile budget), so one program can make many steps.
    """
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_ids)}")
    new = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__doc__, new.__qualname__ = fn.__doc__, fn.__qualname__
    return new


def compile_fn(
    fn: Callable,
    *,
    compile: bool | str | Callable = True,
    dynamic: bool = False,
    compile_options: Mapping[str, Any] | None = None,
    max_shapes: int = 16,
    cache: CompileCache | None = None,
    name: str = "fn",
) -> Callable:
    """``torch.compile(fn, fullgraph=True)`` with fnlm's Inductor options. ``compile``: ``True``
    (Inductor), ``False`` (return ``fn``), or another dynamo backend, by name (``'aot_eager'``:
    trace and check the graph without generating code) or as a callable. ``cache``: keep one
    ahead-of-time graph per argument signature in a :class:`~fnlm.train.CompileCache` (Inductor,
    static shapes), ``name`` telling this function's graphs from others under the same key
    (:class:`~fnlm.train.Precompiled`)."""
    if compile is False:
        return fn
    if cache is not None:
        if compile is not True or dynamic:
            raise ValueError("a compile cache needs compile=True (Inductor) and dynamic=False")
        if compile_cache_supported():
            options = {**COMPILE_OPTIONS, **(compile_options or {})}
            return Precompiled(fresh_function(fn), cache, name=name, options=options)
        warnings.warn(f"torch {torch.__version__} cannot save compiled functions: compiling in every run")
    backend = "inductor" if compile is True else compile
    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    if limit is not None and limit < max_shapes:
        torch._dynamo.config.recompile_limit = max_shapes
    kw: dict[str, Any] = {}
    if backend == "inductor":
        kw["options"] = {**COMPILE_OPTIONS, **(compile_options or {})}
    return torch.compile(fresh_function(fn), fullgraph=True, dynamic=dynamic, backend=backend, **kw)


def find_step_count(opt_state: PyTree) -> Tensor | None:
    """The update counter in an optimizer state: the first leaf whose name ends in ``count``."""
    for name, leaf in flatten_names(opt_state).items():
        if name.rsplit(".", 1)[-1] == "count" and isinstance(leaf, Tensor):
            return leaf
    return None


def param_group(name: str) -> str:
    """The group a dotted parameter name belongs to, for messages: up to the first list index
    (``encoder.layers.3.attn.q.weight`` -> ``encoder.layers.3``), else the parent module
    (``classifier.weight`` -> ``classifier``)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def _mean_tree(trees: list[PyTree]) -> PyTree:
    if len(trees) == 1:
        return trees[0]
    k = float(len(trees))
    return tree_map(lambda *xs: sum(xs[1:], xs[0]) / k, *trees)


def train_step_fn(
    loss_fn: LossFn,
    optimizer: GradientTransformation,
    *,
    accum_steps: int = 1,
    autocast_dtype: torch.dtype | None = None,
    nonfinite: str = "raise",
    grad_sync: Callable[[PyTree], PyTree] | None = None,
) -> Callable:
    """The pure, uncompiled step ``(params, opt_state, batch, key) -> (params, opt_state, metrics)``
    that :func:`make_train_step` compiles (use it directly under ``vmap``, see
    :mod:`fnlm.vmap_tricks`)."""

    def forward(params, batch, key):
        if autocast_dtype is None:
            loss, aux = loss_fn(params, batch, key)
        else:
            device = tree_leaves(params)[0].device.type
            with torch.autocast(device_type=device, dtype=autocast_dtype):
                loss, aux = loss_fn(params, batch, key)
        aux = dict(aux or {})
        bad = [k for k in aux if k in _RESERVED]
        if bad:
            raise ValueError(f"loss_fn aux names {bad} clash with the step's own metrics {_RESERVED}")
        return loss.float(), tree_map(lambda a: a.float(), aux)

    grad_fn = grad_and_value(forward, has_aux=True)

    def scaled_forward(params, batch, key, loss_scale):
        """``loss * S`` for the gradient (float16 loss scaling), the unscaled loss in the aux."""
        loss, aux = forward(params, batch, key)
        return loss * loss_scale, (loss, aux)

    scaled_grad_fn = grad_and_value(scaled_forward, has_aux=True)

    def step(params, opt_state, batch, key):
        loss_scale = find_loss_scale(opt_state)  # a dynamic_loss_scale optimizer; None: unchanged maths

        def grads_of(micro, k):
            if loss_scale is None:
                return grad_fn(params, micro, k)
            grads, (_, la) = scaled_grad_fn(params, micro, k, loss_scale)
            return grads, la

        if accum_steps == 1:
            grads, (loss, aux) = grads_of(batch, key)
        else:
            parts = []
            for i in range(accum_steps):
                micro = tree_map(lambda x: x[i], batch)
                parts.append(grads_of(micro, random.fold_in(key, i)))
            grads = _mean_tree([g for g, _ in parts])
            loss = _mean_tree([la[0] for _, la in parts])
            aux = _mean_tree([la[1] for _, la in parts])
        if grad_sync is not None:  # one all-reduce for gradients and the metrics that go with them
            grads, loss, aux = grad_sync((grads, loss, aux))
        finite, grads_finite, grad_norm = _flags_and_norm(loss, grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "grads_finite": grads_finite}
        if loss_scale is not None:  # an overflow is skipped by the optimizer, not an error
            metrics["finite"] = torch.isfinite(loss).all()
            metrics["grad_norm"] = grad_norm / loss_scale
            metrics["loss_scale"] = loss_scale
            metrics["overflow"] = ~grads_finite.all()
        updates, new_state = optimizer.update(grads, opt_state, params)
        lr = find_hyperparam(new_state, "lr")  # the lr this update used (optim.inject_hyperparams)
        if lr is not None:
            metrics["lr"] = lr
        metrics.update(aux)
        new_params = apply_updates(params, updates)
        if nonfinite == "skip":
            new_params = keep_if_finite(finite, new_params, params)
            new_state = keep_if_finite(finite, new_state, opt_state)
        return new_params, new_state, metrics

    return step


class _Deterministic:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` for the duration of a block,
    restoring the caller's setting afterwards."""

    def __enter__(self):
        self.prev = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        torch.use_deterministic_algorithms(True, warn_only=True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev[0], warn_only=self.prev[1])


class Step:
    """A compiled pure function plus the eager checks around it: the one kind of object that
    :func:`make_train_step`, :func:`make_eval_step`, :func:`~fnlm.train.make_ensemble_step` and
    :func:`~fnlm.train.make_dp_sgd_step` return. ``step.pure`` is the uncompiled pure function
    (use it under your own transforms), ``step.compiled`` the compiled one.

    For training steps ``step(params, opt_state, batch, key, ...) -> (params, opt_state, metrics)``
    the call reads ``metrics['finite']`` (the one host sync per step) and, with
    ``nonfinite='raise'``/``'skip'``, raises or warns with :func:`nonfinite_message`; ``members``:
    the leading axis of params, state and metrics is an ensemble's member axis.
    """

    def __init__(
        self,
        pure: Callable,
        compiled: Callable,
        *,
        check_args: Callable | None = None,
        nonfinite: str = "ignore",
        members: bool = False,
        deterministic: bool = False,
        no_grad: bool = False,
        seed_from: int | None = None,
    ):
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.pure, self.compiled, self.check_args = pure, compiled, check_args
        self.nonfinite, self.members, self.deterministic, self.no_grad = nonfinite, members, deterministic, no_grad
        self.seed_from = seed_from  # index of the key argument that seeds torch's global generator, or None
        self.calls = 0

    def __call__(self, *args, **kwargs):
        if self.check_args is not None:
            self.check_args(*args, **kwargs)
        calls, self.calls = self.calls, self.calls + 1
        with contextlib.ExitStack() as stack:
            if self.deterministic:
                stack.enter_context(_Deterministic())
            if self.no_grad:
                stack.enter_context(torch.no_grad())
            if self.seed_from is not None:  # the global generator, seeded from the key, restored after
                key = args[self.seed_from]
                cuda = [key.device] if key.device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=cuda))
                torch.manual_seed(random.seed_of(key))
            out = self.compiled(*args, **kwargs)
        if self.nonfinite != "ignore":
            self._check_finite(calls, args[0], args[1], out[2])
        return out

    def prepare(self, *args) -> None:
        """Compile (or load, or queue for the background) the graph for these arguments' shapes
        before their first call; nothing to do without a compile cache."""
        if isinstance(self.compiled, Precompiled):
            with torch.no_grad() if self.no_grad else contextlib.nullcontext():
                self.compiled.prepare(*args)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until graphs compiling in the background are ready (``True``; ``False`` on timeout)."""
        return self.compiled.wait(timeout) if isinstance(self.compiled, Precompiled) else True

    def _check_finite(self, calls: int, params: PyTree, opt_state: PyTree, metrics: Mapping[str, Tensor]) -> None:
        finite = metrics["finite"]
        if bool(finite.all()):
            return
        count = find_step_count(opt_state)  # the caller's state is untouched: updates done before
        if self.members:
            bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
            members, ms = tree_unstack(params), tree_unstack(metrics)
            step = [calls] * len(members) if count is None else count.tolist()
            msg = "ensemble: " + "; ".join(f"member {i}: {nonfinite_message(step[i], members[i], ms[i])}" for i in bad)
        else:
            msg = nonfinite_message(calls if count is None else int(count), params, metrics)
        if self.nonfinite == "raise":
            raise FloatingPointError(msg)
        what = "those members' updates" if self.members else "update"
        warnings.warn(f"{msg}; {what} skipped, params and optimizer state unchanged", RuntimeWarning, stacklevel=3)


def finite_flags(loss: Tensor, grads: PyTree) -> tuple[Tensor, Tensor]:
    """``(finite, grads_finite)``: one flag for the loss and all gradients, one per gradient leaf
    (flatten order), computed in the graph without data-dependent control flow."""
    return _flags_and_norm(loss, grads)[:2]


def _flags_and_norm(loss: Tensor, grads: PyTree) -> tuple[Tensor, Tensor, Tensor]:
    """``(finite, grads_finite, ||g||_2)`` from one reduction per leaf: ``n_i = ||g_i||_2`` is finite
    exactly when every element of ``g_i`` is (and its square sum does not overflow, i.e. no
    element is beyond ~1e19: flagged too), and ``||g||_2 = ||(n_1, ..., n_k)||_2``, as
    :func:`fnlm.optim.global_norm` computes it."""
    norms = torch.stack([torch.linalg.vector_norm(g) for g in tree_leaves(grads)])
    grads_finite = torch.isfinite(norms)
    return torch.isfinite(loss).all() & grads_finite.all(), grads_finite, torch.linalg.vector_norm(norms)


def keep_if_finite(finite: Tensor, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where ``finite``, else ``old``, leaf by leaf (``nonfinite='skip'``; per member under ``vmap``)."""
    return tree_map(lambda n, o: torch.where(finite, n, o) if isinstance(n, Tensor) else n, new, old)


def nonfinite_message(step: int, params: PyTree, metrics: Mapping[str, Tensor]) -> str:
    """``non-finite loss/gradients at step N: ...`` naming the parameter groups with bad gradients."""
    names = list(flatten_names(params))
    flags = metrics["grads_finite"].tolist()
    groups: dict[str, list[str]] = {}
    for name, ok in zip(names, flags):
        if not ok:
            g = param_group(name)
            groups.setdefault(g, []).append(name[len(g) + 1 :] if name.startswith(g + ".") else name)
    loss = float(metrics["loss"])
    parts = [f"non-finite {'loss' if groups == {} else 'gradients'} at step {step} (loss = {loss})"]
    if groups:
        shown = "; ".join(f"{g} ({', '.join(ls[:4])}{', ...' if len(ls) > 4 else ''})" for g, ls in groups.items())
        parts.append(f"in {len(groups)} parameter group(s): {shown}")
    return ": ".join(parts)


def make_train_step(
    loss_fn: LossFn,
    optimizer: GradientTransformation,
    *,
    compile: bool | str | Callable = True,
    accum_steps: int = 1,
    autocast_dtype: torch.dtype | None = None,
    nonfinite: str = "raise",
    grad_sync: Callable[[PyTree], PyTree] | None = None,
    dynamic: bool = False,
    compile_options: Mapping[str, Any] | None = None,
    max_shapes: int = 16,
    deterministic: bool = False,
    seed_global_rng: bool = False,
    cache: CompileCache | None = None,
) -> Step:
    """A training step ``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``.

    ``loss_fn(params, batch, key) -> (loss, aux: dict of scalar tensors)``. ``compile``: ``True``
    (Inductor), ``False`` (eager, same maths) or a dynamo backend name. ``metrics['lr']`` (the lr
    of this update) is reported when the optimizer keeps it in its state
    (:func:`fnlm.optim.inject_hyperparams`). ``grad_sync``: a
    pytree all-reduce, e.g. :func:`fnlm.distributed.all_reduce_mean`. ``deterministic=True``:
    compile and run under ``torch.use_deterministic_algorithms(True, warn_only=True)``, so that
    the same inputs give bitwise the same result every time (Inductor otherwise sums repeated
    token ids' embedding gradients with parallel atomic adds). Its steps measured slower on CPU
    here (``docs/benchmarks.md``), and it bypasses Inductor's compile cache (every run compiles). ``seed_global_rng=True``:
    every call seeds torch's global generator from the key (:func:`fnlm.random.seed_of`, outside the
    compiled graph) and restores it afterwards, for kernels that draw from it: fused attention
    dropout (``fused_attention_dropout=True`` in the model's config). ``cache``: a
    :class:`~fnlm.train.CompileCache`: each batch shape's graph is saved once per machine and loaded
    by later processes without tracing (or, with ``background=True``, compiled in a thread while
    the eager step runs). See the module docstring.
    """
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(f"optimizer must be a GradientTransformation, got {type(optimizer).__name__}")
    pure = train_step_fn(
        loss_fn,
        optimizer,
        accum_steps=accum_steps,
        autocast_dtype=autocast_dtype,
        nonfinite=nonfinite,
        grad_sync=grad_sync,
    )
    name = (
        f"train_step(accum={accum_steps},autocast={autocast_dtype},nonfinite={nonfinite},"
        f"sync={grad_sync is not None},deterministic={deterministic})"
    )
    compiled = compile_fn(
        pure,
        compile=compile,
        dynamic=dynamic,
        compile_options=compile_options,
        max_shapes=max_shapes,
        cache=cache,
        name=name,
    )

    def check_args(params, opt_state, batch, key):
        random._check_key(key)
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


def make_eval_step(
    fn: Callable,
    compile: bool | str | Callable = True,
    *,
    dynamic: bool = False,
    compile_options: Mapping[str, Any] | None = None,
    max_shapes: int = 16,
    cache: CompileCache | None = None,
) -> Step:
    """``fn(params, batch) -> metrics`` compiled (``fullgraph=True``) and run under ``torch.no_grad``;
    ``cache``: as :func:`make_train_step`."""
    compiled = compile_fn(
        fn,
        compile=compile,
        dynamic=dynamic,
        compile_options=compile_options,
        max_shapes=max_shapes,
        cache=cache,
        name="eval_step",
    )
    return Step(fn, compiled, no_grad=True)
