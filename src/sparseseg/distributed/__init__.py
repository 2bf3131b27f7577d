"""Beyond one process: extraction, global selection, scoring and prediction over torch.distributed.

One process per GPU (or several on CPU), started by `torchrun`; each takes a shard of the images or of
the pool, and collectives combine what must be global (docs/scaling.md):

    launch.py    the process group from torchrun's environment (NCCL on GPUs, gloo on CPU), gathers
    extract.py   stage 1a per shard of images: local MaxHerding, pixel features to a disk pool
    pool.py      stage 1b (exact sharded MaxHerding, or facility location on a kNN graph) and
                 stage 2 (uncertainty of the pool under a head) over a pool on disk
    predict.py   the head's mask of every image, each rank its shard
"""
