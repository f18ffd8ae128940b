"""Reward sources of the `ppo` stage that are not the trained reward model (`ppo.reward`).

- `gold`: the builtin task's verifier (`rlhf.data.builtin_sort.gold_score`): a verifiable
  reward, as in RL with verifiable rewards (RLVR), batched as below by the `ppo` stage;
- `module:function`: a function of the user's, called as `function(prompts, responses)` on
  lists of strings and returning one finite number per response (like TRL's `reward_funcs`).
  The module is read from the project root, or else imported from the Python path.

A function that cannot be imported stops the run when the params are loaded, before any
stage runs; one that returns the wrong number of scores or a non-finite one stops the stage
at the rollout where it did, before that rollout trains anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from rlhf.errors import DataError, ParamsError

TextScorer = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
"""(prompts, responses) -> one score per response."""


def load_function(spec: str, root: Optional[Path] = None) -> TextScorer:
    """The callable `module:function` names. A module file in `root` is loaded afresh each
    time (a long-lived flow process then sees the user's edits), others are imported."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = _load_module(module_name, root)
    except Exception as exc:  # a user's module may fail in any way while it is imported
        reason = (f"no module named {module_name!r} in {root or 'the Python path'}"
                  if isinstance(exc, ModuleNotFoundError) and exc.name == module_name
                  else f"importing {module_name} raised {type(exc).__name__}: {exc}")
        raise ParamsError(f"ppo.reward={spec!r} cannot be loaded: {reason}; put {module_name}.py "
                          "in the project root or install it") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ParamsError(f"ppo.reward={spec!r}: module {module_name} has no function "
                          f"{function_name!r}; name a function of (prompts, responses)")
    return function


def _file_in_root(name: str, root: Optional[Path]) -> Optional[Path]:
    """Module `name` as a file (or package) in `root`, if it is there."""
    if root is None:
        return None
    base = Path(root, *name.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()),
                None)


def _load_module(name: str, root: Optional[Path]):
    file = _file_in_root(name, root)
    if file is None:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: pickling and dataclasses look here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def module_file(spec: str, root: Optional[Path] = None) -> Path:
    """The file of the module that holds `spec`'s function (what a checkpoint must match),
    found without running the module again."""
    name = spec.partition(":")[0]
    file = _file_in_root(name, root)
    if file is None:
        found = importlib.util.find_spec(name)
        if found is None or not found.origin:
            raise ParamsError(f"ppo.reward={spec!r}: module {name} has no source file; put "
                              f"{name}.py in the project root or install it")
        file = Path(found.origin)
    return file


def score(scorer: TextScorer, spec: str, prompts: Sequence[str],
          responses: Sequence[str]) -> list[float]:
    """`scorer`'s scores, checked: one finite float per response."""
    try:
        scores = [float(s) for s in scorer(list(prompts), list(responses))]
    except (TypeError, ValueError) as exc:
        raise DataError(f"ppo.reward={spec!r} must return one number per response; it returned "
                        f"something else ({exc})") from None
    if len(scores) != len(responses):
        raise DataError(f"ppo.reward={spec!r} returned {len(scores)} scores for "
                        f"{len(responses)} responses; return one per response")
    bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
    if bad is not None:
        raise DataError(f"ppo.reward={spec!r} returned {scores[bad]} for response "
                        f"{responses[bad]!r} to {prompts[bad]!r}; return finite numbers")
    return scores
