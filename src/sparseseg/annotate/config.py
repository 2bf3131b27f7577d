"""A labelling project's settings: what gives the features, how pixels are chosen, how the head trains.

The project's identity (its uuid, classes and images) lives in the database, not here: this file
holds only what may be tuned between rounds. Unknown keys are errors, as in every sparseseg config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparseseg.config import (
    BackboneConfig,
    FeatureConfig,
    HeadConfig,
    SamExpansionConfig,
    StrategyConfig,
    parse_overrides,
)
from sparseseg.errors import SparsesegError

CONFIG_FILE = "project.yaml"
# Where Label Studio finds an image; {file} is "<stem>.png", {name} the stem. The default suits Label
# Studio's local-files serving with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to the project folder.
DEFAULT_IMAGE_URL = "/data/local-files/?d=data/train/images/{file}"


class ProjectConfig(BaseModel):
    """Settings of a labelling project (`PROJECT/project.yaml`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    budget: int | None = Field(None, ge=1)  # pixels per query round; None: round(budget_fraction * N)
    budget_fraction: float = Field(0.1, gt=0)
    image_url: str = DEFAULT_IMAGE_URL  # Label Studio task image address, see DEFAULT_IMAGE_URL
    backbone: BackboneConfig = BackboneConfig()
    features: FeatureConfig = FeatureConfig()
    head: HeadConfig = HeadConfig()
    strategy: StrategyConfig = StrategyConfig()
    expansion: Literal["none", "sam"] = "none"  # sam: answered clicks are expanded into SAM regions
    sam: SamExpansionConfig = SamExpansionConfig()  # read only with expansion=sam (docs/expansion.md)

    def budget_for(self, num_images: int) -> int:
        """Pixels per round: the explicit count, else round(fraction * N), at least 1."""
        return self.budget if self.budget is not None else max(1, round(self.budget_fraction * num_images))


def _validate(tree: dict[str, Any], source: str) -> ProjectConfig:
    try:
        return ProjectConfig.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        raise SparsesegError(f"{source}: {where}: {first['msg']}{more}") from None


def _absolute_paths(config: ProjectConfig, folder: Path) -> ProjectConfig:
    """Backbone and SAM files relative to `folder` become absolute, so the project works from any directory."""
    def absolute(value) -> Path:
        path = Path(value).expanduser()
        return Path(os.path.normpath(path if path.is_absolute() else folder / path))

    update = {key: absolute(getattr(config.backbone, key)) for key in ("checkpoint", "config_file")
              if getattr(config.backbone, key, None) is not None}
    sam = {"checkpoint": absolute(config.sam.checkpoint)} if config.sam.checkpoint is not None else {}
    return config.model_copy(update={"backbone": config.backbone.model_copy(update=update),
                                     "sam": config.sam.model_copy(update=sam)})


def make_config(overrides: list[str] | None, base: dict[str, Any] | None = None) -> ProjectConfig:
    """A config from defaults, `base` and `--set key=value` overrides (paths relative to the cwd)."""
    tree = dict(base or {})
    for key, value in parse_overrides(overrides).items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return _absolute_paths(_validate(tree, "project settings"), Path.cwd())


def load_project_config(root: Path) -> ProjectConfig:
    """Read and validate `root/project.yaml` (relative backbone paths are relative to `root`)."""
    path = Path(root) / CONFIG_FILE
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise SparsesegError(f"{path}: not found; is {root} a sparseseg project (made by `sparseseg init`)?") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SparsesegError(f"{path}: cannot read ({exc})") from None
    except yaml.YAMLError as exc:
        raise SparsesegError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise SparsesegError(f"{path}: expected a mapping of settings at the top level")
    return _absolute_paths(_validate(tree, str(path)), Path(root).absolute())


def dump_project_config(config: ProjectConfig) -> str:
    """YAML text that `load_project_config` reads back equal."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
