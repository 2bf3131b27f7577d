"""SAM through Hugging Face transformers (`SamModel`): facebook/sam-vit-base and larger, from a local
folder (`save_pretrained` layout) or the Hub (needs internet).

The image processor is built from the model's own config (longest side = padded side = the
prompt encoder's `image_size`; ImageNet mean and std, as SAM was trained), so a model folder
without a preprocessor file works, and the geometry is the one `sparseseg.expansion.base` assumes.
The processor is only used for the image; prompt coordinates are computed by `pixel_to_model`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sparseseg.config import DEFAULT_SAM_HUB_ID, SamExpansionConfig
from sparseseg.errors import SparsesegError, one_line
from sparseseg.expansion.base import SamExpander, resized_shape


def _image_processor(longest: int):
    try:  # transformers 5: the PIL backend needs no torchvision
        from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers: the numpy/PIL processor under its plain name
        from transformers import SamImageProcessor as Processor
    return Processor(size={"longest_edge": longest}, pad_size={"height": longest, "width": longest},
                     do_resize=True, do_pad=True, do_normalize=True, do_rescale=True)


class TransformersSam(SamExpander):
    """A `transformers.SamModel` as a `SamExpander`.

    Args:
        model: a SamModel (pretrained, or built from a small config in tests).
        device: where it runs.
        name: recorded with every region it produces (e.g. "transformers:facebook/sam-vit-base").
    """

    def __init__(self, model, device: torch.device | str = "cpu", name: str = "transformers") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.name = name
        self.longest = int(model.config.prompt_encoder_config.image_size)
        vision = model.config.vision_config.image_size
        if int(vision) != self.longest:
            raise SparsesegError(f"{name}: vision image_size {vision} differs from the prompt encoder's {self.longest}")
        self.processor = _image_processor(self.longest)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> torch.Tensor:
        encoded = self.processor(images=image, return_tensors="pt")
        got = tuple(int(v) for v in encoded["reshaped_input_sizes"][0])
        want = resized_shape(image.shape[0], image.shape[1], self.longest)
        if got != want:  # the prompt geometry assumes SAM's longest-side resize
            raise SparsesegError(f"{self.name}: the image processor resized {image.shape[:2]} to {got}, expected {want}")
        pixels = encoded["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
        return self.model.get_image_embeddings(pixels)

    @torch.no_grad()
    def decode(self, embedding: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(points)
        labels = torch.ones(1, n, 1, dtype=torch.long, device=self.device)  # 1 = a positive point
        out = self.model(image_embeddings=embedding, input_points=points[None, :, None, :].to(embedding.dtype),
                         input_labels=labels, multimask_output=True)
        return out.pred_masks[0], out.iou_scores[0]


def source_of(config: SamExpansionConfig) -> str:
    """The folder or Hub id the transformers backend loads."""
    return str(config.checkpoint) if config.checkpoint is not None else (config.hub_id or DEFAULT_SAM_HUB_ID)


def load_transformers_sam(config: SamExpansionConfig, device: torch.device | str) -> TransformersSam:
    """Load the configured SamModel; one-line errors for a missing folder or an unreachable Hub id."""
    try:
        from transformers import SamModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise SparsesegError("sam.backend=transformers needs the transformers package "
                             "(pip install -r requirements.lock)") from None
    source = source_of(config)
    if config.checkpoint is not None and not Path(config.checkpoint).is_dir():
        raise SparsesegError(f"{config.checkpoint}: SAM model folder not found (sam.checkpoint; a transformers "
                             "save_pretrained folder with config.json and the weights)")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # our progress and errors, not a page of loader output
    hf_logging.disable_progress_bar()
    try:
        model = SamModel.from_pretrained(source)
    except Exception as exc:  # OSError offline or for a bad folder, ValueError for another model type
        if config.checkpoint is not None:
            raise SparsesegError(f"{source}: not a transformers SAM model folder ({one_line(exc)})") from None
        raise SparsesegError(
            f"sam.hub_id={source}: cannot load it from the Hugging Face Hub ({one_line(exc)[:200]}); without "
            "internet, save it with save_pretrained on a connected machine and set sam.checkpoint to that folder"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return TransformersSam(model, device, name=f"transformers:{source}")
