"""Small shared helpers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Union


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (the alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@contextmanager
def atomic_directory(path: str | os.PathLike):
    """
    Yield a temporary folder beside ``path``; on success it replaces ``path`` (which may exist), on error it is
    removed, so a reader never sees a half-written folder.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.old-")
        os.replace(path, os.path.join(old, "x"))
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(obj, path: Union[str, os.PathLike]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


TRACKER_EXTRAS = ("tensorboard", "wandb")


def check_tracker_installed(report_to: str) -> None:
    r"""
    Check that the experiment tracker chosen with ``--report_to`` is installed, before training starts: accelerate
    would otherwise skip a missing tracker and the run would log nothing. Availability is accelerate's own check
    (``accelerate.utils.is_<tracker>_available``).

    Args:
        report_to (`str`): ``"none"``, ``"all"`` (every installed tracker; at least one must be) or one of
            accelerate's trackers (``"tensorboard"``, ``"wandb"``, ...).

    Raises:
        `ValueError`: ``report_to`` is not a tracker accelerate knows.
        `ImportError`: the tracker is not installed; the message names the extra (``diffusers-stages[tensorboard]``,
            ``diffusers-stages[wandb]``) or package to install.
    """
    from accelerate.utils import LoggerType, imports

    if report_to == "none":
        return
    trackers = [t.value for t in LoggerType if t.value != "all"]
    if report_to not in (*trackers, "all"):
        raise ValueError(f"`report_to` must be 'none', 'all' or one of {trackers}, got {report_to!r}.")
    wanted = trackers if report_to == "all" else [report_to]
    if any(getattr(imports, f"is_{name}_available")() for name in wanted):
        return
    hint = " or ".join(f'`pip install "diffusers-stages[{extra}]"`' for extra in TRACKER_EXTRAS if extra in wanted)
    if report_to not in TRACKER_EXTRAS and report_to != "all":
        hint = f"`pip install {report_to}`"
    raise ImportError(
        f"`--report_to {report_to}` needs a tracker that is not installed: {hint}, or `--report_to none`."
    )
