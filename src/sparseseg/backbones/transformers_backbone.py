"""Any vision backbone that Hugging Face `transformers.AutoBackbone` can build, as a frozen
multi-scale `FeatureBackbone` without noise: ResNet (microsoft/resnet-50, the encoder
architecture of DeepLabV3-ResNet50), DINOv2 and other ViTs (facebook/dinov2-small), ConvNeXt,
Swin, ViTDet, ...

Where the model comes from:
- a local folder as `save_pretrained` writes it: config.json + weights (model.safetensors or
  pytorch_model.bin), optionally preprocessor_config.json. The folder may hold the bare model
  (ResNetModel, Dinov2Model), a classifier (ResNetForImageClassification) or the backbone class
  itself: transformers strips the base-model prefix and heads;
- a Hugging Face Hub repository id (such as microsoft/resnet-50), downloaded into the Hub cache when
  online. Offline, and not in the cache, loading fails with one line saying so.

The model type in config.json must have a backbone class in transformers
(`MODEL_FOR_BACKBONE_MAPPING_NAMES`); google/vit-* (model type `vit`), for one, has none.

Stages are indices into the model's `stage_names` ("stem", "stage1", ...), passed to the backbone
as `out_indices`; `FeatureInfo.block` is that index. Channels and reductions are read from the
network itself: a shape-only dry run (on the meta device, no weights, no compute) at a side
divisible by every usual stride gives each stage's channels and exact stride, and a second one at
`input_size` checks that the maps there are input_size / stride on a side. Examples:

| model               | stage      | channels    | reduction |
| ------------------- | ---------- | ----------- | --------- |
| microsoft/resnet-50 | 0 stem     | 64          | 4         |
|                     | 1 stage1   | 256         | 4         |
|                     | 2 stage2   | 512         | 8         |
|                     | 3 stage3   | 1024        | 16        |
|                     | 4 stage4   | 2048        | 32        |
| facebook/dinov2-*   | 0 stem     | hidden_size | 14        |
|                     | i stage{i} | hidden_size | 14        |

Defaults: when every stage has the same stride (a plain ViT) four evenly spaced layers, e.g. 3, 6,
9, 12 of 12; otherwise (CNNs, hierarchical transformers) every stage but the stem (ResNet: 1-4).
`input_size`, when not given, is the dataset's size rounded to the nearest multiple of the largest
stride among the chosen stages (DINOv2: 14, so 256 becomes 252); a given one must be such a
multiple.

Normalisation: inputs arrive in [-1, 1] and are mapped back to 0..255, then through the
checkpoint's own image processor settings when the folder has preprocessor_config.json
(`do_rescale`/`rescale_factor`, `do_normalize`/`image_mean`/`image_std`), else ImageNet's
mean/std on [0, 1]. The processor's resizing and cropping are not used: `input_size` decides.

Missing weights are refused, with one exception: the per-stage LayerNorms that some backbone
classes add on top of the base model (Swin's and ConvNeXt's `hidden_states_norms`) are absent
from classification checkpoints; they start as plain LayerNorms (weight 1, bias 0).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparseseg.backbones.base import FeatureInfo, check_images, check_input_size, fast_path
from sparseseg.errors import SparsesegError, one_line
from sparseseg.io import read_json_object

if TYPE_CHECKING:
    from sparseseg.config import BackboneConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_VIT_LAYERS = 4
# The side of the shape-only dry run: 2^7 * 3 * 5 * 7, divisible by the strides (up to 128) and
# patch sizes (8, 10, 12, 14, 16, 28, 32, ...) of the usual backbones (lcm'd with the config's patch size).
PROBE_SIDE = 13440
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LAYOUT = "expected config.json + weights, as save_pretrained writes them"


@dataclass(frozen=True)
class Normalisation:
    """model input = (pixel * scale - mean) / std, pixel in 0..255; `source` says where it came from."""

    scale: float = 1 / 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = "ImageNet mean/std (no preprocessor_config.json)"


def backbone_model_types() -> list[str]:
    """Model types (config.json `model_type`) that transformers has a backbone class for."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

    return sorted(MODEL_FOR_BACKBONE_MAPPING_NAMES)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load reports or progress bars while loading: every problem becomes our own one-line error."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _hub_snapshot(repo_id: str) -> Path:
    """The config files of a Hub repository (a few KB), in the Hub cache; the weights come later."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "preprocessor_config.json"]))
    except Exception as err:  # offline, unknown repo, gated repo, ...: all mean "cannot fetch"
        raise SparsesegError(
            f"{repo_id}: not a local folder and cannot be fetched from the Hugging Face Hub ({one_line(err)[:200]}); "
            f"download it while online (save_pretrained) and give the folder as backbone.checkpoint"
        ) from None


def _check_model_type(folder: Path, where: str) -> None:
    """One line naming the folder when it holds no transformers model with a backbone class."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / "model_index.json").is_file() or (folder / "unet").is_dir():
            raise SparsesegError(f"{where}: a diffusers pipeline, not a transformers model; use backbone.name=diffusers")
        raise SparsesegError(f"{where}: no config.json, not a transformers model folder ({_LAYOUT})")
    raw = read_json_object(config_path)
    if "_class_name" in raw:  # diffusers writes its class here, transformers never does
        cls = raw["_class_name"]
        hint = "use backbone.name=diffusers" if cls == "UNet2DModel" else "not a transformers model"
        raise SparsesegError(f"{where}: a diffusers {cls}; {hint}")
    model_type = raw.get("model_type")
    if not model_type:
        raise SparsesegError(f"{where}: config.json has no model_type; not a transformers model ({_LAYOUT})")
    known = backbone_model_types()
    if model_type not in known:
        inner = raw.get("backbone_config")
        holds = (f" (it is a task model around a {inner.get('model_type')!r} backbone; save that backbone alone)"
                 if isinstance(inner, dict) and inner.get("model_type") else "")
        raise SparsesegError(
            f"{where}: model type {model_type!r} has no AutoBackbone class{holds}; "
            f"backbones with one: {', '.join(known)}"
        )
    if model_type == "timm_backbone":
        raise SparsesegError(f"{where}: a timm backbone, which needs the timm package (not available here); "
                             f"use a transformers-native model such as microsoft/resnet-50")


def read_normalisation(folder: Path) -> Normalisation:
    """The input scaling of the checkpoint's image processor (preprocessor_config.json), else ImageNet's."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return Normalisation()
    raw = read_json_object(path)

    def triple(key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
        value = raw.get(key, default)
        value = [value] * 3 if isinstance(value, (int, float)) else value
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
            raise SparsesegError(f"{path}: {key} must be three numbers, got {value!r}")
        return (float(value[0]), float(value[1]), float(value[2]))

    scale = float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else 1.0
    if raw.get("do_normalize", True):
        mean, std = triple("image_mean", IMAGENET_MEAN), triple("image_std", IMAGENET_STD)
        if any(s <= 0 for s in std):
            raise SparsesegError(f"{path}: image_std must be positive, got {list(std)}")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Normalisation(scale=scale, mean=mean, std=std, source=str(path))


def _with_stages(config: Any, indices: Sequence[int]) -> Any:
    """A copy of a backbone config returning `indices` (as maps, for ViTs that can return tokens)."""
    config = copy.deepcopy(config)
    config.out_indices = list(indices)
    if hasattr(config, "reshape_hidden_states"):
        config.reshape_hidden_states = True
    return config


def _meta_model(config: Any) -> nn.Module:
    from transformers import AutoBackbone

    with torch.device("meta"), _quiet_transformers():
        return AutoBackbone.from_config(config).eval()


def usable_stages(config: Any, where: str) -> tuple[list[int], nn.Module]:
    """Indices of `stage_names` the backbone class can return, and a weightless (meta) copy built
    to return all of them. Some classes (MaskFormer's Swin) refuse the stem."""
    names = getattr(config, "stage_names", None)
    if not names:
        raise SparsesegError(f"{where}: model type {config.model_type!r} has no stage_names; not a backbone config")
    errors = []
    for indices in (list(range(len(names))), list(range(1, len(names)))):
        try:
            return indices, _meta_model(_with_stages(config, indices))
        except Exception as err:  # a missing package (natten), a stage the class refuses, ...
            errors.append(err)
    raise SparsesegError(f"{where}: cannot build the {config.model_type} backbone ({one_line(errors[0])[:200]})")


def _first_keys(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f", ... {len(keys) - 3} more" if len(keys) > 3 else ""
    return f"{', '.join(keys[:3])}{more}"


def load_transformers_backbone(source: str | Path) -> tuple[nn.Module, Normalisation, str]:
    """Loads an AutoBackbone model returning every stage it can, and its input normalisation.

    Args:
        source: a local folder (a `Path` is always taken as local), or a Hub repository id
            such as "microsoft/resnet-50" (a string that names no local folder).

    Returns:
        (backbone model in eval mode on the CPU, float32, frozen; its `Normalisation`; the folder
        or Hub id, for messages).

    Raises:
        SparsesegError: missing folder, a file, a folder that is not a transformers model or has
            no backbone class, weights that do not load or do not fit, a Hub id that cannot be
            fetched (offline).
    """
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists() and not isinstance(source, Path):  # the Hub validates the id itself
        folder, where, load_from = _hub_snapshot(text), text, text
    else:
        if not path.exists():
            hint = " (a Hugging Face Hub id goes in backbone.hub_id)" if _HUB_ID.match(text) else ""
            raise SparsesegError(f"{path}: transformers model folder not found{hint}")
        if path.is_file():
            raise SparsesegError(f"{path}: a file, not a transformers model folder ({_LAYOUT}); "
                                 f"an ADM .pt checkpoint needs backbone.name=adm")
        folder, where, load_from = path, str(path), str(path)
    _check_model_type(folder, where)
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(str(folder))
        model_class = MODEL_FOR_BACKBONE_MAPPING[type(config)]
    except Exception as err:
        raise SparsesegError(f"{where}: cannot read the model config ({one_line(err)[:200]})") from None
    indices, _ = usable_stages(config, where)
    try:
        with _quiet_transformers():
            model, loading = model_class.from_pretrained(
                load_from, config=_with_stages(config, indices), dtype=torch.float32,
                output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as err:  # missing or corrupt weights, download failure, a missing package
        raise SparsesegError(f"{where}: cannot load the {model_class.__name__} ({one_line(err)[:200]})") from None
    mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in loading.get("mismatched_keys") or []]
    if mismatched:
        raise SparsesegError(f"{where}: the weights do not fit the config: {len(mismatched)} tensors of another shape "
                             f"({_first_keys(mismatched)})")
    missing = []
    for key in loading.get("missing_keys") or []:
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if key.startswith("hidden_states_norms.") and isinstance(module, nn.LayerNorm) and leaf in ("weight", "bias"):
            with torch.no_grad():  # a norm the backbone class adds per stage: a plain normalisation
                getattr(module, leaf).fill_(1.0 if leaf == "weight" else 0.0)
        else:
            missing.append(key)
    if missing:
        raise SparsesegError(f"{where}: the weights do not fit the config: {len(missing)} missing keys "
                             f"({_first_keys(missing)})")
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, read_normalisation(folder), where


def _map_shapes(model: nn.Module, x: torch.Tensor) -> list[torch.Size]:
    with torch.no_grad():
        out = model(x)
    maps = out.feature_maps if hasattr(out, "feature_maps") else out[0]
    return [m.shape for m in maps]


class StageProbe:
    """Channels and strides of a backbone's stage maps, read from the network by shape-only runs.

    Args:
        config: the backbone's transformers config (its `stage_names`).
        where: the folder or Hub id, for messages.
        real: the loaded model, run for real (once, on its device) only when the weightless
            copy cannot run on the meta device.
    """

    def __init__(self, config: Any, where: str = "transformers", real: nn.Module | None = None) -> None:
        self.usable, self.meta = usable_stages(config, where)
        self.config, self.where, self.real = config, where, real

    def shapes(self, size: int, real_ok: bool = True) -> list[tuple[int, int]]:
        """(channels, side) of every usable stage's map for a (1, 3, size, size) input."""
        try:
            maps = _map_shapes(self.meta, torch.empty(1, 3, size, size, device="meta"))
        except Exception:
            if not real_ok or self.real is None:
                raise
            was = list(self.real.out_indices)
            self.real.out_indices = self.usable
            try:
                device = next(self.real.parameters()).device
                maps = _map_shapes(self.real, torch.zeros(1, 3, size, size, device=device))
            finally:
                self.real.out_indices = was
        if len(maps) != len(self.usable) or any(len(m) != 4 or m[2] != m[3] for m in maps):
            raise SparsesegError(f"{self.where}: the backbone returns {[tuple(m) for m in maps]} for a "
                                 f"{size}x{size} input; expected one square (B, C, h, w) map per stage")
        return [(int(m[1]), int(m[2])) for m in maps]

    def table(self) -> dict[int, tuple[int, int]]:
        """index -> (channels, reduction) of every usable stage, from a run at a side that every
        usual stride divides (the model's own image_size when it cannot run at that side)."""
        patch = getattr(self.config, "patch_size", None)
        patches = [p for p in (patch if isinstance(patch, (list, tuple)) else [patch]) if isinstance(p, int) and p > 0]
        sides = [(math.lcm(PROBE_SIDE, *patches), False)]  # far too large for a real run
        image_size = getattr(self.config, "image_size", None)
        if isinstance(image_size, (list, tuple)) and len(set(image_size)) == 1:
            image_size = image_size[0]  # [224, 224]
        if isinstance(image_size, int) and image_size > 0:
            sides.append((image_size, True))
        error: Exception | None = None
        for side, real_ok in sides:
            try:
                shapes = self.shapes(side, real_ok)
            except Exception as err:
                error = err
                continue
            if all(s > 0 and side % s == 0 for _, s in shapes):
                return {i: (c, side // s) for i, (c, s) in zip(self.usable, shapes, strict=True)}
        why = one_line(error)[:200] if error is not None else "the maps do not divide the input evenly"
        raise SparsesegError(f"{self.where}: cannot work out the strides of the {self.config.model_type} stages "
                             f"({why})")

    def check_size(self, size: int, stages: Sequence[int], table: dict[int, tuple[int, int]]) -> None:
        """The maps at `size` are size / reduction on a side (fixed-size models fail here)."""
        try:
            shapes = dict(zip(self.usable, self.shapes(size), strict=True))
        except Exception as err:
            own = getattr(self.config, "image_size", None)
            hint = f" (the model's image_size is {own})" if own else ""
            raise SparsesegError(f"{self.where}: cannot run at input_size {size} ({one_line(err)[:200]}); "
                                 f"set backbone.input_size{hint}") from None
        for s in stages:
            channels, reduction = table[s]
            if shapes[s] != (channels, size // reduction):
                raise SparsesegError(
                    f"{self.where}: at input_size {size} stage {s} gives {shapes[s][0]} channels at side "
                    f"{shapes[s][1]}, expected {channels} at {size // reduction}; set backbone.input_size"
                )


def stage_table(config: Any) -> dict[int, tuple[int, int]]:
    """index into `config.stage_names` -> (channels, reduction), from the config alone (no weights)."""
    return StageProbe(config).table()


def default_stages(table: dict[int, tuple[int, int]], stage_names: Sequence[str],
                   count: int = DEFAULT_VIT_LAYERS) -> list[int]:
    """Four evenly spaced layers of a plain ViT (one stride throughout), else every stage but the stem.

    Args:
        table: index -> (channels, reduction) of the usable stages, as `stage_table` gives.
        stage_names: the config's `stage_names` (the stem, when there is one, is named "stem").
    """
    indices = sorted(table)
    later = [i for i in indices if stage_names[i] != "stem"] or indices
    if len({r for _, r in table.values()}) > 1:
        return later
    n = len(later)  # layer k of n, k = round(n * j / count) for j = 1..count
    return sorted({later[max(0, (2 * n * j + count) // (2 * count) - 1)] for j in range(1, count + 1)})


def _nearest_multiple(size: int, step: int) -> int:
    return max(1, (size + step // 2) // step) * step


class TransformersBackbone:
    """Frozen `transformers` backbone stage outputs: a `FeatureBackbone` without noise.

    Args:
        model: an AutoBackbone model (a `*Backbone` class), as `load_transformers_backbone` gives:
            built to return every stage (classes that add a module per returned stage need it).
        stages: indices into `model.stage_names` (taken in stage order); None: `default_stages`.
        input_size: side of the square images `extract` takes; a multiple of the largest
            reduction among `stages`. None: `default_size` rounded to the nearest such multiple.
        default_size: the dataset's size, used when `input_size` is None.
        device: where to run.
        fast: bf16 autocast and channels_last; default on CUDA only (CPU stays exact float32).
        normalisation: the input scaling; None: ImageNet mean/std.
        name: the folder or Hub id, for messages.

    Raises:
        SparsesegError: bad stages or input size, or a model whose maps cannot be worked out.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[int] | None = None,
        input_size: int | None = None,
        default_size: int = 224,
        device: str | torch.device = "cpu",
        fast: bool | None = None,
        normalisation: Normalisation | None = None,
        name: str = "transformers",
    ) -> None:
        config = model.config
        if getattr(config, "num_channels", 3) != 3:
            raise SparsesegError(f"{name}: the model takes {config.num_channels} input channels; expected RGB (3)")
        self.name = name
        self.model = model.eval()
        self.stage_names = list(config.stage_names)
        probe = StageProbe(config, name, real=self.model)
        table = probe.table()
        self.stage_table = table  # every usable stage: index -> (channels, reduction)
        stages = default_stages(table, self.stage_names) if stages is None else [int(s) for s in stages]
        if not stages or any(s not in table for s in stages) or len(set(stages)) != len(stages):
            listing = ", ".join(f"{i}: {self.stage_names[i]} {c}@1/{r}" for i, (c, r) in table.items())
            raise SparsesegError(f"transformers stages {list(stages)}: expected distinct indices in "
                                 f"{probe.usable[0]}..{probe.usable[-1]} ({listing})")
        stages = sorted(stages)  # the backbone returns its maps in stage order
        largest = max(table[s][1] for s in stages)
        size = _nearest_multiple(int(default_size), largest) if input_size is None else int(input_size)
        size = check_input_size(size, largest, f"(the largest reduction among stages {stages}); set backbone.input_size",
                                owner="transformers")
        probe.check_size(size, stages, table)
        self.stages = stages
        self.input_size = size
        self.model.out_indices = stages  # sets the config's out_indices and out_features
        self.device = torch.device(device)
        self.fast = fast_path(self.device, fast)
        self.model = self.model.to(self.device)
        if self.fast:
            self.model.to(memory_format=torch.channels_last)
        self.normalisation = normalisation or Normalisation()
        norm = self.normalisation
        self._scale = 255.0 / 2 * norm.scale
        self._mean = torch.tensor(norm.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(norm.std, device=self.device).view(1, 3, 1, 1)
        self.feature_info = [FeatureInfo(num_chs=table[s][0], reduction=table[s][1], block=s, timestep=-1)
                             for s in stages]

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        stages: Sequence[int] | None = None,
        input_size: int | None = None,
        default_size: int = 224,
        device: str | torch.device = "cpu",
        fast: bool | None = None,
    ) -> TransformersBackbone:
        """Loads a folder or Hub id (see `load_transformers_backbone`) and wraps it."""
        model, normalisation, where = load_transformers_backbone(source)
        return cls(model, stages, input_size, default_size, device=device, fast=fast,
                   normalisation=normalisation, name=where)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the model's input: (pixel * scale - mean) / std, pixel in 0..255."""
        return ((images + 1) * self._scale - self._mean) / self._std

    def extract(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Stage outputs for a batch; `noise` is ignored (the features are deterministic).

        Args:
            images: (B, 3, S, S) in [-1, 1], S = `input_size`.
            noise: ignored.

        Returns:
            One float32 (B, num_chs, S / reduction, S / reduction) tensor per `feature_info`
            entry, on `device`.
        """
        check_images(images, self.input_size)
        x = self.normalise(images.to(self.device, torch.float32))
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.fast):
            out = self.model(x)
        maps = out.feature_maps if hasattr(out, "feature_maps") else out[0]
        if len(maps) != len(self.feature_info):
            raise SparsesegError(f"{self.name}: the backbone returned {len(maps)} maps for stages {self.stages}")
        return [m.float().contiguous() for m in maps]


def build(config: BackboneConfig, device: str | torch.device, default_size: int) -> TransformersBackbone:
    """`backbone.name=transformers`: a local folder (`checkpoint`) or a Hub id (`hub_id`).

    Without `config.input_size`: `default_size` rounded to a multiple of the largest stride among the stages.
    """
    return TransformersBackbone.from_pretrained(
        config.checkpoint if config.checkpoint is not None else config.hub_id, stages=config.blocks,
        input_size=config.input_size, default_size=default_size, device=device)
