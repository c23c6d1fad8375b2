"""Training configuration: one frozen dataclass and the command-line flags that fill it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from hvdmri.cli import (command_parser, fraction, image_size, non_negative_float, non_negative_int, open_unit_interval,
                        positive_float, positive_int)
from hvdmri.model import BASE_STAGES

PRECISIONS = ("auto", "float32", "mixed_bfloat16")

EXAMPLES = """examples:
  # 4 nodes, one worker each, ImageNet weights downloaded once into ~/.keras:
  horovodrun --gloo -np 4 -H node1:1,node2:1,node3:1,node4:1 python -m hvdmri.train \\
      --data Training --run-dir runs/resnet50

  # one node, 2 workers, no download, 96 px images:
  horovodrun --gloo -np 2 -H localhost:2 python -m hvdmri.train --data Training \\
      --weights none --image-size 96 --run-dir runs/scratch96

  # without --data: the synthetic phantom set, generated once into ~/.cache/hvdmri
  python -m hvdmri.train --weights none --image-size 64 --scratch-epochs 4
"""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; saved as RUN_DIR/config.json."""

    data: str | None = None
    run_dir: str | None = None
    weights: str = "imagenet"
    image_size: int = 224
    batch_size: int = 16
    val_fraction: float = 0.1
    seed: int = 42
    limit_per_class: int | None = None
    exclude_duplicates_of: str | None = None
    # Phase 1: head only, base frozen.
    head_epochs: int = 3
    head_lr: float = 1e-3
    # Phase 2: the top stages of the base train too, at a low rate.
    finetune_epochs: int = 8
    finetune_lr: float = 1e-4
    finetune_from: str = "conv5"
    # Phase 3 (optional): everything trains.
    full_epochs: int = 0
    full_lr: float = 1e-5
    # With --weights none the phases above are replaced by one phase of the whole network.
    scratch_epochs: int = 12
    scratch_lr: float = 1e-3
    scratch_bn_momentum: float = 0.9
    warmup_epochs: float = 1.0
    augment: bool = True
    cache_dir: str | None = None
    feature_cache: bool = False
    precision: str = "auto"
    no_fused_relu: bool = False
    threads: int | None = None
    fp16_allreduce: bool = False
    memory_budget: float | None = None
    elastic: bool = False
    keep_checkpoints: int = 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m hvdmri.train",
                            "Train a 4-class brain MRI tumor classifier (ResNet-50) data-parallel with Horovod.",
                            EXAMPLES)
    d = TrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="training folder with one subfolder per class "
                      "(glioma, meningioma, notumor, pituitary); default: the synthetic phantom set")
    data.add_argument("--image-size", type=image_size, default=d.image_size,
                      help=f"side of the square model input in pixels (default {d.image_size})")
    data.add_argument("--val-fraction", type=fraction, default=d.val_fraction,
                      help=f"stratified validation share (default {d.val_fraction})")
    data.add_argument("--seed", type=int, default=d.seed, help=f"split, shuffle and init seed (default {d.seed})")
    data.add_argument("--limit-per-class", type=positive_int, default=None,
                      help="use at most this many images per class (for quick trials)")
    data.add_argument("--exclude-duplicates-of", metavar="TEST_DIR",
                      help="leave out of training and validation every image that duplicates one in "
                           "TEST_DIR (byte-identical, or re-encoded, rescaled or contrast-changed), so "
                           "an evaluation on TEST_DIR measures images the model never saw")
    data.add_argument("--no-augment", dest="augment", action="store_false",
                      help="turn off flip/rotation/zoom/brightness augmentation")
    data.add_argument("--cache-dir", metavar="DIR",
                      help="keep each rank's decoded, resized images in DIR/rank<N>-<size>px-<split> "
                           "on local disk from the first epoch on, so later epochs skip decoding; "
                           "needs images x size x size x 3 bytes (default: decode every epoch)")
    data.add_argument("--feature-cache", action="store_true",
                      help="in phase 1 (frozen base) without augmentation, run the base once per image "
                           "and train the head on the stored pooled features (see docs/PIPELINE.md)")

    model = parser.add_argument_group("model and phases")
    model.add_argument("--weights", default=d.weights,
                       help="imagenet (download via Keras), none (random initialisation), "
                            "or PATH to a local ResNet-50 no-top weights file (default imagenet)")
    model.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                       help=f"images per worker per step; the global batch is this times the "
                            f"number of workers (default {d.batch_size})")
    model.add_argument("--head-epochs", type=non_negative_int, default=d.head_epochs,
                       help=f"phase 1 epochs: head only, base frozen (default {d.head_epochs})")
    model.add_argument("--head-lr", type=positive_float, default=d.head_lr,
                       help=f"phase 1 learning rate per worker (default {d.head_lr})")
    model.add_argument("--finetune-epochs", type=non_negative_int, default=d.finetune_epochs,
                       help=f"phase 2 epochs: top stages of the base train too (default {d.finetune_epochs})")
    model.add_argument("--finetune-lr", type=positive_float, default=d.finetune_lr,
                       help=f"phase 2 learning rate per worker (default {d.finetune_lr})")
    model.add_argument("--finetune-from", choices=BASE_STAGES[1:], default=d.finetune_from,
                       help=f"first ResNet-50 stage that trains in phase 2 (default {d.finetune_from})")
    model.add_argument("--full-epochs", type=non_negative_int, default=d.full_epochs,
                       help=f"phase 3 epochs: the whole network trains (default {d.full_epochs})")
    model.add_argument("--full-lr", type=positive_float, default=d.full_lr,
                       help=f"phase 3 learning rate per worker (default {d.full_lr})")
    model.add_argument("--scratch-epochs", type=non_negative_int, default=d.scratch_epochs,
                       help=f"with --weights none: epochs of whole-network training, replacing "
                            f"phases 1-3 (default {d.scratch_epochs})")
    model.add_argument("--scratch-lr", type=positive_float, default=d.scratch_lr,
                       help=f"with --weights none: learning rate per worker (default {d.scratch_lr})")
    model.add_argument("--scratch-bn-momentum", type=open_unit_interval, default=d.scratch_bn_momentum,
                       help=f"with --weights none: BatchNormalization moving-average momentum "
                            f"(Keras uses 0.99; default {d.scratch_bn_momentum})")
    model.add_argument("--warmup-epochs", type=non_negative_float, default=d.warmup_epochs,
                       help=f"epochs over which the learning rate ramps from the single-worker "
                            f"rate to the scaled rate (default {d.warmup_epochs})")

    runtime = parser.add_argument_group("run and runtime")
    runtime.add_argument("--run-dir", help="output folder (default runs/run-YYYYmmdd-HHMMSS)")
    runtime.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                         help="auto: mixed_bfloat16 on CPUs with AVX512_BF16 or AMX, else float32 "
                              "(default auto)")
    runtime.add_argument("--no-fused-relu", action="store_true",
                         help="in bf16, keep TensorFlow's own ReLU and Add kernels instead of hvdmri's XLA "
                              "ones (slower; for a TensorFlow build that cannot compile them)")
    runtime.add_argument("--threads", type=positive_int, default=None,
                         help="intra-op threads per worker (default: the node's cores divided by "
                              "its workers)")
    runtime.add_argument("--fp16-allreduce", action="store_true",
                         help="send gradients as float16 in the allreduce (halves network traffic)")
    runtime.add_argument("--memory-budget", type=positive_float, metavar="GIB",
                         help="peak memory one worker may use, in GiB; a --batch-size whose estimate "
                              "(hvdmri/memory.py, fitted to measurements) exceeds it is rejected before "
                              "training (default: no check)")
    runtime.add_argument("--elastic", action="store_true",
                         help="keep training when workers leave or join; start with horovodrun --min-np, "
                              "--max-np and --host-discovery-script (see docs/CLUSTER.md)")
    runtime.add_argument("--keep-checkpoints", type=positive_int, default=d.keep_checkpoints, metavar="K",
                         help=f"keep the newest K per-epoch checkpoints (checkpoints/epoch-NNNN.weights.h5) "
                              f"besides last and best (default {d.keep_checkpoints})")
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))
