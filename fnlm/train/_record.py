"""What a finished run leaves for the next reader: a model card and an environment record.

* :func:`model_card`: ``README.md`` with YAML front matter in the layout ``transformers``, ``peft``
  and sentence-transformers write (``base_model``, ``datasets``, ``library_name``, ``tags``, and a
  ``model-index`` with the evaluation results), then the hyper-parameters and framework versions.
* :class:`EnvironmentRecord`: ``torch.utils.collect_env``'s report (gathered in a background thread,
  since it asks pip), the versions of the packages a run depends on, and the git commit when the code
  runs from a checkout.
"""

from __future__ import annotations

import json
import platform
import subprocess
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = (
    "fnlm",
    "torch",
    "einops",
    "safetensors",
    "numpy",
    "tokenizers",
    "huggingface_hub",
    "tqdm",
    "transformers",
    "peft",
    "sentence-transformers",
    "tensorboard",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{name: version}`` of the installed ones among ``names``."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit(path: str | Path) -> str | None:
    """The commit of the checkout holding ``path`` (``+dirty`` with local changes), or None."""
    try:
        cwd = Path(path).resolve().parent
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class EnvironmentRecord:
    """``start()`` gathers ``torch.utils.collect_env`` in the background; :meth:`result` waits for it."""

    def __init__(self, script: str | Path | None = None):
        self.script, self._env, self._thread = script, None, None

    def start(self) -> "EnvironmentRecord":
        def gather():
            try:
                from torch.utils import collect_env

                self._env = {k: v for k, v in collect_env.get_env_info()._asdict().items()}
            except Exception as e:  # collect_env is best effort (no pip, no lscpu, ...)
                self._env = {"error": f"{type(e).__name__}: {e}"}

        self._thread = threading.Thread(target=gather, daemon=True)
        self._thread.start()
        return self

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        if self._thread is not None:
            self._thread.join(timeout)
        return {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "packages": package_versions(),
            "git_commit": git_commit(self.script) if self.script is not None else None,
            "collect_env": self._env,
        }


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """YAML block lines of a JSON-like value (scalars as JSON, which YAML reads as they are)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:")
                lines += _yaml(v, indent + 2)
            else:
                lines.append(f"{pad}{k}: {json.dumps(v)}")
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, (dict, list)) and v:
                sub = _yaml(v, indent + 2)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines += sub[1:]
            else:
                lines.append(f"{pad}- {json.dumps(v)}")
    return lines


def model_card(
    *,
    name: str,
    base_model: str | None,
    dataset: str,
    task: str,
    metrics: dict[str, float],
    hyperparameters: dict[str, Any],
    description: str = "",
    metric_notes: dict[str, str] | None = None,
    tags: tuple[str, ...] = (),
) -> str:
    """A ``README.md`` model card: YAML front matter as the Hugging Face libraries write it, then
    the results, hyper-parameters and framework versions in Markdown.

    ``task`` is a hub pipeline tag (``text-classification``, ``text-generation``, ``fill-mask``);
    ``metrics`` maps a metric's name to its value on ``dataset``'s evaluation split.
    """
    front = {
        "library_name": "fnlm",
        "base_model": base_model,
        "tags": ["fnlm", "generated_from_fnlm", task, *tags],
        "datasets": [dataset],
        "metrics": list(metrics),
        "pipeline_tag": task,
        "model-index": [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": task, "name": task.replace("-", " ").title()},
                        "dataset": {"name": dataset, "type": dataset},
                        "metrics": [{"type": k, "value": v, "name": k.replace("_", " ")} for k, v in metrics.items()],
                    }
                ],
            }
        ],
    }
    if base_model is None:
        del front["base_model"]
    notes = metric_notes or {}
    lines = ["---", *_yaml(front), "---", "", f"# {name}", ""]
    if description:
        lines += [description, ""]
    lines += ["## Results", "", "| metric | value | |", "|---|---|---|"]
    lines += [
        f"| {k} | {v:.4f} | {notes.get(k, '')} |" if isinstance(v, float) else f"| {k} | {v} | {notes.get(k, '')} |"
        for k, v in metrics.items()
    ]
    lines += ["", "## Training hyper-parameters", ""]
    lines += [f"- {k}: {v}" for k, v in hyperparameters.items()]
    lines += ["", "## Framework versions", ""]
    lines += [
        f"- {k} {v}"
        for k, v in package_versions().items()
        if k in ("fnlm", "torch", "tokenizers", "safetensors", "transformers", "peft")
    ]
    return "\n".join(lines) + "\n"
