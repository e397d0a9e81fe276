"""Data path: sources -> PreferenceExample -> formatted text -> token ids -> batches."""
