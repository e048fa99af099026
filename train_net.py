#!/usr/bin/env python3
"""
Train or evaluate a focus-detr LazyConfig: detectron2's ``tools/lazyconfig_train_net.py`` with
what DETR training needs (focus_detr.engine): gradient clipping, mixed precision on CPU and CUDA
(``train.amp.enabled=True/False/"auto"``), an EMA of the weights, a policy for NaN losses,
checks of the inputs before anything is built, atomic checkpoints, and a seeded data stream
that a resumed run continues exactly.

    python train_net.py --config-file configs/focus_detr_demo_shapes.py
    python train_net.py --config-file configs/focus_detr_r50_4scale_12ep.py --num-gpus 8
    python train_net.py --config-file ... --eval-only train.init_checkpoint=model_final.pth
    python train_net.py --config-file ... --resume

The ``train`` keys it reads are those of configs/common/train.py.
"""

import logging
from collections import OrderedDict

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks, launch
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf

from focus_detr.data import build_resumable_train_loader
from focus_detr.engine import (
    BoundedHistoryHook,
    DETRTrainer,
    IterationSeedHook,
    ModelEMA,
    NonFiniteLossError,
    SafeCheckpointer,
    amp_from_config,
    build_model,
    check_output_dir,
    load_for_eval,
    resume_advice,
    run_preflight,
    wrap_ddp,
)

logger = logging.getLogger("detectron2")


def _option(cfg, key: str, default):
    """``cfg.train.<key>``, or ``default`` for configs without it."""
    return OmegaConf.select(cfg, f"train.{key}", default=default)


def do_test(cfg, model) -> OrderedDict:
    """Run ``cfg.dataloader.evaluator`` on ``cfg.dataloader.test``; prints the COCO table."""
    if "evaluator" not in cfg.dataloader:
        return OrderedDict()
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(cfg, *, resume: bool = False) -> OrderedDict:
    """
    Train ``cfg.model`` as the config says; returns the last evaluation's results. With
    ``resume`` the last checkpoint of ``cfg.train.output_dir`` is loaded with the iteration,
    optimizer, LR schedule, grad scaler, EMA and run seed, and training continues with the
    batches and randomness an uninterrupted run would have had.
    """
    train_dataset = run_preflight(cfg, check_output=comm.is_main_process())
    model = build_model(cfg)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    ema = None
    if _option(cfg, "ema.enabled", False):
        ema = ModelEMA(
            model, decay=_option(cfg, "ema.decay", 0.9998), warmup=_option(cfg, "ema.warmup", 2000)
        )
    amp = amp_from_config(cfg, next(model.parameters()).device)
    clip = _option(cfg, "clip_grad.max_norm", 0.1) if _option(cfg, "clip_grad.enabled", True) else 0
    trainer = DETRTrainer(
        wrap_ddp(model, **cfg.train.ddp),
        None,  # built below, once the start iteration is known
        optimizer,
        clip_grad_max_norm=clip,
        amp=amp.enabled,
        amp_dtype=amp.dtype,
        ema=ema,
        max_consecutive_nonfinite=_option(cfg, "skip_nonfinite.max_consecutive", 0),
    )
    extra = {"ema": ema} if ema is not None else {}
    checkpointer = SafeCheckpointer(model, cfg.train.output_dir, trainer=trainer, **extra)
    results = OrderedDict()

    def evaluate() -> OrderedDict:
        results.clear()
        results.update(do_test(cfg, ema.module if ema is not None else model))
        return results

    main = comm.is_main_process()
    trainer.register_hooks(
        [
            IterationSeedHook(),  # first: every hook's before_step draws from the step's stream
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main
                else None
            ),
            BoundedHistoryHook(),  # last: after the writers read the step's scalars
        ]
    )
    seed = _option(cfg, "seed", -1)
    # one run seed for all processes; a resumed run takes the one of its checkpoint
    trainer.seed = seed if seed is not None and seed >= 0 else comm.shared_random_seed()
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    if ema is not None and ema.updates == 0:
        ema.copy_from(model)  # start the average from the loaded weights
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.data_loader = build_resumable_train_loader(
        cfg.dataloader.train, start_iter=start_iter, seed=trainer.seed, dataset=train_dataset
    )
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except NonFiniteLossError as error:
        if not main:
            raise
        raise NonFiniteLossError(f"{error}. {resume_advice(checkpointer)}", error.iteration)
    return results


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if comm.is_main_process():
        check_output_dir(cfg.train.output_dir)  # before default_setup writes its log there
    default_setup(cfg, args)
    # focus_detr's own messages (dataset generation, extension fallback) in the same log
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="focus_detr")
    if args.eval_only:
        model = build_model(cfg)
        load_for_eval(cfg, model)
        return do_test(cfg, wrap_ddp(model))
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
