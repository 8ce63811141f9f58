"""Worker targets and helper programs for the supervisor/worker tests (importable in children)."""
