"""Benchmark definitions and the generation plan: DreamBench as published, CustomConcept101's layout, shards."""
import json

import pytest
from conftest import DREAMBENCH_LIVE_PROMPTS, DREAMBENCH_OBJECT_PROMPTS, DREAMBENCH_SUBJECTS
from PIL import Image

from customshift_jax.eval.benchmarks import load_benchmark, load_customconcept101, load_dreambench
from customshift_jax.eval.plan import make_plan, parse_shard, select, shard_items


def test_dreambench_subjects_prompts_and_live_split(dreambench):
    bench = load_dreambench(dreambench)
    assert [s.name for s in bench.subjects] == list(DREAMBENCH_SUBJECTS)
    assert all(len(s.prompts) == len(DREAMBENCH_LIVE_PROMPTS if s.live else DREAMBENCH_OBJECT_PROMPTS)
               for s in bench.subjects)
    live = sorted(s.name for s in bench.subjects if s.live)
    assert live == ["cat", "dog", "dog2"]
    plushie = bench.subject("bear_plushie")
    assert plushie.class_word == "stuffed animal" and plushie.prompts[0] == "a stuffed animal in the jungle"
    assert bench.subject("dog").prompts[2] == "a dog wearing a red hat"  # live subjects: accessorisation
    assert bench.subject("can").prompts[3] == "a can with a wheat field in the background"
    assert sum(len(s.photos) for s in bench.subjects) == sum(n for _, n in DREAMBENCH_SUBJECTS.values())


def test_plan_paths_seeds_references_and_shards(dreambench):
    bench = select(load_dreambench(dreambench), ["cat", "dog", "can"], max_prompts=3)
    plan = make_plan(bench, images_per_prompt=4, seed=10, reference_rule="first")
    assert len(plan) == 3 * 3 * 4 and plan[5].image == "cat/01_11.png" and plan[5].seed == 11
    assert {p.reference for p in plan if p.subject == "dog"} == {str(dreambench / "dog" / "00.jpg")}
    cycled = make_plan(bench, images_per_prompt=4, seed=0, reference_rule="cycle")
    assert [p.reference.rsplit("/", 1)[1] for p in cycled[:4]] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]
    shards = [shard_items(plan, (i, 2)) for i in range(2)]
    assert sorted(p.image for s in shards for p in s) == sorted(p.image for p in plan)  # each image once
    assert {p.subject for p in shards[0]} == {"cat", "can"} and {p.subject for p in shards[1]} == {"dog"}
    for bad in ("2/2", "1", "a/b"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="'unicorn' is not a dreambench subject"):
        select(load_dreambench(dreambench), ["unicorn"])


def _concept(root, name):
    (root / "benchmark_dataset" / name).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "benchmark_dataset" / name / "1.jpg")
    (root / "prompts").mkdir(exist_ok=True)
    (root / "prompts" / f"{name}.txt").write_text("photo of a {}\n\n{} in the snow\n")


def test_customconcept101_layouts(tmp_path):
    _concept(tmp_path, "pet_cat1")
    _concept(tmp_path, "wooden_pot")
    bare = load_customconcept101(tmp_path)  # no dataset.json: folder names as class words
    assert [s.name for s in bare.subjects] == ["pet_cat1", "wooden_pot"]
    assert bare.subject("wooden_pot").prompts == ("photo of a wooden pot", "wooden pot in the snow")
    entries = [{"class_prompt": "cat", "instance_data_dir": "./benchmark_dataset/pet_cat1",
                "prompt_filename": "./prompts/pet_cat1.txt"},
               {"class_prompt": "wooden pot", "instance_data_dir": "./benchmark_dataset/wooden_pot",
                "prompt_filename": "./prompts/wooden_pot.txt"}]
    (tmp_path / "dataset.json").write_text(json.dumps(entries))
    bench = load_benchmark("customconcept101", tmp_path)
    cat = bench.subject("pet_cat1")
    assert cat.live and cat.prompts[0] == "photo of a cat" and len(cat.photos) == 1
    assert not bench.subject("wooden_pot").live
    with pytest.raises(FileNotFoundError, match="neither dataset.json nor benchmark_dataset"):
        load_customconcept101(tmp_path / "prompts")
