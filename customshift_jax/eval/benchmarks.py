"""DreamBench and CustomConcept101 as data: subjects (name, class word, live or object, real photos) and prompts.

DreamBench (Ruiz et al. 2023): `ROOT/prompts_and_classes.txt` and `ROOT/<subject>/*.jpg`; the prompt templates'
"{0} {1}" (unique token, class word) become the class word alone, as encoder-based methods prompt it.
CustomConcept101 (Kumari et al. 2023), as its repository lays it out: `ROOT/dataset.json`, a list of
{"class_prompt", "instance_data_dir", "prompt_filename"} (paths relative to ROOT), or without it
`ROOT/benchmark_dataset/<concept>/` photos with `ROOT/prompts/<concept>.txt`; prompt lines carry "{}" for the
concept, filled with its class word.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# DreamBench's live subjects are its cats and dogs (they get the live-subject prompt list); the rest are objects.
LIVE_CLASSES = ("cat", "dog")
BENCHMARKS = ("dreambench", "customconcept101")


@dataclasses.dataclass(frozen=True)
class Subject:
    """One subject: `name` (its folder), `class_word` (the prompt's and CustomShift's subject name), its prompts."""

    name: str
    class_word: str
    live: bool
    photos: tuple[Path, ...]
    prompts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark: its name, root folder and subjects (in a fixed order)."""

    name: str
    root: Path
    subjects: tuple[Subject, ...]

    def subject(self, name: str) -> Subject:
        """The subject called `name`; a ValueError listing the known ones otherwise."""
        for s in self.subjects:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.subjects)
        raise ValueError(f"subject {name!r} is not a {self.name} subject (known: {known}).")


def photos_of(folder: Path) -> tuple[Path, ...]:
    """The image files of a folder, in sorted order (the order the reference rule picks from)."""
    return tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))


def _python_list(text: str, header: str) -> list[str]:
    """The quoted templates of the `prompt_list = [...]` after `header` in prompts_and_classes.txt."""
    start = text.find(header)
    if start < 0:
        raise ValueError(f"prompts_and_classes.txt has no {header!r} section.")
    body = text[start:text.index("]", start)]
    return re.findall(r"'([^']*)'\.format", body)


def load_dreambench(root: str | Path) -> Benchmark:
    """DreamBench from its folder: 30 subjects; objects get the object prompts, cats and dogs the live ones."""
    root = Path(root)
    spec = root / "prompts_and_classes.txt"
    if not spec.is_file():
        raise FileNotFoundError(f"--data {root}: no prompts_and_classes.txt; give the DreamBench folder (the "
                                "google/dreambooth dataset: prompts_and_classes.txt and one folder per subject).")
    text = spec.read_text()
    classes = re.findall(r"^([a-z0-9_]+),([a-z ]+)$", text.split("Prompts")[0], flags=re.MULTILINE)
    classes = [(n, c) for n, c in classes if n != "subject_name"]
    lists = {False: _python_list(text, "Object Prompts"), True: _python_list(text, "Live Subject Prompts")}
    subjects = []
    for name, cls in classes:
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"--data {root}: subject folder {name}/ is missing (prompts_and_classes.txt "
                                    "lists it).")
        live = cls in LIVE_CLASSES
        prompts = tuple(t.replace("{0} {1}", cls) for t in lists[live])
        subjects.append(Subject(name, cls, live, photos_of(folder), prompts))
    if not subjects:
        raise ValueError(f"{spec} lists no subjects (expected 'subject_name,class' lines).")
    return Benchmark("dreambench", root, tuple(subjects))


def _concept_prompts(path: Path, class_word: str) -> tuple[str, ...]:
    if not path.is_file():
        raise FileNotFoundError(f"CustomConcept101 prompt file {path}: no such file.")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return tuple(line.replace("{}", class_word) for line in lines)


def load_customconcept101(root: str | Path) -> Benchmark:
    """CustomConcept101 from a local copy of its repository layout (see the module docstring)."""
    root = Path(root)
    index = root / "dataset.json"
    if index.is_file():
        entries = json.loads(index.read_text())
        rows = [(Path(e["instance_data_dir"]).name, e["class_prompt"], root / e["instance_data_dir"],
                 root / e["prompt_filename"]) for e in entries]
    elif (root / "benchmark_dataset").is_dir():
        rows = [(d.name, d.name.replace("_", " "), d, root / "prompts" / f"{d.name}.txt")
                for d in sorted((root / "benchmark_dataset").iterdir()) if d.is_dir()]
    else:
        raise FileNotFoundError(f"--data {root}: neither dataset.json nor benchmark_dataset/; give a copy of the "
                                "CustomConcept101 folder (benchmark_dataset/<concept>/, prompts/<concept>.txt).")
    subjects = []
    for name, cls, folder, prompts in rows:
        if not folder.is_dir():
            raise FileNotFoundError(f"--data {root}: concept folder {folder} is missing.")
        live = cls.split()[-1] in LIVE_CLASSES
        subjects.append(Subject(name, cls, live, photos_of(folder), _concept_prompts(prompts, cls)))
    return Benchmark("customconcept101", root, tuple(subjects))


def load_benchmark(name: str, root: str | Path) -> Benchmark:
    """The benchmark `name` (dreambench or customconcept101) from its local folder."""
    if name == "dreambench":
        return load_dreambench(root)
    if name == "customconcept101":
        return load_customconcept101(root)
    raise ValueError(f"--benchmark {name!r} is not known; give one of {', '.join(BENCHMARKS)}.")
