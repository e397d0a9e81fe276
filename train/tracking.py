"""Where metrics go: metrics.jsonl (always), wandb (when enabled), PNG plots at the end.

Only the main process makes a Tracker that writes; the others get one whose methods do nothing.
"""
import json
import os

from train import atomic


class Tracker:
    def __init__(self, run_dir: str, cfg=None, enabled: bool = True, wandb_id=None, config_dict=None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.run_dir = run_dir
        self.enabled = enabled
        self.wandb_run = None
        if enabled and cfg is not None and cfg.wandb.enabled:
            import wandb
            self.wandb_run = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode,
                group=cfg.wandb.group, name=run_name(cfg, run_dir), id=wandb_id, resume="allow",
                dir=run_dir, config=config_dict)

    @property
    def wandb_id(self):
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, record: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            split = record["split"]
            self.wandb_run.log({f"{split}/{k}": v for k, v in record.items() if k != "split"},
                               step=record["step"])

    def truncate_after(self, examples: int):
        """Drop records written after a checkpoint, so a resumed run repeats none of them."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [line for line in read_metrics(self.path) if line["examples"] <= examples]
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def finish(self, exit_code: int = 0):
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None

    def plot(self):
        if self.enabled and os.path.exists(self.path):
            plot_metrics(read_metrics(self.path), os.path.join(self.run_dir, "plots"))


def run_name(cfg, run_dir: str) -> str:
    """exp_name; a job of a sweep (a dir inside the sweep dir ${cache_dir}/${exp_name}) adds its
    dir name, so the runs of one wandb group tell their settings apart."""
    inside = os.path.relpath(run_dir, os.path.join(cfg.cache_dir, cfg.exp_name))
    return cfg.exp_name if inside == "." or inside.startswith("..") else f"{cfg.exp_name}/{inside}"


def read_metrics(path: str) -> list:
    """The records of metrics.jsonl; a last line torn by a kill or a full disk is left out."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    return [json.loads(line) for line in lines]


def plot_metrics(records: list, out_dir: str):
    """loss.png, accuracy.png, margin.png: train and eval curves against examples seen."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    for metric in ("loss", "accuracy", "margin"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in ("train", "eval"):
            points = [(r["examples"], r[metric]) for r in records if r["split"] == split and metric in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if split == "eval" else None, label=split)
        ax.set_xlabel("training pairs seen")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{metric}.png"), dpi=100)
        plt.close(fig)
