"""python -m train.label: score sampled completions with a trained reward model, write feedback.

    python -m train.label --reward_model_path RUN/FINAL [--feedback_type pairwise] samples.json out.json
    accelerate launch --config_file accelerate_config/ddp_cpu_2proc.yaml -m train.label ...

The argument names are those of HALOs' train/label.py. Every pass over the samples is streamed,
so memory does not grow with the file (only one float per sample is kept, for thresholds and pairs):
1. no path the run writes (output, partial and temporary files) may be the samples file; every
   process reads and checks the whole samples file: a bad row stops the run before any model loads
   (for pairwise feedback, also a prompt_id whose samples have different prompts: a digest each);
2. the reward model loads with its training run's formatting settings (<run>/config.yaml); code
   shipped with it runs only with --trust_remote_code;
3. samples are scored in chunks: each process takes every W-th sample of a chunk, encodes it with
   train.data.formatting.encode (the function training uses), sorts by length and scores batches
   under inference_mode; the main process gathers the chunk and appends [row, reward] lines to
   <output>.partial.jsonl in input order, so a killed run continues where it stopped;
4. the main process turns rewards into scalar, binary or pairwise rows, writes them under a
   temporary name, renames the file into place and deletes the partial file.
Ctrl-C or SIGTERM stops the run with one line saying how many samples are saved (exit code 130).
"""
import argparse
import hashlib
import json
import os
import signal
import sys

from tqdm.auto import tqdm

from train import atomic
from train.config import DTYPE_NAMES
from train.errors import UserError, exit_with_error, is_main_process, leave
from train.labeling import feedback
from train.labeling.partial import PartialFile, header, partial_path
from train.labeling.samples import read_samples
from train.model_files import settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.label", description=__doc__.split("\n")[0])
    p.add_argument("samples_path", help="JSON array or JSONL of {prompt, output, prompt_id, sample_id, ...}")
    p.add_argument("output_path", help="feedback file: a JSON array, or JSONL when it ends in .jsonl (any case)")
    p.add_argument("--reward_model_path", required=True, help="a run's FINAL dir, a checkpoint dir or an HF classifier")
    p.add_argument("--feedback_type", choices=feedback.FEEDBACK_TYPES, default=None, help="default: scalar")
    p.add_argument("--feedback_mode", choices=feedback.PAIR_MODES, default=None,
                   help="pairwise: how pairs are chosen (default: max)")
    p.add_argument("--threshold", default=None,
                   help="number, 'median' or 'mean'. binary: label 1 if reward >= it (default median); "
                        "pairwise: keep pairs whose reward gap exceeds it (default 0)")
    p.add_argument("--batch_size", type=int, default=16, help="samples per forward per process")
    p.add_argument("--max_length", type=int, default=None, help="tokens; default: the training run's")
    p.add_argument("--max_prompt_length", type=int, default=None, help="tokens; default: the training run's")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: the training run's")
    p.add_argument("--num_workers", type=int, default=None,
                   help="processes that read and encode samples while the model scores; default: 1 on a "
                        "GPU or when torch leaves a CPU core free, else 0")
    p.add_argument("--packing", choices=["on", "off"], default="on",
                   help="on: no padding, where the model allows it (train/data/packing.py)")
    p.add_argument("--share_prompt", choices=["on", "off"], default="on",
                   help="on: decoders compute the prompt shared by a prompt_id's samples once (needs packing)")
    p.add_argument("--seed", type=int, default=None, help="pairwise: random pairing and A/B order (default: 0)")
    p.add_argument("--split", default=None, help="label only samples whose 'split' field is this")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run Python code shipped with the model or tokenizer (auto_map); never taken "
                        "from the run's config.yaml")
    return p.parse_args(argv)


# Options that act on some feedback types only: given with another type, one is refused, not ignored.
ONLY_FOR = {"threshold": ("binary", "pairwise"), "feedback_mode": ("pairwise",), "seed": ("pairwise",)}


def check_args(args):
    args.feedback_type = args.feedback_type or "scalar"
    given = [key for key in ONLY_FOR if getattr(args, key) is not None]
    args.threshold = feedback.parse_threshold(args.threshold, args.feedback_type)
    for key in given:
        if args.feedback_type not in ONLY_FOR[key]:
            raise UserError(f"--{key} is for --feedback_type {' or '.join(ONLY_FOR[key])}: "
                            f"it does nothing with {args.feedback_type} feedback")
    args.feedback_mode = args.feedback_mode or "max"
    args.seed = 0 if args.seed is None else args.seed
    if not os.path.isfile(args.samples_path):
        raise UserError(f"{args.samples_path}: no such file")
    # Every path the labeler writes, checked before anything is read or written.
    if same_file(args.output_path, args.samples_path):
        raise UserError(f"output_path is the samples file {args.samples_path}: refusing to overwrite the input")
    for what, path in (("progress file", partial_path(args.output_path)),
                       ("temporary file", atomic.temp_path(args.output_path))):
        if same_file(path, args.samples_path):
            raise UserError(f"the {what} {path} is the samples file {args.samples_path}: choose another output_path")
    out = os.path.realpath(args.output_path)
    if os.path.isdir(out):
        raise UserError(f"output_path {args.output_path} is a directory: name a file")
    if not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"output_path {args.output_path}: directory {os.path.dirname(out)} does not exist")
    for key, least in (("batch_size", 1), ("max_length", 1), ("max_prompt_length", 1), ("num_workers", 0)):
        value = getattr(args, key)
        if value is not None and value < least:
            raise UserError(f"--{key} must be at least {least}, got {value}")


def same_file(written: str, samples: str) -> bool:
    """Whether writing `written` would write the samples file: the same path once '..' and
    symlinks (a parent dir, or a link at `written` itself) are resolved, or the same inode (a
    hard link)."""
    if os.path.realpath(written) == os.path.realpath(samples):
        return True
    try:
        return os.path.samefile(written, samples)
    except OSError:  # `written` does not exist yet
        return False


def _whole_chunk(chunk):
    """collate_fn: each item of EncodedChunks is already a whole chunk (a function, not a lambda,
    so that spawned workers can unpickle it)."""
    return chunk


def die_with_parent(worker_id: int):
    """DataLoader worker_init_fn: on Linux the worker gets SIGKILL when the labeler dies. A labeler
    killed with SIGKILL would otherwise leave its worker behind, blocked on a full queue for good,
    holding its memory (measured: 300 MB each)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def default_workers(accelerator) -> int:
    """1 when a core is free to read and encode while the model scores: always with a GPU; on CPU
    only if torch's threads leave one idle, as a worker on a busy core slows the forward more
    (OpenMP threads spin-wait for the one it preempts) than it saves."""
    import torch

    if accelerator.device.type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores > accelerator.num_processes * torch.get_num_threads() else 0


def score_all(args, scorer, accelerator, partial, total: int, done: int) -> int:
    """Score the samples after the first `done` with a scoring.Scorer; the main process appends them
    to the partial file.

    Returns how many samples this process had to truncate."""
    import torch
    from accelerate.utils import gather_object

    from train.labeling.scoring import CHUNK_BATCHES, EncodedChunks

    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    chunks = EncodedChunks(args.samples_path, args.split, done, args.batch_size * world * CHUNK_BATCHES,
                           rank, world, scorer.tokenizer, scorer.format)
    workers = default_workers(accelerator) if args.num_workers is None else args.num_workers
    loader = torch.utils.data.DataLoader(chunks, batch_size=None, collate_fn=_whole_chunk, num_workers=workers,
                                         worker_init_fn=die_with_parent)
    bar = tqdm(total=total, initial=done, unit="sample", desc="labeling", disable=not main, dynamic_ncols=True)
    truncated = 0
    try:
        for size, rows, encoded, cut, prompt_ids in loader:
            end = bar.n + size  # where the bar stands once this chunk is saved
            # Per batch, not per chunk of CHUNK_BATCHES: every process scores its share at about the
            # main one's pace, so the bar moves by world times the main process's batch.
            rewards = scorer.score_encoded(encoded, prompt_ids, lambda n: bar.update(min(n * world, end - bar.n)))
            everything = gather_object(list(zip(rows, rewards)))
            truncated += cut
            if main:
                partial.append(sorted(everything))
                bar.update(end - bar.n)
    finally:
        bar.close()  # so that a message after it, a stop's included, starts on a line of its own
    return truncated


def scored_samples(args, partial):
    """(row, sample, reward) in input order: the samples file and the partial file read in step."""
    need_id = args.feedback_type == "pairwise"
    for (row, sample), (scored_row, reward) in zip(read_samples(args.samples_path, args.split, need_id),
                                                     partial.rewards(), strict=True):
        if row != scored_row:
            raise RuntimeError(f"{partial.path} is out of step with {args.samples_path} at row {row}")
        yield row, sample, reward


def _threshold(threshold, value: float) -> str:
    return f"{threshold} {value:.4g}" if isinstance(threshold, str) else f"{value:g}"


def write_feedback(args, partial) -> str:
    """The output file, written under a temporary name and renamed into place. Returns a summary."""
    with feedback.feedback_file(args.output_path) as out:
        if args.feedback_type == "scalar":
            for _, sample, reward in scored_samples(args, partial):
                out.write(feedback.scalar_row(sample, reward))
            return f"{out.count} scalar rows"
        if args.feedback_type == "binary":
            return write_binary(args, partial, out)
        return write_pairs(args, partial, out)


def write_binary(args, partial, out) -> str:
    value = feedback.resolve_threshold(args.threshold, [r for _, r in partial.rewards()])
    positive = 0
    for _, sample, reward in scored_samples(args, partial):
        row = feedback.binary_row(sample, reward, value)
        positive += row["label"]
        out.write(row)
    return f"{out.count} binary rows, {positive} labelled 1 (reward >= {_threshold(args.threshold, value)})"


def write_pairs(args, partial, out) -> str:
    """Pass 1 groups (row, reward) by prompt_id, without texts; pass 2 writes each pair as soon as
    both its samples have been read, holding a text only until its last pair is written."""
    groups, seen, repeats = {}, set(), 0
    for row, sample, reward in scored_samples(args, partial):
        digest = hashlib.blake2b(json.dumps([sample["prompt_id"], sample["output"]]).encode(), digest_size=16).digest()
        if digest in seen:  # the same output twice is no comparison (and training rejects A == B)
            repeats += 1
            continue
        seen.add(digest)
        groups.setdefault(sample["prompt_id"], []).append((row, reward))
    pairs, value = feedback.plan_pairs(groups, args.feedback_mode, args.threshold, args.seed)
    uses, ready = {}, {}  # row -> pairs still to write with it; last row of a pair -> its pairs
    for a, b in pairs:
        uses[a], uses[b] = uses.get(a, 0) + 1, uses.get(b, 0) + 1
        ready.setdefault(max(a, b), []).append((a, b))
    held = {}
    for row, sample, reward in scored_samples(args, partial):
        if row in uses:
            held[row] = (sample, reward)
        for a, b in ready.pop(row, []):
            out.write(feedback.pair_row(held[a][0], held[b][0], held[a][1], held[b][1]))
            for k in (a, b):
                uses[k] -= 1
                if not uses[k]:
                    del held[k], uses[k]
    return (f"{out.count} pairs from {len(groups)} prompts (mode {args.feedback_mode}, reward gap > "
            f"{_threshold(args.threshold, value)}; {repeats} repeated outputs left out)")


def label(args):
    check_args(args)
    need_id = args.feedback_type == "pairwise"
    splits = set()
    total = sum(1 for _ in read_samples(args.samples_path, args.split, need_id, splits))  # checks every row
    if args.split is not None and splits and json.dumps(args.split) not in splits:
        # Samples without a split field are labelled under any --split, so a typo would label only them.
        raise UserError(f"--split '{args.split}': no sample of {args.samples_path} has it; "
                        f"splits there: {', '.join(sorted(splits))}")
    if not total:
        raise UserError(f"{args.samples_path}: no samples to label" + (f" in split '{args.split}'" if args.split else ""))
    setup = settings(args.reward_model_path, args)
    # Imported only now: torch and transformers take about 8 s, and a mistake in the arguments, the
    # model dir or the samples file is reported before that.
    import torch
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object

    from train.labeling.scoring import Scorer, load_reward_model

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # else each CPU process is "rank 0 of 1"
    main = accelerator.is_main_process
    log = (lambda message: tqdm.write(message, file=sys.stderr)) if main else (lambda message: None)
    model, tokenizer = load_reward_model(args.reward_model_path, setup, args.trust_remote_code)
    partial = PartialFile(partial_path(args.output_path), header(args.samples_path, args.split, args.reward_model_path, setup))
    done = [partial.resume(log) if main else 0]
    broadcast_object_list(done)  # every process skips the same samples
    scorer = Scorer(model, tokenizer, setup["max_length"], setup["max_prompt_length"], setup["truncation"],
                    args.batch_size, accelerator.device, args.packing == "on", args.share_prompt == "on")
    log(f"labeling {total} samples from {args.samples_path} with {accelerator.num_processes} process(es); "
        f"max_length {setup['max_length']}, max_prompt_length {setup['max_prompt_length']}")
    try:
        truncated = sum(gather_object([score_all(args, scorer, accelerator, partial, total, done[0])]))
        summary = write_feedback(args, partial) if main else None
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main()): what is saved stays for the rerun
        if main:
            log(f"stopped by a signal after {partial.saved()} samples scored (saved); "
                "rerun the same command to continue")
        leave(130)
    if main:
        os.remove(partial.path)
        print(f"wrote {args.output_path}: {summary}; {total} samples scored by "
              f"{accelerator.num_processes} process(es), {truncated} of those truncated this run")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main(argv=None):
    # SIGTERM (a scheduler's, `kill`'s) stops the run as Ctrl-C does, instead of killing it silently.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        label(parse_args(argv))
    except UserError as err:
        exit_with_error(err)
    except KeyboardInterrupt:  # before scoring began or once the output is written: label() reports a stop between
        if is_main_process():
            print("stopped by a signal; rerun the same command to continue", file=sys.stderr)
        leave(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
    leave(0)  # a distributed process ends at once (train/errors.py)
