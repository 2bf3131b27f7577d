"""The demo (`sparseseg demo`): the whole method on a laptop CPU in a few minutes, with nothing downloaded.

1. a seeded synthetic street-scene dataset (textures, thin poles, small cars);
2. a tiny ADM pretrained on its unlabelled training images;
3. two-stage eDALD and Random, same seed and budget, side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sparseseg.config import load_config

Progress = Callable[[str, int, int], None]

# Small enough for 2 CPU cores; every other setting is the paper's default.
DEMO_SIZE = 32
DEMO_CHANNELS = 32
DEMO_TRAIN, DEMO_TEST = 60, 24
DEMO_BUDGET = 10  # pixels per round (0.1 N would be 6: too few to see anything in 6 rounds)


def run_demo(
    out: Path, rounds: int = 6, steps: int = 300, seed: int = 0, progress: Progress | None = None
) -> dict[str, tuple[list[dict], Path]]:
    """Generate data, pretrain, run both strategies; returns {strategy: (records, run dir)}.

    Re-running resumes: the dataset, checkpoint and finished rounds are reused.
    """
    from sparseseg.backbones.pretrain import pretrain_adm
    from sparseseg.data.dataset import is_dataset
    from sparseseg.data.synthetic import make_synthetic
    from sparseseg.loop.experiment import Experiment

    out = Path(out)
    data = out / "data"
    if not is_dataset(data):
        make_synthetic(data, n_train=DEMO_TRAIN, n_test=DEMO_TEST, size=DEMO_SIZE, seed=seed)
    checkpoint = out / "adm_demo.pt"
    pretrain_adm(data / "train" / "images", checkpoint, size=DEMO_SIZE, channels=DEMO_CHANNELS, steps=steps,
                 batch_size=8, lr=2e-4, seed=seed, checkpoint_every=max(1, steps // 4),
                 progress=(lambda s, n, loss: progress("pretraining", s, n)) if progress else None)
    runs = {}
    for strategy in ("two_stage_edald", "random"):
        cfg = load_config(None, [
            f"data={data}", f"out={out / 'runs' / strategy}", f"seed={seed}", f"rounds={rounds}",
            f"budget={DEMO_BUDGET}", f"backbone.checkpoint={checkpoint}", f"strategy.name={strategy}",
            "strategy.candidates_per_image=1024", "strategy.k_per_image=20", "preview_images=3",
        ])
        exp = Experiment(cfg, progress=progress)
        runs[strategy] = (exp.run(), cfg.out)
    return runs
