"""Token ids -> one padded batch: the one padding rule of training (loader.Collator) and labeling
(labeling/scoring.Scorer), so a reward model is scored on batches shaped as it was trained on;
and model_inputs(), what the model takes of a padded or packed batch, for both."""
import torch

# The tensors of a collated batch the model takes (packed batches add position_ids and reward_index).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "reward_index")


def pad_batch(input_ids: list, pad_token_id: int, token_type_ids: list = None) -> dict:
    """input_ids (and token_type_ids, when the tokenizer makes them) right-padded to the longest
    sequence, with attention_mask 1 on real tokens: the model reads the reward at the last 1
    (train/models.py), whatever the padding. One tensor per batch: far cheaper than one per row."""
    longest = max(len(s) for s in input_ids)

    def pad(seqs, value):
        return torch.tensor([s + [value] * (longest - len(s)) for s in seqs], dtype=torch.long)

    batch = {"input_ids": pad(input_ids, pad_token_id), "attention_mask": pad([[1] * len(s) for s in input_ids], 0)}
    if token_type_ids is not None:
        batch["token_type_ids"] = pad(token_type_ids, 0)
    return batch


def model_inputs(batch: dict, device) -> dict:
    """What the model takes of a collated batch, its tensors on `device`."""
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    if "spans" in batch:  # a packed batch: where each sequence's attention runs (train/data/packing.py)
        inputs["spans"] = batch["spans"]
    return inputs
