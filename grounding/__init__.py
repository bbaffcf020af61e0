"""Reserved for the grounding issue (see README); intentionally empty for now."""
