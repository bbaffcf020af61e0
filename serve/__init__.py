"""Reserved for the serve issue (see README); intentionally empty for now."""
