"""Studies of the embedded model built on the whole stack: its training data (`data`), the tiny LLaVA's
shape (`model`), training (`train`, `sam_train`), the testbed's question families and their scoring
(`evaluate`), localization (`localization`, `gaze`, `probe`), attention -> SAM (`sam_eval`) and the risk
score's calibration (`risk`). The method sweep that runs them through eval jobs is `evals.sweep`."""
