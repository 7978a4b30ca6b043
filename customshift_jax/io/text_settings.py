"""The text settings a model was trained with (T5 length, CLIP layer), recorded beside its weights, so that
generation encodes prompts the way training did.

Recorded as {"max_sequence_length": int, "clip_skip": int | null} under "text_settings" in our checkpoint's
marker (customshift_checkpoint.json) and in the "customshift_lora" metadata of each LoRA file. `generate`,
`encode`, `prepare`, `demo` and `CustomShiftPipeline` take the recorded values as their defaults (a LoRA's over
the checkpoint's) and say in one line when an explicit value overrides them with another one.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from customshift_jax.io.checkpoint import (
    MARKER,
    MARKER_HASH_KEY,
    is_checkpoint,
    marker_hash,
    read_marker,
    verify_marker,
)
from customshift_jax.io.lora_files import BETA_FILE, CGB_FILE, CUSTOMSHIFT_METADATA_KEY, RAB_FILE, TEXT_SETTINGS_KEY

DEFAULT_MAX_SEQUENCE_LENGTH = 256  # diffusers' SD3 default: what a model that records nothing is encoded with
Note = Callable[[str], Any]


@dataclasses.dataclass(frozen=True)
class TextSettings:
    """How prompts were encoded for training: T5 tokens, and the CLIP hidden layer (None: the penultimate)."""

    max_sequence_length: int
    clip_skip: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"max_sequence_length": int(self.max_sequence_length), "clip_skip": self.clip_skip}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "TextSettings":
        """Parse a recorded entry; a malformed one is an error naming `where` it was read."""
        length = data.get("max_sequence_length") if isinstance(data, Mapping) else None
        skip = data.get("clip_skip") if isinstance(data, Mapping) else None
        ok_length = isinstance(length, int) and not isinstance(length, bool) and 1 <= length <= 512
        ok_skip = skip is None or (isinstance(skip, int) and not isinstance(skip, bool) and skip >= 0)
        if not (ok_length and ok_skip):
            raise ValueError(f"{where}: {TEXT_SETTINGS_KEY!r} is {json.dumps(data)}; expected "
                             '{"max_sequence_length": 1..512, "clip_skip": null or >= 0}: rewrite it with '
                             "customshift_jax.io.text_settings.record_in_checkpoint / record_in_lora.")
        return cls(length, skip)


@dataclasses.dataclass(frozen=True)
class Recorded:
    """Text settings as recorded, and where (said in the notes, e.g. "ckpt/customshift_checkpoint.json")."""

    settings: TextSettings
    source: str


def checkpoint_text_settings(path: str | Path) -> Recorded | None:
    """What our checkpoint at `path` records; None for a diffusers folder or a checkpoint that records nothing."""
    path = Path(path)
    if not is_checkpoint(path):
        return None
    data = read_marker(path).get(TEXT_SETTINGS_KEY)
    where = str(path / MARKER)
    return None if data is None else Recorded(TextSettings.from_json(data, where), where)


def lora_text_settings(folder: str | Path) -> Recorded | None:
    """What the LoRA files in `folder` (or beside one of them) record; None when they record nothing. Files that
    record different settings are an error."""
    from safetensors import safe_open

    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    found: dict[str, TextSettings] = {}
    for name in (CGB_FILE, RAB_FILE, BETA_FILE):
        path = folder / name
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get(CUSTOMSHIFT_METADATA_KEY, "null") or "null")
        except Exception:  # noqa: BLE001 -- a damaged file is named by load_lora_files, which reads it next
            continue
        if isinstance(meta, dict) and meta.get(TEXT_SETTINGS_KEY) is not None:
            found[name] = TextSettings.from_json(meta[TEXT_SETTINGS_KEY], str(path))
    if not found:
        return None
    if len(set(found.values())) > 1:
        raise ValueError(f"{folder}: the LoRA files record different text settings "
                         f"({', '.join(f'{k}: {v.to_json()}' for k, v in found.items())}); re-export the LoRA.")
    name, settings = next(iter(found.items()))
    return Recorded(settings, f"{folder / name}")


def combine(checkpoint: Recorded | None, lora: Recorded | None, note: Note) -> Recorded | None:
    """The settings that apply: the LoRA's over the checkpoint's (it was trained last), said when they differ."""
    if checkpoint is not None and lora is not None and lora.settings != checkpoint.settings:
        note(f"the LoRA was trained with {_describe(lora.settings)} ({lora.source}), the checkpoint with "
             f"{_describe(checkpoint.settings)} ({checkpoint.source}); using the LoRA's.")
    return lora or checkpoint


def resolve_max_sequence_length(given: int | None, recorded: Recorded | None, note: Note,
                                flag: str = "--max-sequence-length") -> int:
    """`given` when set (said in one line when it differs from the recorded length), else the recorded length,
    else `DEFAULT_MAX_SEQUENCE_LENGTH`."""
    if given is None:
        return recorded.settings.max_sequence_length if recorded else DEFAULT_MAX_SEQUENCE_LENGTH
    if recorded is not None and given != recorded.settings.max_sequence_length:
        note(f"{flag} {given} differs from the {recorded.settings.max_sequence_length} this model was trained with "
             f"({recorded.source}); prompts may not draw what they say (leave it out to use "
             f"{recorded.settings.max_sequence_length}).")
    return given


def recorded_clip_skip(recorded: Recorded | None) -> int | None:
    return recorded.settings.clip_skip if recorded else None


def stderr_note(message: str) -> None:
    """The CLI's form of a note: one `note: ...` line on stderr."""
    import sys

    print(f"note: {message}", file=sys.stderr)


def _describe(settings: TextSettings) -> str:
    text = f"T5 length {settings.max_sequence_length}"
    return text + (f", clip_skip {settings.clip_skip}" if settings.clip_skip is not None else "")


def record_in_checkpoint(path: str | Path, settings: TextSettings) -> Path:
    """Add (or replace) the text settings in the marker of our checkpoint at `path`, nothing else changed (the
    params and their hashes stay as they are); the marker is replaced atomically, in the writer's format."""
    path = Path(path)
    marker = read_marker(path)
    verify_marker(path, marker)  # an edited marker is not blessed with a fresh hash
    marker[TEXT_SETTINGS_KEY] = settings.to_json()
    if MARKER_HASH_KEY in marker:  # the marker's hash covers its fields: this one included
        marker[MARKER_HASH_KEY] = marker_hash(marker)
    tmp = path / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(marker, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MARKER)
    return path / MARKER


def record_in_lora(folder: str | Path, settings: TextSettings) -> list[Path]:
    """Rewrite the LoRA files in `folder` with the text settings in their metadata, through `save_lora_files`
    (the tensors are read, checked and written back unchanged)."""
    from customshift_jax.io.lora_files import load_lora_files, save_lora_files

    state_dict, lora = load_lora_files(folder)
    return save_lora_files(folder, state_dict, lora, text_settings=settings.to_json())
