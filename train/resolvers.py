"""OmegaConf resolvers used by config/ (besides ${pkg:...}, registered by train/config.py)."""
import hashlib

from omegaconf import OmegaConf

MAX_SUBDIR = 200  # bytes; file names are limited to 255 on common filesystems


def job_subdir(override_dirname: str) -> str:
    """${job_subdir:...}: a sweep job's subdir from Hydra's override_dirname (hydra.sweep.subdir in
    config/config.yaml): one path component, unique per override set.

    Hydra leaves '/' in values (model.name_or_path=org/model, datasets.jsonl.path=/data/x.jsonl), which
    would nest job dirs inside each other; it is escaped. A name too long for the filesystem keeps a
    readable prefix and gains a hash of the whole, so distinct override sets stay distinct.
    """
    name = override_dirname.replace("%", "%25").replace("/", "%2F") or "defaults"
    if len(name.encode()) > MAX_SUBDIR:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = name.encode()[:MAX_SUBDIR - 13].decode(errors="ignore") + "-" + digest
    return name


def register_resolvers():
    """Register them; harmless to call again. Must run before Hydra composes the config."""
    if not OmegaConf.has_resolver("job_subdir"):
        OmegaConf.register_new_resolver("job_subdir", job_subdir)
