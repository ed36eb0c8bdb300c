"""One flat recipe per stage: `Config` (the stage's typed config) and `run(cfg, ctx)`."""
