"""Settings: frozen, validated pydantic models that round-trip through YAML, and their one loader.

One family: `RoundSettings` holds what a round of active learning needs (backbone, features,
strategy, head, expansion, seed, budget); `ExperimentConfig` (a simulated run) and `ProjectConfig`
(a labelling project) add their own fields to it, and `load_config` reads either. Unknown keys are
rejected (a misspelled key must not silently run on a default).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sparseseg.backbones.registry import BACKBONES
from sparseseg.errors import SparsesegError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BackboneConfig(_Frozen):
    """Which network gives the pixel features, and where its weights are read (docs/backbones.md).

    `name` is a registry name (`sparseseg list backbones`); its `BackboneSpec` says which of the
    optional fields below it reads: setting another one is an error, as it would silently change nothing.
    """

    # --- which network and its weights ---
    name: str = "adm"  # a name in sparseseg.backbones.registry.BACKBONES
    checkpoint: Path | None = None  # adm: a .pt file; diffusers, transformers: a local folder (save_pretrained layout)
    hub_id: str | None = None  # diffusers, transformers: a Hugging Face Hub repo id such as microsoft/resnet-50
    preset: str | None = None  # adm only: OpenAI flags for a plain state dict: imagenet_256, lsun_bedroom
    config_file: Path | None = None  # adm only: guided-diffusion flags as JSON/YAML
    # --- features; None: the backbone's default (adm: the paper's 50,150,250 and 5,8,12,17) ---
    timesteps: tuple[int, ...] | None = None  # diffusion backbones only
    blocks: tuple[int, ...] | None = None  # adm: output_blocks; diffusers: up_blocks; efficientnet, transformers: stages
    input_size: int | None = Field(None, ge=1)  # None: the checkpoint's size (adm, diffusers), else the data's
    device: str = "auto"  # auto = cuda when present
    batch_size: int = Field(4, ge=1)  # images per backbone call

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        return name

    @model_validator(mode="after")
    def _check_fields(self) -> BackboneConfig:
        problem = BACKBONES[self.name].unused_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    def missing_problem(self) -> str | None:
        """What a run still needs (the weights: `backbone.checkpoint is required ...`), or None.

        Not checked here, so that a default `BackboneConfig()` exists; `ExperimentConfig` checks it.
        """
        return BACKBONES[self.name].missing_problem(self)


class FeatureConfig(_Frozen):
    """Caching of the native-resolution maps, and tiling of whole images."""

    cache_gb: float = Field(4.0, ge=0)  # in-memory cache of native maps (float16); 0 disables
    tile_pixels: int = Field(16384, ge=256)  # pixels per tile when predicting whole images


class HeadConfig(_Frozen):
    """The paper's MLP head and its optimiser (appendix B.3)."""

    hidden: tuple[int, ...] | None = None  # None: (128, 32) under 30 classes, else (256, 128)
    lr: float = 1e-3
    weight_decay: float = 1e-5
    t_max: int = 5
    eta_min: float = 1e-6
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=2)
    patience: int = Field(50, ge=1)  # early stop: iterations without loss improvement ...
    target_accuracy: float = 0.95  # ... once training accuracy exceeds this (paper, Sec. 4.2)
    dropout: float = Field(0.0, ge=0, lt=1)  # after each hidden block; > 0 for MC-dropout scores (BALD)
    class_weighting: Literal["none", "balanced"] = "none"  # balanced: each class seen weighs the same in the loss
    ensemble: int = Field(1, ge=1)  # heads trained from different seeds (LEDM trains 10): their mean predicts,
    #                                 and their disagreement is the sample source of BALD-type scores


#: `strategy.preset: fast`: what it sets where not given. Measured against the exact default on CamVid
#: (coverage of the local picks, validation mIoU paired over seeds, round time): docs/performance.md.
FAST_PRESET = {"candidates_per_image": 2048}


class StrategyConfig(_Frozen):
    """How pixels are chosen each round (see `sparseseg.selection.strategies`)."""

    preset: Literal["exact", "fast"] = "exact"  # fast: FAST_PRESET's settings, unless given (docs/performance.md)
    name: str = "two_stage_edald"
    noise_samples: int = Field(5, ge=1)  # M in the paper's Eq. 6-7: diffusion noise samples of DALD / eDALD
    candidates_per_image: int = Field(10000, ge=1)  # drawn from the image alone, capped at H*W
    k_per_image: int = Field(50, ge=1)  # K: local MaxHerding picks per image
    pool_ratio: float = Field(0.5, gt=0, le=1)  # M = pool_ratio * N * K
    bandwidth_fraction: float = Field(0.01, gt=0, le=1)  # subsample for the median heuristic
    herding: Literal["lazy", "naive", "stochastic"] = "lazy"
    local_projection: int | None = Field(None, ge=1)  # local herding on a seeded D -> this projection; None: exact
    max_memory_gb: float | None = Field(None, gt=0)  # cap on coverage working memory (docs/performance.md)
    power: float = Field(1.0, gt=0)  # exponent of power sampling (power_bald, power_dald): p ~ score**power
    top_fraction: float | None = Field(None, gt=0, le=1)  # PixelPick rule: keep this top fraction, draw b
    balance: Literal["none", "predicted"] = "none"  # predicted: spread the b picks over the head's predicted classes
    pixels_per_image: int | None = Field(None, ge=1)  # single-stage scores: None = every pixel
    switch_after: int | None = Field(None, ge=1)  # schedule: `name` up to this round, ...
    then: str | None = None  # ... this strategy after it (paper: two_stage_edald, then margin)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, tree: Any) -> Any:
        if isinstance(tree, dict) and tree.get("preset") == "fast":
            return {**FAST_PRESET, **tree}  # a setting given explicitly wins over the preset
        return tree

    @model_validator(mode="after")
    def _check_schedule(self) -> StrategyConfig:
        if (self.switch_after is None) != (self.then is None):
            raise ValueError("switch_after and then go together: give both or neither")
        if self.balance != "none" and (self.top_fraction is not None or self.power != 1.0):
            raise ValueError("strategy.balance replaces the top-b rule: it does not combine with top_fraction or power")
        return self


DEFAULT_SAM_HUB_ID = "facebook/sam-vit-base"


class SamExpansionConfig(_Frozen):
    """Pixel-to-region expansion with the Segment Anything Model (docs/expansion.md)."""

    # --- which SAM and its weights ---
    backend: Literal["transformers", "segment_anything"] = "transformers"
    checkpoint: Path | None = None  # transformers: a local model folder; segment_anything: a .pth file
    hub_id: str | None = None  # transformers only: a Hub id (needs internet); None: facebook/sam-vit-base
    model_type: Literal["vit_b", "vit_l", "vit_h"] | None = None  # segment_anything only; None: from the file name, else vit_b
    # --- which masks are kept, and how they are trained on ---
    tau: float = Field(0.88, ge=0)  # keep the best mask when its predicted IoU (clamped to [0, 1]) is >= tau
    max_region_pixels: int = Field(32, ge=0)  # R: region pixels per click drawn for training (0: none)
    region_weight: float = Field(1.0, ge=0)  # w: total loss weight of one click's region pixels (a click weighs 1)

    @model_validator(mode="after")
    def _check_fields(self) -> SamExpansionConfig:
        if self.backend != "transformers" and self.hub_id is not None:
            raise ValueError(f"sam.hub_id is not used by sam.backend={self.backend}")
        if self.backend != "segment_anything" and self.model_type is not None:
            raise ValueError(f"sam.model_type is not used by sam.backend={self.backend}")
        if self.checkpoint is not None and self.hub_id is not None:
            raise ValueError("sam.checkpoint and sam.hub_id both set: give one SAM model")
        return self


class SuperpixelConfig(_Frozen):
    """Pixel-to-region expansion from the image alone, without SAM weights (docs/expansion.md): a
    click's region is its superpixel (SLIC or Felzenszwalb), or the pixels around it whose backbone
    feature is close to its own. Nothing here is drawn at random: the same image and settings
    always give the same regions. Defaults: chosen on CamVid's training split at 128x128 (the purity
    table in docs/expansion.md)."""

    # --- how a click's region is found ---
    method: Literal["slic", "felzenszwalb", "feature"] = "felzenszwalb"
    n_segments: int = Field(400, ge=2)  # slic: about this many superpixels per image
    compactness: float = Field(10.0, gt=0)  # slic: weight of space against colour (CIELAB); higher: squarer
    sigma: float = Field(0.5, ge=0)  # slic, felzenszwalb: Gaussian smoothing (pixels) before segmenting
    scale: float = Field(25.0, gt=0)  # felzenszwalb: higher gives larger segments
    min_size: int = Field(10, ge=1)  # felzenszwalb: smallest segment (pixels)
    threshold: float = Field(0.9, ge=-1, le=1)  # feature: least cosine similarity to the click's feature
    radius: int = Field(16, ge=1)  # feature: candidates lie within this many pixels of the click (a square)
    max_pixels: int = Field(4096, ge=1)  # a larger region is cut to the max_pixels nearest the click
    # --- how regions are trained on (as sam.*) ---
    max_region_pixels: int = Field(32, ge=0)  # R: region pixels per click drawn for training (0: none)
    region_weight: float = Field(1.0, ge=0)  # w: total loss weight of one click's region pixels (a click weighs 1)


def _moved_noise_samples(tree: Any) -> Any:
    """Configs written before noise_samples moved to the strategy say `features.noise_samples`."""
    if not isinstance(tree, dict) or not isinstance(tree.get("features"), dict) or "noise_samples" not in tree["features"]:
        return tree
    tree = dict(tree)
    features = dict(tree["features"])
    value = features.pop("noise_samples")
    strategy = dict(tree.get("strategy") or {}) if isinstance(tree.get("strategy") or {}, dict) else tree["strategy"]
    if isinstance(strategy, dict):
        if strategy.setdefault("noise_samples", value) != value:
            raise ValueError("features.noise_samples and strategy.noise_samples disagree; give strategy.noise_samples only")
    tree["features"], tree["strategy"] = features, strategy
    return tree


#: The strategy used when `strategy.name` is not given, by kind of backbone: the paper's two-stage eDALD
#: on diffusion backbones; on deterministic ones its counterpart, whose samples come from the head.
DEFAULT_STRATEGY = {True: "two_stage_edald", False: "two_stage_ebald"}
#: The head setting that counterpart needs when neither head.dropout nor head.ensemble is given.
DEFAULT_HEAD_SAMPLES = {"dropout": 0.1}


def _backbone_defaults(tree: Any, default_backbone: str) -> Any:
    """Fill in the strategy (and the head sampling it needs) that fit the backbone, when not given."""
    if not isinstance(tree, dict):
        return tree
    backbone = tree.get("backbone") if isinstance(tree.get("backbone"), dict) else {}
    if "backbone" in tree and isinstance(tree["backbone"], dict) and "name" not in backbone:
        tree = {**tree, "backbone": {**backbone, "name": default_backbone}}  # a partial section keeps the default
    spec = BACKBONES.get(backbone.get("name", default_backbone))
    strategy = tree.get("strategy") if isinstance(tree.get("strategy"), dict) else {}
    if spec is None or "name" in strategy or not isinstance(tree.get("strategy", {}), dict):
        return tree  # an unknown backbone is reported by BackboneConfig; an explicit strategy stays
    tree = {**tree, "strategy": {**strategy, "name": DEFAULT_STRATEGY[spec.diffusion]}}
    head = tree.get("head") if isinstance(tree.get("head"), dict) else {}
    if not spec.diffusion and isinstance(tree.get("head", {}), dict) and not {"dropout", "ensemble"} & set(head):
        tree["head"] = {**head, **DEFAULT_HEAD_SAMPLES}
    return tree


class RoundSettings(_Frozen):
    """What a round of active learning needs, in a simulated run and a labelling project alike.

    Without `strategy.name`, the strategy that fits the backbone is filled in (DEFAULT_STRATEGY), and
    on a deterministic backbone the head sampling it needs (DEFAULT_HEAD_SAMPLES) unless
    `head.dropout` or `head.ensemble` is given; the saved config then names them.
    """

    seed: int = 0
    budget: int | None = Field(None, ge=1)  # pixels per round; None: round(budget_fraction * N)
    budget_fraction: float = Field(0.1, gt=0)
    backbone: BackboneConfig = BackboneConfig()
    features: FeatureConfig = FeatureConfig()
    head: HeadConfig = HeadConfig()
    strategy: StrategyConfig = StrategyConfig()
    expansion: Literal["none", "sam", "superpixel"] = "none"  # each click's region labelled too (docs/expansion.md)
    sam: SamExpansionConfig = SamExpansionConfig()  # read only with expansion=sam (so one --set serves a sweep)
    superpixel: SuperpixelConfig = SuperpixelConfig()  # read only with expansion=superpixel

    _migrate = model_validator(mode="before")(_moved_noise_samples)

    @model_validator(mode="before")
    @classmethod
    def _fit_backbone(cls, tree: Any) -> Any:
        return _backbone_defaults(tree, cls.model_fields["backbone"].default.name)

    def budget_for(self, num_images: int) -> int:
        """Pixels per round: the explicit count, else round(fraction * N), at least 1."""
        return self.budget if self.budget is not None else max(1, round(self.budget_fraction * num_images))


#: The split settings are chosen on: carved from `train_split` when the data has no split of this name.
VALIDATION = "val"


class ExperimentConfig(RoundSettings):
    """A simulated active-learning experiment (the oracle is the ground-truth mask)."""

    data: Path  # a prepared dataset (sparseseg prepare ...)
    out: Path = Path("runs/experiment")
    rounds: int = Field(10, ge=1)
    eval_split: str = "test"  # "val" on a dataset without a val split: held out from train_split (below)
    train_split: str = "train"
    val_fraction: float = Field(0.2, gt=0, lt=1)  # share of the training images held out as "val"
    val_seed: int = 0  # which images are held out: the same for every run seed, so seeds stay paired
    # Hold out the training images whose name starts with one of these instead (whole video sequences,
    # e.g. [0006R0] on CamVid): frames of the same sequence as the pool make a lenient validation set.
    val_prefixes: list[str] = Field(default_factory=list)
    preview_images: int = Field(4, ge=0)  # images drawn with their picks in each round's PNG

    @model_validator(mode="after")
    def _check_backbone(self) -> ExperimentConfig:
        problem = self.backbone.missing_problem()
        if problem:
            raise ValueError(problem)
        return self


# Where Label Studio finds an image; {file} is "<stem>.png", {name} the stem. The default suits Label
# Studio's local-files serving with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to the project folder.
DEFAULT_IMAGE_URL = "/data/local-files/?d=data/train/images/{file}"


class ProjectConfig(RoundSettings):
    """A labelling project's settings (`PROJECT/project.yaml`): what may be tuned between rounds.

    The project's identity (its uuid, classes and images) lives in its database, not here. Its
    backbone defaults to the ImageNet EfficientNet-Lite0 whose weights ship with the package, so a
    team can start from its photos alone.
    """

    backbone: BackboneConfig = BackboneConfig(name="efficientnet_lite0")

    image_url: str = DEFAULT_IMAGE_URL  # Label Studio task image address, see DEFAULT_IMAGE_URL


Settings = TypeVar("Settings", bound=RoundSettings)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SparsesegError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Turn ["strategy.name=random", "rounds=3"] into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SparsesegError(f"--set {pair!r}: expected key=value, for example rounds=3")
        key, raw = pair.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_validation(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {where}: {first['msg']}{more}"


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML settings file, or a one-line SparsesegError naming the file."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise SparsesegError(f"{path}: cannot read config ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise SparsesegError(f"{path}: cannot read config ({exc})") from None
    except yaml.YAMLError as exc:
        raise SparsesegError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise SparsesegError(f"{path}: expected a mapping of settings at the top level")
    return loaded


def load_config(path: Path | None, overrides: list[str] | None = None, base: dict | None = None,
                schema: type[Settings] = ExperimentConfig, source: str = "config") -> Settings:
    """Read a YAML config, apply `--set` overrides, validate against `schema`.

    Relative paths inside the file are resolved against the file's folder, so a config can be
    run from anywhere; relative paths given in `base` or `overrides` are resolved against the
    working directory. Every path of the result is absolute.

    Args:
        path: the YAML file, or None for settings from `base` and `overrides` alone.
        overrides: `dotted.key=value` strings (values parsed as YAML).
        base: settings applied before the file.
        schema: `ExperimentConfig` (a simulated run) or `ProjectConfig` (a labelling project).
        source: how errors name the settings when there is no file.
    """
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        source = str(path)
        tree = _merge(tree, _resolve_paths(read_yaml_mapping(path), Path(path).resolve().parent))
    tree = _merge(tree, parse_overrides(overrides))
    try:
        config = schema.model_validate(tree)
    except ValidationError as err:
        raise SparsesegError(_format_validation(err, source)) from None
    # Absolute paths from here on: a saved config means the same files from any working directory.
    update: dict[str, Any] = {key: _absolute(getattr(config, key)) for key in ("data", "out")
                              if isinstance(getattr(config, key, None), Path)}
    backbone = {k: _absolute(getattr(config.backbone, k)) for k in ("checkpoint", "config_file")
                if getattr(config.backbone, k) is not None}
    update["backbone"] = config.backbone.model_copy(update=backbone)
    if config.sam.checkpoint is not None:
        update["sam"] = config.sam.model_copy(update={"checkpoint": _absolute(config.sam.checkpoint)})
    return config.model_copy(update=update)


def _absolute(path: Path) -> Path:
    """Absolute and without '..', symlinks kept (resolve() would follow them)."""
    return Path(os.path.normpath(path.expanduser().absolute()))


_PATH_KEYS = {("data",), ("out",), ("backbone", "checkpoint"), ("backbone", "config_file"), ("sam", "checkpoint")}


def _resolve_paths(tree: dict[str, Any], folder: Path) -> dict[str, Any]:
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for keys in _PATH_KEYS:
        node = tree
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            value = Path(node[keys[-1]]).expanduser()
            node[keys[-1]] = os.path.normpath(value if value.is_absolute() else folder / value)
    return tree


def dump_config(config: RoundSettings) -> str:
    """YAML text of a config, paths as strings, tuples as lists: load_config reads it back equal."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
