#!/usr/bin/env python3
"""
Train or evaluate a focus-detr LazyConfig with detectron2.

    python train_net.py --config-file configs/focus_detr_demo_shapes.py
    python train_net.py --config-file configs/focus_detr_r50_4scale_12ep.py --num-gpus 8
    python train_net.py --config-file ... --eval-only train.init_checkpoint=model_final.pth
    python train_net.py --config-file ... --resume

Run as a command, it first restarts itself with jemalloc preloaded where jemalloc is installed
(focus_detr/allocator.py: resident memory stays flat in long runs on changing image sizes;
FOCUS_DETR_ALLOCATOR=system keeps the system's malloc).
"""

import logging

from focus_detr.allocator import describe_allocator, reexec_with_preferred_allocator

if __name__ == "__main__":
    # an allocator is chosen when a process starts: restart before torch and detectron2 load
    reexec_with_preferred_allocator()

from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from focus_detr.engine import build_model, do_test, do_train, load_for_eval, wrap_ddp
from focus_detr.engine.preflight import check_output_dir

logger = logging.getLogger("detectron2")


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if comm.is_main_process():
        # before default_setup writes its log and config.yaml there
        check_output_dir(cfg.train.output_dir)
    default_setup(cfg, args)
    # focus_detr's own messages (dataset generation progress, extension fallback) next to
    # detectron2's, on the console and in the output folder's log
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="focus_detr")
    logger.info(describe_allocator())
    if args.eval_only:
        model = build_model(cfg)
        load_for_eval(cfg, model)
        model = wrap_ddp(model)
        return do_test(cfg, model)
    return do_train(cfg, resume=args.resume)


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
