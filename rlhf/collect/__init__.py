"""Human preference collection: a web app that shows people pairs sampled from a policy, stores their judgments
in a database, and exports training data.

Modules, one job each: `settings` (config schema), `storage` (database), `assign` (who judges what next),
`pairs` (pair sources + background generation), `server` (FastAPI app), `serving` (uvicorn), `agreement` (pure
statistics), `report` (statistics from stored judgments), `export` (dataset + leaderboard), `simulate` (simulated
annotators over HTTP), `stage` (the pipeline stage), `cli` (`rlhf collect ...`).
"""
