"""Typed checks of a composed config: every value a user sets is checked, in one pass, before anything is built.

A schema is a dataclass whose annotations give each key's type (`int`, `float`, `bool`, `str`, `X | None`,
`Literal[...]`, a nested schema) and whose `value(...)` fields give its range:

    @dataclass
    class Optim:
        lr: float = value(gt=0)
        ema_decay: float | None = value(ge=0, lt=1, hint="null: no EMA")

`problems(section, Schema, "optim")` returns one phrase per value that does not fit (`optim.lr='fast': must
be a number > 0`); the callers join them into one error line. Keys the schema does not name are left alone
(experiments and tests add their own), and so are values that are interpolations (`lr: ${optim.lr}`): a
value is checked where it is set, under the key the user typed, once.

Why not Hydra's structured configs (a schema merged into the config tree at composition)? Their nodes check
types but not ranges, and a typed tree refuses the keys experiments add (`+callbacks.touch`, a test's own
data module); one explicit pass over the keys that matter covers types and ranges, and names the fix.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf

_NONE = type(None)


def value(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    check: Callable[[Any], str | None] | None = None,
    hint: str = "",
) -> Any:
    """A schema field: bounds on a number (`ge` >=, `gt` >, `le` <=, `lt` <), or `check` (a function that
    returns what is wrong with a value, or None); `hint` is added to the message (what null means, say)."""
    return field(metadata={"bounds": (ge, gt, le, lt), "check": check, "hint": hint})


def raw(node: Any) -> Any:
    """A config node as plain Python with interpolations left as written (`"${optim.lr}"`), or a value as is."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=False)
    return node


def is_interpolation(item: Any) -> bool:
    return isinstance(item, str) and "${" in item


def problems(section: Any, schema: type, where: str) -> list[str]:
    """What in `section` (a config node or its `raw` form) does not fit `schema`; `where` is its dotted key."""
    section = raw(section)
    if section is None or is_interpolation(section):
        return []  # a switched-off group (`callbacks.requeue=null`), or one checked where it is set
    if not isinstance(section, Mapping):
        return [f"{where}={section!r}: must be a group of keys"]
    kinds = get_type_hints(schema)
    found: list[str] = []
    for spec in fields(schema):
        if spec.name not in section:
            continue
        item, key, kind = section[spec.name], f"{where}.{spec.name}" if where else spec.name, kinds[spec.name]
        if is_dataclass(kind):
            found += problems(item, kind, key)
        elif is_interpolation(item) or item == "???":  # "???": required, reported where it is read
            continue
        elif (problem := _problem(item, kind, spec.metadata)) is not None:
            found.append(f"{key}={_show(item)}: {problem}")
    return found


def _problem(item: Any, kind: Any, metadata: Mapping[str, Any]) -> str | None:
    hint = f" ({metadata['hint']})" if metadata.get("hint") else ""
    if not _fits(item, kind):
        return f"must be {_describe(kind, metadata)}{hint}"
    if isinstance(item, float) and not math.isfinite(item):
        bounded = any(bound is not None for bound in metadata["bounds"])
        return f"must be {_describe(kind, metadata) if bounded else 'a finite number'}{hint}"
    if isinstance(item, (int, float)) and not isinstance(item, bool) and not _within(item, metadata["bounds"]):
        return f"must be {_describe(kind, metadata)}{hint}"
    if metadata.get("check") is not None and (problem := metadata["check"](item)) is not None:
        return problem + hint
    return None


def _within(number: float, bounds: tuple) -> bool:
    ge, gt, le, lt = bounds
    return (
        (ge is None or number >= ge)
        and (gt is None or number > gt)
        and (le is None or number <= le)
        and (lt is None or number < lt)
    )


def _fits(item: Any, kind: Any) -> bool:
    origin = get_origin(kind)
    if origin is Literal:
        return any(item == choice and type(item) is type(choice) for choice in get_args(kind))
    if origin in (typing.Union, types.UnionType):
        return any(_fits(item, option) for option in get_args(kind))
    if kind is _NONE:
        return item is None
    if kind is bool:
        return isinstance(item, bool)
    if kind is int:
        return isinstance(item, int) and not isinstance(item, bool)
    if kind is float:
        return isinstance(item, (int, float)) and not isinstance(item, bool)
    if kind is str:
        return isinstance(item, str)
    if kind is list or origin is list:
        return isinstance(item, list)
    return kind is Any


def _describe(kind: Any, metadata: Mapping[str, Any]) -> str:
    origin = get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(dict.fromkeys(str(choice) for choice in get_args(kind)))
    if origin in (typing.Union, types.UnionType):
        options = [option for option in get_args(kind) if option is not _NONE]
        described = " or ".join(_describe(option, metadata) for option in options)
        return described + (" or null" if len(options) < len(get_args(kind)) else "")
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
    name = names.get(origin or kind, str(kind))
    if kind in (int, float):
        ge, gt, le, lt = metadata.get("bounds", (None,) * 4)
        limits = [f"{sign} {_number(b)}" for sign, b in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if b is not None]
        if len(limits) == 2 and (ge is not None or gt is not None) and (le is not None or lt is not None):
            low = f"[{_number(ge)}" if ge is not None else f"({_number(gt)}"
            high = f"{_number(le)}]" if le is not None else f"{_number(lt)})"
            return f"{name} in {low}, {high}"
        return " ".join([name, *limits])
    return name


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _show(item: Any) -> str:
    text = repr(item) if isinstance(item, str) else str(item)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------ sections train.py and eval.py share
def _devices(item: Any) -> str | None:
    """Lightning's `devices`: a count >= 1, -1 or "auto" (all), a list of device indices, or "0,1"."""
    if isinstance(item, bool):
        return "must be a count >= 1, -1 or auto (all), or a list of device indices"
    if isinstance(item, int) and (item >= 1 or item == -1):
        return None
    if isinstance(item, str) and re.fullmatch(r"auto|-1|[1-9]\d*|\d+(,\d+)+,?|\d+,", item.strip()):
        return None
    if isinstance(item, list) and item and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in item):
        return None
    return "must be a count >= 1, -1 or auto (all), or a list of device indices"


# Lightning's precision names (`lightning.fabric.connector._PRECISION_INPUT`), and the plain numbers it accepts.
Precision = Literal[
    "transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
    "32-true", "64-true", "64", "32", "16", "bf16", 64, 32, 16,
]  # fmt: skip


@dataclass
class Trainer:
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = value()
    devices: int | str | list = value(check=_devices)
    num_nodes: int = value(ge=1)
    precision: Precision = value()
    max_steps: int = value(ge=1, hint="the steps of the run; a stage given in epochs sets it")
    max_epochs: int | None = value(ge=-1)
    log_every_n_steps: int = value(ge=1)
    check_val_every_n_epoch: int | None = value(ge=1)
    num_sanity_val_steps: int = value(ge=-1)
    enable_progress_bar: bool = value()
    enable_model_summary: bool = value()


@dataclass
class Data:
    """`unilip.data.ShardDataModule`'s arguments (a test's own data module shares some of them)."""

    image_size: int = value(ge=1)
    batch_size: int = value(ge=1)
    val_batch_size: int | None = value(ge=1, hint="null: data.batch_size")
    train_batches_per_epoch: int = value(ge=1)
    num_workers: int = value(ge=0)
    val_num_workers: int | None = value(ge=0, hint="null: data.num_workers")
    shuffle_buffer: int = value(ge=1)
    max_consecutive_failures: int = value(ge=1)
    prefetch_factor: int | None = value(ge=1)
    pin_memory: bool = value()
    random_flip: bool = value()
    flip_edits: bool = value()
    with_source: bool = value()
    build_photos: bool = value()
    resize: Literal["shorter_edge", "square"] = value()
    seed: int = value(ge=0)
