"""Stage runners: each turns a stage's config and the outputs of the stages it reads into
files in its directory (`run(ctx) -> summary`), through library calls. A stage never
imports another stage: what it reads is declared in experiments/pipeline.py and handed
over as a StageContext (experiments/workdir.py)."""
