"""The OUT folder of `customshift prepare`, run by one process or by every process of a job: checked by all,
cleared and marked by process 0, each process's shards under its own prefix (`shard-pPPPPP-NNNNN`) with a part
record beside them, and one index written by process 0 once every part is in, listing the shards in process
order, so the records keep the manifest's order whatever the process count."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from customshift_jax.io.safe_files import make_dir, refuse_link, write_text
from customshift_jax.parallel.distributed import allgather_counts, barrier
from customshift_jax.train.shard_writer import INDEX_NAME, write_index

MARKER = ".prepare.json"  # in OUT while (and after) a prepare writes it: which manifest it holds
PART_PREFIX = ".part-"  # .part-PPPPP.json: what process P wrote (a job of several processes)


def _ours(out: Path, name: str) -> bool:
    """A name an unfinished prepare leaves in OUT: the marker, a shard folder, a process's part record."""
    if name == MARKER:
        return True
    if name.startswith(PART_PREFIX) and name.endswith(".json"):
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
    names = sorted(p.name for p in out.iterdir())
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
    """OUT for process `index` of `count`: `begin` clears and marks it, `shard_prefix` names this process's
    shards, `gather` joins the processes' counts, `write_index` (process 0) lists every process's shards."""

    def __init__(self, out: str | Path, manifest: str | Path, *, index: int = 0, count: int = 1,
                 log: Callable[[str], Any] = print):
        self.out, self.manifest, self.index, self.count, self.log = Path(out), manifest, index, count, log
        self.existed = self.out.exists()
        check_destination(self.out, manifest, None, clear=False)  # every process: the same verdict, nothing moved

    @property
    def shard_prefix(self) -> str:
        return "shard-" if self.count == 1 else f"shard-p{self.index:05d}-"

    def begin(self) -> None:
        """Process 0 clears an unfinished earlier run and writes the marker; every process waits for it."""
        barrier("customshift-prepare-checked")  # nobody is still reading OUT when process 0 clears it
        if self.index == 0:
            check_destination(self.out, self.manifest, self.log, clear=True)
            make_dir(self.out, "prepare's OUT")
            write_text(self.out / MARKER, json.dumps({"manifest": str(Path(self.manifest).absolute()),
                                                      "processes": self.count}) + "\n", what="prepare marker")
        barrier("customshift-prepare-begun")

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
        return path

    def abandon(self) -> None:
        """After a stop for bad data: process 0 removes the marker and part records, and OUT itself when this run
        made it and it is left empty (each process has already discarded its own shards)."""
        if self.index != 0:
            return
        _remove(self.out, [MARKER] + [n.name for n in self.out.glob(f"{PART_PREFIX}*.json")])
        if not self.existed:
            with contextlib.suppress(OSError):
                self.out.rmdir()
