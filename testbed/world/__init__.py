"""The pure shapes world: procedural scenes with exact ground truth (`scenes`), the language the
embedded model speaks about them (`language`), dataset rendering (`render`) and scenes drawn by other
code (`foreign`). Imports nothing of Lucid, so any layer may use it."""
