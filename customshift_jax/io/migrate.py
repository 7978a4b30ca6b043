"""Rewrite a checkpoint of an older format (marker version 1 or 2, no content hashes) as the current one: the same
params, configs, marker fields and beside-files, now with every piece's, config's and the marker's own hash."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from customshift_jax.io.checkpoint import (
    FOLDERS_KEY,
    MARKER,
    MARKER_HASH_KEY,
    VERSION,
    load_checkpoint,
    read_marker,
    save_checkpoint,
)

_MARKER_OWN = ("format", "version", "components", FOLDERS_KEY, MARKER_HASH_KEY)


def migrate_checkpoint(path: str | Path, *, log: Callable[[str], None] | None = None) -> bool:
    """Rewrite our checkpoint at `path` in place in the current format; False when it already is. The new one is
    complete beside the old before they swap, so a kill leaves the old one (or the new one) whole."""
    path = Path(path)
    marker = read_marker(path)
    if marker.get("version", 0) >= VERSION and MARKER_HASH_KEY in marker:
        return False
    components = load_checkpoint(path, verify=False)
    metadata = {k: v for k, v in marker.items() if k not in _MARKER_OWN}
    folders = {name: path / name for name in marker.get(FOLDERS_KEY, {})}
    new = path.with_name(f".{path.name}.migrating")
    old = path.with_name(f".{path.name}.before-migration")
    for stale in (new, old):
        if stale.exists():
            shutil.rmtree(stale)
    save_checkpoint(new, components, metadata=metadata, folders=folders, log=log)
    kept = set(components) | set(folders) | {MARKER}
    for item in sorted(path.iterdir()):  # what sits beside the components (text encoders, scheduler, ...)
        if item.name not in kept:
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, new / item.name)
    path.rename(old)
    new.rename(path)
    shutil.rmtree(old)
    return True
