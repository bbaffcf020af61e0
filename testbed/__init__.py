"""The shapes-world testbed: procedural scenes with exact ground truth, its language, and the
training / evaluation of the embedded tiny LLaVA (committed under `testbed/weights/`)."""
