"""The package layout: no module is shadowed by a function, every ``__all__`` resolves, the public
names of 0.1 are still ``fnlm.X``, and every public function or class says what it computes."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types

import pytest

import fnlm

#: What ``fnlm.X`` offered before the layout change (0.1's fnlm/__init__.py), written out here.
PUBLIC_IN_0_1 = [
    "BertConfig",
    "COMPILE_OPTIONS",
    "TransformerConfig",
    "accuracy",
    "attention_reference",
    "bert",
    "bert_classifier",
    "bert_mlm",
    "causal_mask",
    "check_token_ids",
    "classifier_loss",
    "compile_fn",
    "cross_entropy",
    "data",
    "decode",
    "decoder",
    "decoder_block",
    "dp_aggregate",
    "dropout",
    "embed",
    "embedding",
    "encode",
    "encoder",
    "encoder_block",
    "feed_forward",
    "gelu",
    "gelu_tanh",
    "get_activation",
    "greedy_decode",
    "init_bert",
    "init_bert_classifier",
    "init_bert_mlm",
    "init_decoder",
    "init_decoder_block",
    "init_embedding",
    "init_encoder",
    "init_encoder_block",
    "init_feed_forward",
    "init_layer_norm",
    "init_learned_positional",
    "init_linear",
    "init_multi_head_attention",
    "init_relative_bias",
    "init_transformer",
    "layer_norm",
    "layer_norm_reference",
    "learned_positional",
    "linear",
    "load_bert",
    "load_tokenizer",
    "load_train_state",
    "make_dp_sgd_step",
    "make_ensemble_step",
    "make_eval_step",
    "make_train_step",
    "mask_tokens",
    "mlm_loss",
    "models",
    "multi_head_attention",
    "optim",
    "padding_mask",
    "per_example_grad_norms",
    "per_example_grads",
    "random",
    "relative_bias",
    "relative_position_bucket",
    "save_bert",
    "save_train_state",
    "scaled_dot_product_attention",
    "sinusoidal_encoding",
    "sinusoidal_table",
    "transformer",
    "tree",
    "distributed",
]


def all_modules() -> list[types.ModuleType]:
    mods = [fnlm]
    for info in pkgutil.walk_packages(fnlm.__path__, "fnlm."):
        mods.append(importlib.import_module(info.name))
    return mods


def packages() -> list[types.ModuleType]:
    return [m for m in all_modules() if hasattr(m, "__path__")]


def test_no_package_attribute_shadows_one_of_its_submodules():
    checked = 0
    for pkg in packages():
        for info in pkgutil.iter_modules(pkg.__path__):
            checked += 1
            if hasattr(pkg, info.name):
                attr = getattr(pkg, info.name)
                assert isinstance(attr, types.ModuleType), (
                    f"{pkg.__name__}.{info.name} is a {type(attr).__name__}, hiding the module "
                    f"{pkg.__name__}.{info.name}"
                )
                assert attr.__name__ == f"{pkg.__name__}.{info.name}"
    assert checked > 20  # the walk really visited the tree


def test_private_layer_modules_are_importable_by_path():
    """What the shadowing used to break: ``import fnlm.nn._encoder as m`` gives the module."""
    import fnlm.nn._encoder as m

    assert isinstance(m, types.ModuleType) and callable(m.encoder_block)


def test_every_package_has_an_all_that_resolves():
    for pkg in packages():
        names = getattr(pkg, "__all__", None)
        assert names, f"{pkg.__name__} has no __all__"
        assert len(set(names)) == len(names), f"{pkg.__name__}.__all__ repeats names"
        missing = [n for n in names if not hasattr(pkg, n)]
        assert not missing, f"{pkg.__name__}.__all__ names missing attributes: {missing}"


@pytest.mark.parametrize("name", PUBLIC_IN_0_1)
def test_public_names_of_0_1_are_still_fnlm_x(name):
    assert name in fnlm.__all__ and getattr(fnlm, name) is not None


def test_public_functions_and_classes_have_a_docstring():
    undocumented = []
    for pkg in packages():
        for n in pkg.__all__:
            obj = getattr(pkg, n)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip():
                undocumented.append(f"{pkg.__name__}.{n}")
    assert not undocumented, f"public names without a docstring: {undocumented}"
