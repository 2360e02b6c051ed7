"""What a run started from a deployment (the Prefect UI form, an API call) may do.

The form is a remote entry point: whoever can open it can type any config file, override or data source.
A deployment run may not set model.trust_remote_code, read configs or data outside the deployment's allowed
roots, or load pickle weights, unless the deployment's own definition allows it (`allow:` in
deployments/deployments.yaml). `sftflow deploy` writes that policy into the deployment's tags, which the run
form cannot change; the flow reads them back from the deployment itself when it starts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from sftflow.env import SHARED_DATA
from sftflow.errors import UserError

ALLOW_TAG, ROOT_TAG = "sftflow.allow:", "sftflow.root:"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
GLOB_CHARS = "*?["


class FenceError(UserError):
    """A deployment run asked for something its deployment does not allow."""


class Fence(BaseModel):
    """A deployment's `allow:` section. Relative roots are relative to the directory `sftflow deploy` runs in."""

    model_config = ConfigDict(extra="forbid")

    roots: list[str] = ["configs", SHARED_DATA]
    trust_remote_code: bool = False
    pickle_weights: bool = False

    def to_tags(self, base: Path | None = None) -> list[str]:
        base = base or Path.cwd()
        flags = [f"{ALLOW_TAG}{name}" for name in ("trust_remote_code", "pickle_weights") if getattr(self, name)]
        return flags + [f"{ROOT_TAG}{(base / r).expanduser().resolve()}" for r in self.roots]

    @classmethod
    def from_tags(cls, tags: list[str]) -> "Fence":
        flags = {t.removeprefix(ALLOW_TAG) for t in tags if t.startswith(ALLOW_TAG)}
        return cls(roots=[t.removeprefix(ROOT_TAG) for t in tags if t.startswith(ROOT_TAG)],
                   trust_remote_code="trust_remote_code" in flags, pickle_weights="pickle_weights" in flags)


def deployment_fence() -> tuple[str, Fence] | None:
    """(deployment name, its fence) when this flow run was started from a deployment, else None.

    Read from the flow run's own record, not prefect.runtime.deployment: that one can be overridden by
    environment variables, which a run form may set through job variables."""
    from prefect import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    deployment_id = ctx.flow_run.deployment_id if ctx and ctx.flow_run else None
    if deployment_id is None:
        return None
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    return deployment.name, Fence.from_tags(deployment.tags)


def _real(path: Path) -> Path:
    """The path with symlinks and `..` resolved; for a glob, its fixed leading part."""
    parts = Path(path).expanduser().parts
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS)), len(parts))
    return Path(*parts[:fixed]).resolve() if fixed else Path.cwd().resolve()


def _inside(path: Path, roots: list[Path]) -> bool:
    real = _real(path)
    return any(real == r or real.is_relative_to(r) for r in roots)


def _pickles(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES)


def _admitted(path: Path) -> bool:
    """A single file (no glob) inside the admitted-traffic folder."""
    return not any(c in str(path) for c in GLOB_CHARS) and _inside(path, [admitted_traffic().resolve()])


def config_file_violations(config_file: Path, fence: Fence, shipped: Path | None = None) -> list[str]:
    """Checked before the file is read: a config outside the roots (or the shipped configs) is not opened."""
    roots = [Path(r).resolve() for r in fence.roots] + ([shipped.resolve()] if shipped else [])
    if _inside(config_file, roots):
        return []
    return [f"config file {config_file} is outside the allowed roots ({', '.join(map(str, roots)) or 'none'})"]


def admitted_traffic() -> Path:
    """Where the monitor puts the traffic files it admitted (under its own deployment's fence) for the retrain run
    it starts: data sources there pass any fence, since only a fenced monitor run writes them."""
    from sftflow import env

    return env.state_dir() / "traffic"


def violations(cfg, fence: Fence) -> list[str]:
    """Everything the loaded config asks for that `fence` does not allow."""
    roots = [Path(r).resolve() for r in fence.roots]
    shown = ", ".join(map(str, roots)) or "none"
    paths = {"data.root": cfg.data.root, "eval.benchmark_root": cfg.eval.benchmark_root,
             **{f"data.sources[{i}].path": Path(cfg.data.root) / s.path
                for i, s in enumerate(cfg.data.sources) if s.path and not _admitted(Path(cfg.data.root) / s.path)}}
    if cfg.template.chat_template and cfg.template.chat_template.endswith(".jinja"):
        paths["template.chat_template"] = cfg.template.chat_template
    if cfg.train.launcher.config_file:
        paths["train.launcher.config_file"] = cfg.train.launcher.config_file
    out = [f"{name} = {value} is outside the allowed roots ({shown})"
           for name, value in paths.items() if not _inside(Path(value), roots)]
    if cfg.model.trust_remote_code and not fence.trust_remote_code:
        out.append("model.trust_remote_code = true runs code shipped with the model")
    base = Path(cfg.model.base).expanduser()
    if not fence.pickle_weights and base.is_dir() and (found := _pickles(base)):
        out.append(f"model.base {base} holds pickle weights ({', '.join(found[:3])}), which can run code on load")
    return out


def refuse(deployment: str, problems: list[str]) -> None:
    if problems:
        raise FenceError(f"refused: a run of deployment {deployment!r} may not do this:\n  " + "\n  ".join(problems) +
                         "\nOnly the deployment's own `allow:` section (deployments/deployments.yaml: roots, "
                         "trust_remote_code, pickle_weights; applied with `sftflow deploy`) can permit it.")
