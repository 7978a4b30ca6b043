"""The procedural subject world (DESIGN section 8): the world, its tiny SD3, the judge, the evaluation, the demo."""
