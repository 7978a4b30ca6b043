"""Benchmark evaluation: DreamBench and CustomConcept101 definitions, the generation plan, DINO / CLIP metrics.

`benchmarks` says what a benchmark is (subjects, prompts, real photos), `plan` what to generate and where,
`generate` runs the plan with the pipeline, `encoders` (`vit_jax`), `cache`, `metrics` and `evaluate` score a
folder, `report` writes the tables and compares two.
"""
