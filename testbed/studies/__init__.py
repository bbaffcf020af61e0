"""Studies of the embedded model built on the whole stack: its training data (`data`), the tiny LLaVA's
shape (`model`), training (`train`, `sam_train`), evaluation (`evaluate`, `localization`, `gaze`,
`sam_eval`, `probe`), the risk score's calibration (`risk`) and the method sweep (`sweep`)."""
