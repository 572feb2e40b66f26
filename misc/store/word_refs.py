"""Word-vector references that survive a copy to another machine: how a checkpoint names the word vectors it was
trained with, and how a loaded checkpoint finds them again.

A checkpoint names its word vectors by ``config["word_vectors"]`` (a path relative to the data root
:data:`misc.config.DATA` when the file lies under it, the name of an installed word-vector package, else the
absolute path) and ``config["words"]`` (``{"file": name, "sha256": digest, "path": where it was}``). :func:`find_words`
looks the file up where it was named, under the data root, at the configured word-vector keys and, last, at the
absolute path it had at training time (so that a model trained in a clone loads from an installed command with
another data root), and checks its digest; a missing or different file is one line naming ``--words``.
Checkpoints written before ``config["words"]`` existed name a path relative to the project (or an absolute one)
and are read as they are.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from misc import config
from misc.data.words import PACKAGED, packaged
from misc.errors import UserError
from misc.store.files import sha256

log = logging.getLogger(__name__)


def reference(source: Path) -> tuple[str, dict[str, str]]:
    """How a checkpoint names the word-vector file ``source``: (``config["word_vectors"]``, ``config["words"]``)."""
    resolved = Path(source).resolve()
    stored = str(resolved)
    for name in PACKAGED:
        with contextlib.suppress(UserError):  # a package that is not installed holds nothing
            if resolved.is_relative_to(packaged(name).resolve()):
                stored = name
    if resolved.is_relative_to(config.DATA.resolve()):
        stored = str(resolved.relative_to(config.DATA.resolve()))
    return stored, {"file": resolved.name, "sha256": sha256(resolved), "path": str(resolved)}


def candidates(stored: str, ref: dict[str, str], legacy: bool) -> list[Path]:
    """Where a file the checkpoint names may be, in order: where it was named, under the data root, at the
    configured word-vector keys (the demo world's included) when their file has its name, and where it was at
    training time."""
    path = Path(stored)
    name = ref.get("file") or path.name
    found = [path if path.is_absolute() else (config.ROOT if legacy else config.DATA) / path]
    if stored in PACKAGED:
        with contextlib.suppress(UserError):
            found.insert(0, packaged(stored) / name)
    found += [config.DATA / "words" / name, config.DATA / name]
    configured = [config.path(key, must_exist=False) for key in ("word_vectors", "glove_vectors")]
    found += [path for path in (*configured, config.DEMO_PATHS["word_vectors"]) if path.name == name]
    if ref.get("path"):
        found.append(Path(ref["path"]))
    return list(dict.fromkeys(found))


def find_words(saved: dict[str, Any], override: Path | str | None, source: Path | str) -> Path | None:
    """The word-vector file of the checkpoint config ``saved`` (read from ``source``): ``override`` (``--words``;
    a different digest is a warning: the same vectors re-saved in another format differ by their bytes, and a
    wrong width still fails in :func:`misc.store.checkpoint.load_words`), else the file it names, found by
    :func:`candidates` and checked by digest; None when it names none (converted original models)."""
    stored, ref = saved.get("word_vectors"), saved.get("words") or {}
    if override is not None:
        if ref.get("sha256") and Path(override).is_file() and sha256(Path(override)) != ref["sha256"]:
            log.warning("--words %s is not the file %s was trained with (%s, sha256 %s): its embeddings are only "
                        "right if these are the same vectors", override, source, ref["file"], ref["sha256"][:12])
        return Path(override)
    if stored is None:
        return None
    name = ref.get("file") or Path(stored).name
    digest = ref.get("sha256")
    present = [path for path in candidates(stored, ref, legacy=not ref) if path.is_file() or path.is_dir()]
    for path in present:
        if digest is None or path.is_dir() or sha256(path) == digest:
            return path
    about = f"checkpoint {source} needs word vectors {name!r} ({f'sha256 {digest[:12]}; ' if digest else ''}" \
            f"key config.word_vectors = {stored!r})"
    if present:
        raise UserError(f"{about}: {present[0]} has another sha256 ({sha256(present[0])[:12]}); put the right "
                        f"file under {config.DATA} or pass --words PATH to use this one anyway")
    raise UserError(f"{about}: not found under {config.DATA} (the data root) nor at config key word_vectors; "
                    f"pass --words PATH")
