"""Lucid as a service: the REST API on Ray Serve (`serve.app`), its FastAPI layer (`serve.api`), the model side
(`serve.engine`, `serve.runners`), config (`serve.config`), eval jobs (`serve.evals`) and metrics."""
