"""``python -m pipelines.train SPEC [field=value ...]``: what ``ray job submit -- python -m pipelines.train`` runs."""

from pipelines.train.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
