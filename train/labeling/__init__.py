"""The parts of `python -m train.label` (train/label.py): samples in, scores, feedback out."""
