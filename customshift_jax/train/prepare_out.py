"""The OUT folder of `customshift prepare`, run by one process or by every process of a job: checked by all,
cleared (or kept, to resume) and marked by process 0, each process's shards under its own prefix
(`shard-pPPPPP-NNNNN`, one per block of its records) with a progress record of the finished ones and, at the end,
a part record beside them, and one index written by process 0 once every part is in, listing the shards in
process order, so the records keep the manifest's order whatever the process count.

A rerun of the same manifest with the same settings (the marker's fingerprint) keeps the blocks that the progress
records list and encodes only the rest; with other settings everything is redone."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from customshift_jax.io.folder_lock import LOCK_NAME
from customshift_jax.io.safe_files import make_dir, refuse_link, write_text
from customshift_jax.parallel.distributed import allgather_counts, barrier
from customshift_jax.train.shard_writer import INDEX_NAME, write_index

MARKER = ".prepare.json"  # in OUT while (and after) a prepare writes it: which manifest it holds
PART_PREFIX = ".part-"  # .part-PPPPP.json: what process P wrote (a job of several processes)
PROGRESS_PREFIX = ".progress-"  # .progress-PPPPP.json: the blocks process P has finished, for a resume


def _ours(out: Path, name: str) -> bool:
    """A name an unfinished prepare leaves in OUT: the marker, a shard folder, a process's part record."""
    if name == MARKER:
        return True
    if name.startswith((PART_PREFIX, PROGRESS_PREFIX)) and name.endswith(".json"):
        return (out / name).is_file() and not (out / name).is_symlink()
    return name.startswith("shard-") and (out / name).is_dir() and not (out / name).is_symlink()


def check_destination(out: Path, manifest: str | Path, log: Callable[[str], Any] | None = print, *,
                      clear: bool = True) -> list[str]:
    """OUT must be new, empty, or an interrupted `prepare` of this same manifest (whose shards are then redone);
    a finished dataset, a link, or a folder holding anything else is refused, naming what is there. Returns the
    leftover names; `clear` removes them (only one process of a job clears)."""
    out = refuse_link(Path(out), "prepare's OUT")
    if not out.exists():
        return []
    if not out.is_dir():
        raise ValueError(f"OUT {out} is a file; give a folder for the shards.")
    if (out / INDEX_NAME).exists():
        raise ValueError(f"{out} already holds a prepared dataset; choose another OUT or delete it.")
    names = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)  # the lock: this run's own (process 0)
    if not names:
        return []
    try:
        earlier = json.loads((out / MARKER).read_text())["manifest"]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = None
    if earlier != str(Path(manifest).absolute()) or not all(_ours(out, n) for n in names):
        foreign = [n for n in names if not _ours(out, n)] or names
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"OUT {out} is not empty and is not an unfinished prepare of {manifest} (it holds {shown}); "
                         "choose a new or empty folder.")
    leftovers = [n for n in names if n != MARKER]
    if clear:
        _remove(out, leftovers)
        if log:
            log(f"{out}: an unfinished prepare of the same manifest; its {len(leftovers)} leftover(s) are redone")
    return leftovers


def _remove(out: Path, names: list[str]) -> None:
    for n in names:
        if (out / n).is_dir() and not (out / n).is_symlink():
            shutil.rmtree(out / n)
        else:
            with contextlib.suppress(FileNotFoundError):
                (out / n).unlink()


class PrepareDestination:
    """OUT for process `index` of `count`: `begin` clears (or keeps, to resume) and marks it, `shard_prefix`
    names this process's shards, `done_blocks` / `record_blocks` read and write its progress, `gather` joins the
    processes' counts, `write_index` (process 0) lists every process's shards."""

    def __init__(self, out: str | Path, manifest: str | Path, *, index: int = 0, count: int = 1,
                 log: Callable[[str], Any] = print):
        self.out, self.manifest, self.index, self.count, self.log = Path(out), manifest, index, count, log
        self.existed = self.out.exists()
        check_destination(self.out, manifest, None, clear=False)  # every process: the same verdict, nothing moved

    @property
    def shard_prefix(self) -> str:
        return "shard-" if self.count == 1 else f"shard-p{self.index:05d}-"

    def begin(self, fingerprint: dict) -> None:
        """Process 0 keeps the finished blocks of an interrupted run with this `fingerprint` (the settings that
        shape the shards), clears everything else, and writes the marker; every process waits for it."""
        barrier("customshift-prepare-checked")  # nobody is still reading OUT when process 0 clears it
        if self.index == 0:
            leftovers = check_destination(self.out, self.manifest, None, clear=False)
            keep = self._resumable(fingerprint) if leftovers else set()
            _remove(self.out, [n for n in leftovers if n not in (keep or set())])
            if leftovers:
                shards = len([n for n in keep or () if n.startswith("shard-")])
                self.log(f"{self.out}: an unfinished prepare of the same manifest; " + (
                    f"its {shards} finished shard(s) are kept, the rest redone" if keep is not None else
                    f"made with other settings or another process count: its {len(leftovers)} leftover(s) are "
                    "redone"))
            make_dir(self.out, "prepare's OUT")
            write_text(self.out / MARKER, json.dumps({"manifest": str(Path(self.manifest).absolute()),
                                                      "processes": self.count, "fingerprint": fingerprint}) + "\n",
                       what="prepare marker")
        barrier("customshift-prepare-begun")

    def _progress_path(self, index: int) -> Path:
        return self.out / f"{PROGRESS_PREFIX}{index:05d}.json"

    def _resumable(self, fingerprint: dict) -> set[str] | None:
        """The names to keep: every process's progress record and the shards it lists, when the earlier run had
        this fingerprint and process count and every record there reads; None when it cannot be resumed."""
        try:
            marker = json.loads((self.out / MARKER).read_text())
            if marker.get("fingerprint") != fingerprint or marker.get("processes") != self.count:
                return None
            keep = set()
            for i in range(self.count):
                path = self._progress_path(i)
                if not path.exists():  # this process had finished no block yet: it starts from its first
                    continue
                blocks = json.loads(refuse_link(path, "prepare progress").read_text())["blocks"]
                keep |= {path.name} | {b["shard"]["dir"] for b in blocks.values() if b["shard"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return keep if all((self.out / n).exists() for n in keep) else None

    def done_blocks(self) -> dict[int, dict]:
        """This process's finished blocks kept from an interrupted run (after `begin`): block -> its record."""
        path = self._progress_path(self.index)
        if not path.exists():
            return {}
        return {int(b): r for b, r in json.loads(path.read_text())["blocks"].items()}

    def record_blocks(self, blocks: dict[int, dict]) -> None:
        """This process's finished blocks, written after each one (atomically: a stop leaves the last whole)."""
        write_text(self._progress_path(self.index), json.dumps({"blocks": {str(b): r for b, r in blocks.items()}}),
                   what="prepare progress")

    def discard(self, blocks: dict[int, dict]) -> None:
        """Remove this process's shards of `blocks` and its progress record (a run stopped for bad data)."""
        _remove(self.out, [b["shard"]["dir"] for b in blocks.values() if b["shard"]])
        _remove(self.out, [self._progress_path(self.index).name])

    def gather(self, part: dict, counts: tuple[int, int, int]) -> Any:
        """Write this process's part record (several processes) and return every process's counts (a collective:
        all processes call it), as a (processes, 3) array of (bad, total, pairs)."""
        if self.count > 1:
            write_text(self.out / f"{PART_PREFIX}{self.index:05d}.json", json.dumps(part), what="prepare part")
        return allgather_counts(counts)

    def parts(self, own: dict) -> list[dict]:
        """Every process's part record, in process order (process 0, after `gather`)."""
        if self.count == 1:
            return [own]
        out = []
        for i in range(self.count):
            path = refuse_link(self.out / f"{PART_PREFIX}{i:05d}.json", "prepare part")
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: process {i}'s part record cannot be read ({e}); run prepare again.") from e
        return out

    def write_index(self, parts: list[dict], meta: dict) -> Path:
        """The index over every part's shards (in process order); the part records are then removed."""
        path = write_index(self.out, [s for p in parts for s in p["shards"]], meta)
        _remove(self.out, [f"{PART_PREFIX}{i:05d}.json" for i in range(self.count)] if self.count > 1 else [])
        _remove(self.out, [self._progress_path(i).name for i in range(self.count)])
        return path

    def abandon(self) -> None:
        """After a stop for bad data: process 0 removes the marker and part records, and OUT itself when this run
        made it and it is left empty (each process has already discarded its own shards)."""
        if self.index != 0:
            return
        _remove(self.out, [MARKER] + [n.name for n in self.out.glob(f"{PART_PREFIX}*.json")]
                + [n.name for n in self.out.glob(f"{PROGRESS_PREFIX}*.json")])
        if not self.existed:
            with contextlib.suppress(OSError):
                self.out.rmdir()
